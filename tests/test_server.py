"""The HTTP server over a real loopback socket: each route and its shape, completions and chat equal to
what the library generates, streaming order and [DONE], every error case (and health after each),
overload, time limit, client disconnects, auth, CORS, metrics, the official openai client, serve.py."""

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace

import pytest

from minillm.generate import SamplingConfig, generate
from minillm.hf import load_pretrained
from minillm.openai_api import COMPLETIONS_DEFAULT_MAX_TOKENS
from minillm.prompts import PromptTemplate
from minillm.server import allowed_host_names
from tests.conftest import REPO_ROOT
from tests.serving import call, is_error, sse_data, start_server, tiny_checkpoint, tiny_tokenizer, wait_for

KEY = "sk-test-5f1c2a"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two checkpoints of one tiny random model: a base model, and one carrying a prompt template."""
    root = tmp_path_factory.mktemp("serve")
    tokenizer = tiny_tokenizer()
    return {"base": tiny_checkpoint(root / "base", tokenizer),
            "instruct": tiny_checkpoint(root / "instruct", tokenizer, template=PromptTemplate()),
            # slower per token (8 layers): a 2000-token generation lasts seconds, long enough to interrupt
            "slow": tiny_checkpoint(root / "slow", tokenizer, n_layer=8, n_embd=64)}


@pytest.fixture(scope="module")
def server(runs):
    """The shared server: small body limit, everything else default (no key, no CORS)."""
    logs = []
    with start_server(runs["base"], logs, max_body_bytes=16384, max_choices=8) as srv:
        srv.logs = logs
        yield srv


@pytest.fixture(scope="module")
def reference(runs):
    """The same model loaded separately, for the library's own answers."""
    return load_pretrained(runs["base"])


def library(reference, prompt, **settings) -> list:
    """What minillm.generate makes for `prompt` with the server's defaults (top_k off, temperature 1)."""
    base = dict(top_k=None, temperature=1.0, stop_at_eot=True)
    return generate(reference.model, [prompt], SamplingConfig(**{**base, **settings}), tokenizer=reference.tokenizer)


def healthy(server) -> bool:
    reply = call(server, "GET", "/health")
    return reply.status == 200 and reply.json()["status"] == "ok"


# ---- routes and shapes ----


def test_models_health_page_and_unknown_routes(server):
    models = call(server, "GET", "/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["base"]
    assert set(models["data"][0]) == {"id", "object", "created", "owned_by"} and models["data"][0]["object"] == "model"
    assert call(server, "GET", "/v1/models/base").json()["id"] == "base"
    assert is_error(call(server, "GET", "/v1/models/gpt-4"), 404, "model", "model_not_found")
    health = call(server, "GET", "/health").json()
    assert health == {"status": "ok", "model": "base", "busy": 0, "slots": 8, "waiting": 0}
    page = call(server, "GET", "/")
    assert page.status == 200 and page.headers["content-type"].startswith("text/html")
    assert b"/v1/chat/completions" in page.body and "connect-src 'self'" in page.headers["content-security-policy"]
    assert is_error(call(server, "GET", "/v2/nothing"), 404, code="not_found")
    reply = call(server, "GET", "/v1/completions")
    assert is_error(reply, 405) and reply.headers["allow"] == "POST"


def test_completions_equal_the_library_for_text_and_id_prompts_with_n(server, reference):
    tok = reference.tokenizer
    prompts = ["To be, or not", tok.encode("café 日本")]
    body = {"model": "base", "prompt": prompts, "n": 2, "max_tokens": 12, "temperature": 0.9, "top_p": 0.95, "seed": 7}
    reply = call(server, "POST", "/v1/completions", body)
    assert reply.status == 200 and reply.headers["content-type"] == "application/json"
    out = reply.json()
    assert set(out) == {"id", "object", "created", "model", "choices", "usage"} and out["object"] == "text_completion"
    assert out["id"].startswith("cmpl-") and out["model"] == "base"
    completion_tokens = 0
    for k, choice in enumerate(out["choices"]):  # choice k answers prompt k // n with seed 7 + k
        [expected] = library(reference, prompts[k // 2], max_new_tokens=12, temperature=0.9, top_p=0.95, seed=7 + k)
        assert choice == {"index": k, "text": expected.text, "logprobs": None, "finish_reason": expected.finish_reason}
        completion_tokens += len(expected.tokens)
    prompt_tokens = len(tok.encode(prompts[0])) + len(prompts[1])
    assert out["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                            "total_tokens": prompt_tokens + completion_tokens}


def test_completion_defaults_stop_strings_and_the_seed(server, reference):
    out = call(server, "POST", "/v1/completions", {"prompt": "To be", "seed": 3}).json()
    [expected] = library(reference, "To be", max_new_tokens=COMPLETIONS_DEFAULT_MAX_TOKENS, seed=3)
    assert out["choices"][0]["text"] == expected.text  # OpenAI's default of 16 tokens, temperature 1
    again = call(server, "POST", "/v1/completions", {"prompt": "To be", "seed": 3}).json()
    assert again["choices"] == out["choices"]
    free = library(reference, "The", max_new_tokens=40, temperature=0)[0].text
    stop = free[len(free) // 2: len(free) // 2 + 2]  # a piece of what greedy decoding writes
    out = call(server, "POST", "/v1/completions", {"prompt": "The", "max_tokens": 40, "temperature": 0, "stop": stop}).json()
    assert out["choices"][0]["text"] == free[: free.index(stop)] and out["choices"][0]["finish_reason"] == "stop"
    for top_k in (2, -1, 0):  # vLLM's "no limit" is -1 or 0
        out = call(server, "POST", "/v1/completions", {"prompt": "To be", "seed": 4, "max_tokens": 12, "top_k": top_k}).json()
        [expected] = library(reference, "To be", max_new_tokens=12, seed=4, top_k=top_k if top_k > 0 else None)
        assert out["choices"][0]["text"] == expected.text, top_k


def test_chat_without_a_template_is_a_plain_transcript(server, reference):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"},
                {"role": "assistant", "content": "Hi."}, {"role": "user", "content": [{"type": "text", "text": "Who?"}]}]
    out = call(server, "POST", "/v1/chat/completions", {"messages": messages, "max_tokens": 25, "seed": 11}).json()
    assert set(out) == {"id", "object", "created", "model", "choices", "usage"} and out["object"] == "chat.completion"
    transcript = "System: Be brief.\nUser: Hello\nAssistant: Hi.\nUser: Who?\nAssistant:"
    [expected] = library(reference, transcript, max_new_tokens=25, seed=11, stop=("\nUser:", "\nSystem:", "\nAssistant:"))
    assert out["choices"] == [{"index": 0, "message": {"role": "assistant", "content": expected.text.lstrip()},
                               "logprobs": None, "finish_reason": expected.finish_reason}]
    assert out["usage"]["prompt_tokens"] == len(reference.tokenizer.encode(transcript))


def test_chat_with_the_checkpoint_template_and_a_system_message(runs):
    instruct = load_pretrained(runs["instruct"])
    template = instruct.template
    with start_server(runs["instruct"]) as srv:
        messages = [{"role": "developer", "content": "Answer in French."}, {"role": "user", "content": "Name a fruit."},
                    {"role": "assistant", "content": "Pomme."}, {"role": "user", "content": "Another?"}]
        out = call(srv, "POST", "/v1/chat/completions", {"messages": messages, "max_completion_tokens": 20, "seed": 2}).json()
    prompt = replace(template, preamble="Answer in French.").render_conversation([("Name a fruit.", "Pomme.")], "Another?")
    assert prompt.startswith("Answer in French.\n\n### Instruction:\nName a fruit.\n\n### Response:\nPomme.")
    [expected] = generate(instruct.model, [prompt], SamplingConfig(max_new_tokens=20, temperature=1.0, top_k=None, seed=2,
                                                                    stop=template.stop_strings()), tokenizer=instruct.tokenizer)
    assert out["choices"][0]["message"]["content"] == expected.text.lstrip()


def test_lone_surrogates_in_json_are_read_as_replacement_characters(server, reference):
    reply = call(server, "POST", "/v1/completions", {"prompt": "a \ud800 b", "max_tokens": 2})
    assert reply.status == 200  # JSON may carry them; the tokenizer reads them as U+FFFD
    assert reply.json()["usage"]["prompt_tokens"] == len(reference.tokenizer.encode("a \ufffd b"))


# ---- streaming ----


def test_streamed_completion_chunks_add_up_in_order_and_end_with_done(server):
    body = {"prompt": ["To be", "café"], "n": 2, "max_tokens": 30, "seed": 5, "temperature": 1.2}
    whole = call(server, "POST", "/v1/completions", body).json()
    reply = call(server, "POST", "/v1/completions", {**body, "stream": True, "stream_options": {"include_usage": True}})
    assert reply.status == 200 and reply.headers["content-type"].startswith("text/event-stream")
    assert reply.headers["transfer-encoding"] == "chunked"
    data = sse_data(reply.body)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    usage_chunk = chunks.pop()  # include_usage: the last chunk has the usage and no choices
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == whole["usage"]
    for k in range(4):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == k]
        assert [c["finish_reason"] is not None for c in mine] == [False] * (len(mine) - 1) + [True]
        assert "".join(c["text"] for c in mine) == whole["choices"][k]["text"]
        assert mine[-1]["finish_reason"] == whole["choices"][k]["finish_reason"]
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)


def test_streamed_chat_opens_with_the_role_and_never_splits_a_character(server):
    body = {"messages": [{"role": "user", "content": "日本語 🙂"}], "max_tokens": 60, "seed": 9, "temperature": 1.5}
    whole = call(server, "POST", "/v1/chat/completions", body).json()["choices"][0]
    reply = call(server, "POST", "/v1/chat/completions", {**body, "stream": True})
    data = sse_data(reply.body)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d)["choices"][0] for d in data[:-1]]
    assert chunks[0]["delta"] == {"role": "assistant", "content": ""} and chunks[-1]["delta"] == {}
    assert chunks[-1]["finish_reason"] == whole["finish_reason"]
    pieces = [c["delta"]["content"] for c in chunks[1:-1]]
    assert pieces and all(pieces) and "".join(pieces) == whole["message"]["content"]
    raw = reply.body.decode("utf-8")  # the stream is valid UTF-8 as a whole and event by event
    assert all(event.encode("utf-8").decode("utf-8") == event for event in raw.split("\n\n"))


# ---- errors: each a 4xx in OpenAI's shape, and the server healthy after it ----

ERRORS = [  # (route, body, status, param, code)
    ("/v1/completions", {"prompt": "x", "max_tokens": "10"}, 400, "max_tokens", "invalid_type"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens", "invalid_value"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, 400, "temperature", "invalid_type"),
    ("/v1/completions", {"prompt": "x", "temperature": 2.5}, 400, "temperature", "invalid_value"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p", "invalid_value"),
    ("/v1/completions", {"prompt": "x", "top_p": 1.01}, 400, "top_p", "invalid_value"),
    ("/v1/completions", {"prompt": "x", "top_k": -2}, 400, "top_k", "invalid_value"),
    ("/v1/completions", {"prompt": "x", "n": 1.5}, 400, "n", "invalid_type"),
    ("/v1/completions", {"prompt": "x", "n": 9}, 400, "n", "invalid_value"),  # over max_choices=8
    ("/v1/completions", {"prompt": "x", "seed": -1}, 400, "seed", "invalid_value"),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, 400, "stream", "invalid_type"),
    ("/v1/completions", {"prompt": "x", "stop": 5}, 400, "stop", "invalid_type"),
    ("/v1/completions", {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "invalid_value"),
    ("/v1/completions", {"prompt": "x", "logprobs": 3}, 400, "logprobs", "unsupported_parameter"),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options", "invalid_value"),
    ("/v1/completions", {"max_tokens": 3}, 400, "prompt", "missing_required_parameter"),
    ("/v1/completions", {"prompt": 42}, 400, "prompt", "invalid_type"),
    ("/v1/completions", {"prompt": []}, 400, "prompt", "invalid_value"),
    ("/v1/completions", {"prompt": [1, 2, 300]}, 400, "prompt", "invalid_value"),  # vocabulary is [0, 300)
    ("/v1/completions", {"prompt": [[1], [-1]]}, 400, "prompt", "invalid_value"),
    ("/v1/completions", {"prompt": [1, True]}, 400, "prompt", "invalid_type"),
    ("/v1/completions", {"prompt": [1] * 2040, "max_tokens": 10}, 400, "max_tokens", "context_length_exceeded"),
    ("/v1/completions", {"prompt": [1] * 2048}, 400, "prompt", "context_length_exceeded"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "model", "model_not_found"),
    ("/v1/completions", [1, 2], 400, None, None),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages", "invalid_type"),
    ("/v1/chat/completions", {}, 400, "messages", "missing_required_parameter"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages", "invalid_value"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 7}]}, 400, "messages", "invalid_type"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     400, "messages", "invalid_value"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
     400, "messages", "invalid_value"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5000}, 400, "max_tokens",
     "context_length_exceeded"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]},
     400, "tools", "unsupported_parameter"),
]


@pytest.mark.parametrize("route,body,status,param,code", ERRORS, ids=[f"{e[3]}-{e[4]}-{i}" for i, e in enumerate(ERRORS)])
def test_bad_requests_get_openai_errors_and_the_server_stays_healthy(server, route, body, status, param, code):
    assert is_error(call(server, "POST", route, body), status, param, code)
    assert healthy(server)


@pytest.mark.parametrize("raw,headers,status,code", [
    (b"{not json", {}, 400, "invalid_json"),
    (b'{"prompt": "x", "temperature": NaN}', {}, 400, "invalid_json"),
    (b'{"prompt": "\xff"}', {}, 400, "invalid_json"),
    (b"[" * 8000 + b"]" * 8000, {}, 400, "invalid_json"),  # nested deeper than the JSON parser recurses
    (b'{"prompt": "x"}', {"Content-Type": "text/plain"}, 415, "unsupported_media_type"),
    (b'{"prompt": "' + b"x" * 20000 + b'"}', {}, 413, "request_too_large"),
])
def test_bodies_that_cannot_be_read_are_refused(server, raw, headers, status, code):
    assert is_error(call(server, "POST", "/v1/completions", raw=raw, headers=headers), status, code=code)
    assert healthy(server)


def raw_exchange(server, request: bytes) -> bytes:
    host, port = server.httpd.server_address[:2]
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data


def test_raw_http_edge_cases_missing_length_too_many_headers_and_http_1_0(server):
    no_length = raw_exchange(server, b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                                     b"Connection: close\r\n\r\n")
    assert no_length.startswith(b"HTTP/1.1 411") and b'"code": "length_required"' in no_length
    headers = b"".join(b"X-%d: y\r\n" % i for i in range(150))  # http.server itself refuses over 100 headers
    crowded = raw_exchange(server, b"GET /health HTTP/1.1\r\nHost: localhost\r\n" + headers + b"\r\n")
    assert crowded.startswith(b"HTTP/1.1 431") and json.loads(crowded.split(b"\r\n\r\n", 1)[1])["error"]["message"]
    body = json.dumps({"prompt": "To be", "max_tokens": 5, "stream": True}).encode()
    old = raw_exchange(server, b"POST /v1/completions HTTP/1.0\r\nContent-Type: application/json\r\n"
                               b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    head, stream = old.split(b"\r\n\r\n", 1)  # HTTP/1.0 knows no chunked encoding: the body ends at close
    assert head.startswith(b"HTTP/1.1 200") and b"chunked" not in head.lower() and b"Connection: close" in head
    assert sse_data(stream)[-1] == "[DONE]"
    assert healthy(server)


# ---- load, time limits, disconnects ----


def open_stream(server, body) -> socket.socket:
    """Start a streaming completion on a raw socket and read until its first data event."""
    host, port = server.httpd.server_address[:2]
    sock = socket.create_connection((host, port), timeout=10)
    data = json.dumps({**body, "stream": True}).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
    seen = b""
    while b"data: " not in seen:
        seen += sock.recv(4096)
    assert seen.startswith(b"HTTP/1.1 200")
    return sock


def test_a_full_queue_is_a_fast_503_and_a_disconnect_frees_the_slot(runs):
    logs = []
    with start_server(runs["slow"], logs, max_batch=1, queue_size=1) as srv:
        long = open_stream(srv, {"prompt": "To be", "max_tokens": 2000, "seed": 1, "ignore_eos": True})  # takes the only slot
        results = {}
        waiter = threading.Thread(target=lambda: results.update(
            reply=call(srv, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 3, "seed": 0})))
        waiter.start()  # waits for the slot
        assert wait_for(lambda: srv.engine.stats()["waiting"] == 1)
        start = time.perf_counter()
        busy = call(srv, "POST", "/v1/completions", {"prompt": "y", "max_tokens": 3})
        assert is_error(busy, 503, code="overloaded") and busy.headers["retry-after"] == "1"
        assert time.perf_counter() - start < 1.0  # refused at once, not after waiting
        long.close()  # the client goes away mid-stream: its generation stops and its slot is freed
        waiter.join(timeout=10)
        assert results["reply"].status == 200 and results["reply"].json()["choices"][0]["text"] is not None
        assert wait_for(lambda: srv.engine.stats() == {"busy": 0, "slots": 1, "waiting": 0})
        assert srv.engine.tokens < 1000  # the 2000-token stream was cut short
        assert any('"POST /v1/completions" 499' in line for line in logs)
        assert healthy(srv)


def test_a_non_streaming_client_that_leaves_frees_its_slot_too(runs):
    with start_server(runs["slow"], max_batch=1) as srv:
        host, port = srv.httpd.server_address[:2]
        sock = socket.create_connection((host, port), timeout=10)
        data = json.dumps({"prompt": "To be", "max_tokens": 2000, "seed": 1, "ignore_eos": True}).encode()
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
        assert wait_for(lambda: srv.engine.stats()["busy"] == 1)
        sock.close()
        assert wait_for(lambda: srv.engine.stats()["busy"] == 0, timeout=10)
        assert srv.engine.tokens < 1000


def test_connections_beyond_the_limit_get_a_503_at_once(runs):
    with start_server(runs["base"], max_connections=2) as srv:
        host, port = srv.httpd.server_address[:2]
        idle = [socket.create_connection((host, port), timeout=10) for _ in range(2)]  # each holds a thread
        assert wait_for(lambda: srv.httpd.connections._value == 0)
        refused = raw_exchange(srv, b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert refused.startswith(b"HTTP/1.1 503") and b"Retry-After: 1" in refused and b'"overloaded"' in refused
        for sock in idle:
            sock.close()
        assert wait_for(lambda: call(srv, "GET", "/health").status == 200)


def test_the_time_limit_stops_a_generation(runs):
    with start_server(runs["slow"], request_timeout=0.3) as srv:
        start = time.perf_counter()
        reply = call(srv, "POST", "/v1/completions", {"prompt": "To be", "max_tokens": 2000, "seed": 1, "ignore_eos": True})
        assert is_error(reply, 504, code="timeout") and time.perf_counter() - start < 2.0
        streamed = call(srv, "POST", "/v1/completions", {"prompt": "To be", "max_tokens": 2000, "seed": 1, "ignore_eos": True, "stream": True})
        data = sse_data(streamed.body)  # the status line was sent already: the error comes as an event
        assert data[-1] == "[DONE]" and json.loads(data[-2])["error"]["code"] == "timeout"
        assert wait_for(lambda: srv.engine.stats()["busy"] == 0) and healthy(srv)
        assert srv.engine.tokens < 2000  # two 2000-token requests, both stopped early


# ---- security ----


def test_an_api_key_guards_the_api_but_not_health_and_never_reaches_the_log(runs):
    logs = []
    with start_server(runs["base"], logs, api_key=KEY) as srv:
        body = {"prompt": "To be", "max_tokens": 3}
        for path, method, payload in [("/v1/completions", "POST", body), ("/v1/models", "GET", None), ("/metrics", "GET", None),
                                      ("/v1/chat/completions", "POST", {"messages": [{"role": "user", "content": "hi"}]})]:
            missing = call(srv, method, path, payload)
            assert is_error(missing, 401, code="invalid_api_key") and missing.headers["www-authenticate"] == "Bearer"
            assert is_error(call(srv, method, path, payload, {"Authorization": "Bearer sk-wrong-000"}), 401)
            assert is_error(call(srv, method, path, payload, {"Authorization": KEY}), 401)  # no "Bearer"
            assert call(srv, method, path, payload, {"Authorization": f"Bearer {KEY}"}).status == 200
        assert call(srv, "GET", "/health").status == 200 and call(srv, "GET", "/").status == 200
    text = "\n".join(logs)
    assert '"POST /v1/completions" 401' in text and '"POST /v1/completions" 200' in text
    assert KEY not in text and "sk-wrong-000" not in text


def test_no_cors_unless_asked_and_only_for_the_origins_named(server, runs):
    origin = {"Origin": "http://evil.example"}
    plain = call(server, "GET", "/v1/models", headers=origin)
    assert not any(h.startswith("access-control-") for h in plain.headers)
    assert is_error(call(server, "OPTIONS", "/v1/completions", headers=origin), 405)
    with start_server(runs["base"], cors_origins="http://app.example") as srv:
        preflight = call(srv, "OPTIONS", "/v1/chat/completions",
                         headers={"Origin": "http://app.example", "Access-Control-Request-Method": "POST"})
        assert preflight.status == 204 and preflight.headers["access-control-allow-origin"] == "http://app.example"
        assert "Authorization" in preflight.headers["access-control-allow-headers"]
        stainless = "authorization, content-type, x-stainless-os, x-stainless-timeout"  # OpenAI's JS client
        asked = call(srv, "OPTIONS", "/v1/chat/completions", headers={
            "Origin": "http://app.example", "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": stainless})
        assert asked.status == 204 and asked.headers["access-control-allow-headers"] == stainless
        odd = call(srv, "OPTIONS", "/v1/chat/completions", headers={
            "Origin": "http://app.example", "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "a;b"})
        assert odd.headers["access-control-allow-headers"] == "Authorization, Content-Type"
        allowed = call(srv, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 2}, {"Origin": "http://app.example"})
        assert allowed.headers["access-control-allow-origin"] == "http://app.example"
        other = call(srv, "GET", "/v1/models", headers=origin)
        assert "access-control-allow-origin" not in other.headers


def test_a_loopback_server_answers_only_to_its_own_host_names(server, runs):
    for host in ("evil.example", "evil.example:80", "127.0.0.1.evil.example", "localhost.evil.example"):
        refused = call(server, "GET", "/health", headers={"Host": host})
        assert is_error(refused, 403) and refused.json()["error"]["code"] == "host_not_allowed", host
    port = server.httpd.server_address[1]
    for host in ("localhost", f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "LOCALHOST."):
        assert call(server, "GET", "/health", headers={"Host": host}).status == 200, host
    with start_server(runs["base"], allowed_hosts="box.lan") as srv:
        assert call(srv, "GET", "/health", headers={"Host": "box.lan:8000"}).status == 200
        assert is_error(call(srv, "GET", "/health", headers={"Host": "evil.example"}), 403)
    with start_server(runs["base"], allowed_hosts="*") as srv:
        assert call(srv, "GET", "/health", headers={"Host": "evil.example"}).status == 200
    with start_server(runs["base"], host="127.0.0.2") as srv:  # its own address, whatever the loopback address
        assert call(srv, "GET", "/health").status == 200


@pytest.mark.parametrize("listen, allowed, expected", [
    ("127.0.0.1", "", {"localhost", "127.0.0.1", "::1"}),
    ("::1", "", {"localhost", "127.0.0.1", "::1"}),
    ("localhost", "", {"localhost", "127.0.0.1", "::1"}),
    ("127.0.0.2", "", {"localhost", "127.0.0.1", "::1", "127.0.0.2"}),
    ("0.0.0.0", "", None),
    ("10.1.2.3", "", None),
    ("0.0.0.0", "Box.LAN, box.lan:8000", {"box.lan", "localhost", "127.0.0.1", "::1"}),
    ("127.0.0.1", "*", None),
])
def test_which_host_names_a_server_answers_to(listen, allowed, expected):
    names = allowed_host_names(allowed, listen)
    assert (None if names is None else set(names)) == expected


# ---- metrics ----


def parse_metrics(text: str) -> dict[str, float]:
    """'name{labels}' -> value for every sample line of Prometheus' text format."""
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def test_metrics_count_requests_tokens_and_latencies(runs):
    with start_server(runs["base"]) as srv:
        used = [call(srv, "POST", "/v1/completions", {"prompt": p, "max_tokens": 5, "seed": 1}).json()["usage"]
                for p in ("To be", "café", "x")]
        call(srv, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 0})
        reply = call(srv, "GET", "/metrics")
    assert reply.headers["content-type"].startswith("text/plain; version=0.0.4")
    m = parse_metrics(reply.body.decode())
    route = 'route="/v1/completions"'
    assert m[f'minillm_requests_total{{{route},status="200"}}'] == 3
    assert m[f'minillm_requests_total{{{route},status="400"}}'] == 1
    assert m["minillm_prompt_tokens_total"] == sum(u["prompt_tokens"] for u in used)
    assert m["minillm_completion_tokens_total"] == sum(u["completion_tokens"] for u in used)
    assert m["minillm_requests_in_flight"] == 1  # the /metrics request itself
    assert m["minillm_batch_slots"] == 8 and m["minillm_batch_slots_busy"] == 0
    for name, count in (("minillm_request_duration_seconds", 4), ("minillm_time_to_first_token_seconds", 3)):
        buckets = [v for k, v in m.items() if k.startswith(f"{name}_bucket{{{route}")]
        assert buckets == sorted(buckets) and buckets[-1] == m[f"{name}_count{{{route}}}"] == count
        assert 0 < m[f"{name}_sum{{{route}}}"] < 60


# ---- clients ----


def test_the_official_openai_client_completes_against_the_server(runs):
    openai = pytest.importorskip("openai", reason="the official openai client is not installed (pip install openai)")
    with start_server(runs["base"], api_key=KEY) as srv:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key=KEY, max_retries=0)
        assert [m.id for m in client.models.list()] == ["base"]
        done = client.completions.create(model="base", prompt="To be", max_tokens=8, seed=4)
        assert done.choices[0].finish_reason in ("length", "stop") and done.usage.completion_tokens <= 8
        chat = client.chat.completions.create(model="base", messages=[{"role": "user", "content": "Hi"}], max_tokens=10, seed=4)
        stream = client.chat.completions.create(model="base", messages=[{"role": "user", "content": "Hi"}], max_tokens=10,
                                                seed=4, stream=True)
        pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
        assert "".join(pieces) == chat.choices[0].message.content and len(pieces) > 2
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "Hi"}])
        with pytest.raises(openai.BadRequestError, match="temperature"):
            client.completions.create(model="base", prompt="x", temperature=5)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{srv.url}/v1", api_key="wrong", max_retries=0).models.list()


def test_serve_py_takes_the_key_from_the_environment_and_never_prints_it(runs):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "MINILLM_API_KEY": KEY}
    proc = subprocess.Popen([sys.executable, str(REPO_ROOT / "serve.py"), "--ckpt", str(runs["base"]), "--port", "0",
                             "--max_batch", "2"], env=env, stderr=subprocess.PIPE, text=True)
    lines = []

    def read_until(text: str) -> str:
        while not (lines and text in lines[-1]):
            line = proc.stderr.readline()
            assert line, f"serve.py ended before printing {text!r}:\n" + "".join(lines)
            lines.append(line)
        return lines[-1]

    try:
        host, port = re.search(r"on http://([\d.]+):(\d+)", read_until("serving base on http://")).groups()
        assert host == "127.0.0.1"  # loopback unless told otherwise
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.request("POST", "/v1/completions", json.dumps({"prompt": "To be", "max_tokens": 4}),
                     {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
        assert conn.getresponse().status == 200
        conn.close()
        read_until('"POST /v1/completions" 200')
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        rest = proc.communicate(timeout=30)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    output = "".join(lines) + rest
    assert proc.returncode == 0 and output.rstrip().endswith("stopped")
    assert '"api_key": "(set)"' in output and KEY not in output
