"""The chat page in a real browser: headless Chromium, driven through chromedriver's W3C WebDriver HTTP
API with the standard library (no selenium), types a message, presses Enter and sees the reply
stream in, equal to what the API answers for the same conversation.

Needs Debian's `chromium` and `chromium-driver` packages (or CHROMIUM / CHROMEDRIVER pointing at the
binaries); without them the test is skipped, saying what it looked for.
"""

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from tests.serving import call, start_server, tiny_checkpoint, tiny_tokenizer

ELEMENT = "element-6066-11e4-a52e-4f735466cecf"  # the W3C WebDriver key of an element reference
ENTER = "\ue007"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]


def find(env: str, names: tuple[str, ...]) -> str | None:
    return os.environ.get(env) or next((p for p in map(shutil.which, names) if p), None)


class WebDriver:
    """Just enough of the W3C WebDriver protocol: a session, navigation, elements, keys, scripts."""

    def __init__(self, driver: str, browser: str, profile: str):
        with socket.socket() as s:  # a free port for chromedriver
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.base = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen([driver, f"--port={port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while True:
            try:
                if self.request("GET", "/status")["ready"]:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError("chromedriver did not start within 20 s")
            time.sleep(0.05)
        options = {"binary": browser, "args": FLAGS + [f"--user-data-dir={profile}"]}
        try:
            session = self.request("POST", "/session", {"capabilities": {"alwaysMatch": {"goog:chromeOptions": options}}})
        except BaseException:
            self.proc.kill()
            raise
        self.session = f"/session/{session['sessionId']}"

    def request(self, method: str, path: str, body: dict | None = None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as response:
                return json.loads(response.read())["value"]
        except urllib.error.HTTPError as err:
            raise RuntimeError(f"WebDriver {method} {path}: {err.read()[:500]!r}") from None

    def go(self, url: str) -> None:
        self.request("POST", f"{self.session}/url", {"url": url})

    def element(self, css: str) -> str:
        return self.request("POST", f"{self.session}/element", {"using": "css selector", "value": css})[ELEMENT]

    def type(self, css: str, text: str) -> None:
        self.request("POST", f"{self.session}/element/{self.element(css)}/value", {"text": text})

    def clear(self, css: str) -> None:
        self.request("POST", f"{self.session}/element/{self.element(css)}/clear", {})

    def script(self, source: str):
        return self.request("POST", f"{self.session}/execute/sync", {"script": source, "args": []})

    def wait(self, source: str, timeout: float = 30):
        """Run `source` until it returns something truthy; returns that."""
        deadline = time.monotonic() + timeout
        while not (value := self.script(source)):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for: {source}")
            time.sleep(0.05)
        return value

    def close(self) -> None:
        try:
            self.request("DELETE", self.session)
        finally:
            self.proc.terminate()
            self.proc.wait(timeout=10)


@pytest.fixture
def browser(tmp_path):
    chromium = find("CHROMIUM", ("chromium", "chromium-browser", "google-chrome"))
    driver = find("CHROMEDRIVER", ("chromedriver",))
    if not chromium or not driver:
        pytest.skip("headless Chromium not found: looked for chromium/chromium-browser/google-chrome and chromedriver "
                    "on PATH (and $CHROMIUM, $CHROMEDRIVER); Debian: apt-get install chromium chromium-driver")
    web = WebDriver(driver, chromium, str(tmp_path / "profile"))
    yield web
    web.close()


def chat(srv, messages: list[dict]) -> dict:
    """The API's answer for a conversation with the page's settings in the test: greedy, 40 tokens."""
    return call(srv, "POST", "/v1/chat/completions", {"messages": messages, "temperature": 0, "top_p": 1, "max_tokens": 40})


def test_the_chat_page_streams_a_reply_in_a_real_browser(browser, tmp_path):
    logs = []
    # a 96-token context window: the second turn no longer fits with the first, so the page must drop it
    with start_server(tiny_checkpoint(tmp_path / "chat", tiny_tokenizer(), block_size=96), logs) as srv:
        browser.go(srv.url + "/")
        assert browser.wait("return document.getElementById('status').textContent.includes('model: chat')")
        browser.script("document.getElementById('settings').open = true")
        for field, value in (("#temperature", "0"), ("#max_tokens", "40")):
            browser.clear(field)
            browser.type(field, value)
        first = {"role": "user", "content": "Hello, café 🙂"}
        browser.type("#input", first["content"] + ENTER)  # Enter sends
        reply = browser.wait("""
            const m = document.querySelector('.msg[data-role=assistant]');
            return m && m.dataset.done === 'true' && {text: m.querySelector('.text').textContent,
                chunks: Number(m.dataset.chunks), finish: m.dataset.finish, error: m.classList.contains('error'),
                user: document.querySelector('.msg[data-role=user]').textContent};""")
        expected = chat(srv, [first]).json()["choices"][0]
        assert not reply["error"] and reply["user"] == first["content"]
        assert reply["text"] == expected["message"]["content"] and reply["finish"] == expected["finish_reason"]
        assert reply["chunks"] > 1  # it arrived in pieces, each shown as it came
        assert any('"POST /v1/chat/completions" 200' in line for line in logs)

        second = {"role": "user", "content": "And then?"}
        browser.type("#input", second["content"] + ENTER)
        assert browser.wait("return document.querySelectorAll('.msg[data-role=assistant][data-done=true]').length === 2")
        text, meta = browser.script("const m = document.querySelectorAll('.msg[data-role=assistant]')[1];"
                                    "return [m.querySelector('.text').textContent, m.querySelector('.meta').textContent];")
        whole = chat(srv, [first, {"role": "assistant", "content": reply["text"]}, second])
        assert whole.status == 400 and whole.json()["error"]["code"] == "context_length_exceeded"
        assert text == chat(srv, [second]).json()["choices"][0]["message"]["content"]  # answered without turn 1
        assert "1 oldest turn forgotten to fit the context window" in meta
