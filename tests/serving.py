"""Helpers for the server tests: tiny checkpoints built in a temporary folder, a server on a free
loopback port, and a plain http.client caller that returns status, headers and body."""

from __future__ import annotations

import http.client
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from minillm.checkpoint import save_checkpoint
from minillm.config import GPTConfig
from minillm.hf import load_pretrained
from minillm.model import GPT
from minillm.prompts import META_KEY
from minillm.server import Server, ServerConfig
from minillm.tokenizer import TOKENIZER_FILE, Tokenizer

# multibyte characters on purpose: streamed pieces must never split them
TEXT = ("To be, or not to be, that is the question. Whether 'tis nobler in the mind to suffer. "
        "Below is an instruction that describes a task. Write a response. ### Response: "
        "café naïve 日本語 🙂 User: Assistant: System:\n\n") * 6


def tiny_tokenizer() -> Tokenizer:
    return Tokenizer.train(TEXT, vocab_size=300)


def tiny_checkpoint(folder: Path, tokenizer: Tokenizer, *, block_size: int = 2048, template=None, seed: int = 0,
                    n_layer: int = 2, n_embd: int = 32) -> Path:
    """A random 2-layer GPT saved as a minillm run folder (with the tokenizer, and a template if given).
    block_size 2048 lets a test ask for a generation long enough to still be running when it acts."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=block_size, n_layer=n_layer, n_head=2, n_embd=n_embd,
                          impl="torch")).eval()
    configs = {} if template is None else {META_KEY: template}
    save_checkpoint(folder, 1, model, configs=configs, writers={TOKENIZER_FILE: tokenizer.save})
    return folder


def start_server(ckpt: Path, logs: list | None = None, **overrides) -> Server:
    """A started Server for `ckpt` on a free loopback port; its log lines go to `logs`."""
    pretrained = load_pretrained(ckpt)
    config = ServerConfig(ckpt=str(ckpt), port=0, **overrides)
    return Server(pretrained, config, log=(logs.append if logs is not None else lambda line: None)).start()


@dataclass
class Reply:
    status: int
    headers: dict[str, str]  # lower-cased names
    body: bytes

    def json(self):
        return json.loads(self.body)


def call(server: Server, method: str, path: str, body=None, headers: dict | None = None, raw: bytes | None = None,
         timeout: float = 60) -> Reply:
    """One request on a fresh connection; `body` is sent as JSON, `raw` as is."""
    host, port = server.httpd.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        sent = {"Content-Type": "application/json"} if data is not None else {}
        conn.request(method, path, body=data, headers={**sent, **(headers or {})})
        response = conn.getresponse()
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
    finally:
        conn.close()


def sse_data(body: bytes) -> list[str]:
    """The `data:` payloads of a server-sent event stream, in order; every event must be one."""
    events = body.decode("utf-8").split("\n\n")
    assert events[-1] == "", "the stream must end with a blank line"
    assert all(e.startswith("data: ") and "\n" not in e for e in events[:-1]), events
    return [e[len("data: "):] for e in events[:-1]]


def wait_for(predicate, timeout: float = 10.0) -> bool:
    """Poll `predicate` until it holds or `timeout` seconds pass; returns whether it held."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return bool(predicate())


def is_error(reply: Reply, status: int, param: str | None = "any", code: str | None = "any") -> bool:
    """The reply is `status` with OpenAI's error object (and the given param and code)."""
    assert reply.status == status, (reply.status, reply.body[:300])
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str) and error["message"]
    assert param == "any" or error["param"] == param, error
    assert code == "any" or error["code"] == code, error
    return True
