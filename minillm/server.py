"""The HTTP server: OpenAI-compatible routes over the batching engine, with the standard library only
(http.server's ThreadingHTTPServer: one thread per connection). The model and its KV cache live in
minillm.engine's scheduler thread; a request thread checks its request (minillm.openai_api), submits
a Job and waits on the job's queue, answering with JSON or server-sent events (minillm.answer).

    POST /v1/completions        text completion
    POST /v1/chat/completions   chat, rendered with the checkpoint's prompt template
    GET  /v1/models, /v1/models/{id}
    GET  /health                {"status": "ok", "model", "busy", "slots", "waiting"}; 503 once the engine stopped
    GET  /metrics               Prometheus text (minillm.prometheus)
    GET  /                      the chat page, minillm/static/chat.html

Limits. Bodies over `max_body_bytes` get 413 unread; a POST body must be `application/json` (415
otherwise, which also keeps other web pages from posting to a local server without a CORS preflight)
with a Content-Length (411). The engine's waiting line is bounded: beyond `queue_size` a request gets
503 with `Retry-After` at once; so do connections beyond `max_connections`. A request has
`request_timeout` seconds in all, waiting included, then its generation stops (504, or an error event
in a stream); a client that disconnects stops its generation too. Every error is OpenAI's error
object, http.server's own refusals (a malformed request line, too many headers) included, and the
server keeps serving: nothing a request sends can stop the engine.

Security. It listens on 127.0.0.1 unless `host` says otherwise. With an API key, /v1/* and /metrics
need `Authorization: Bearer <key>`, compared with hmac.compare_digest (constant time); /health and
the chat page (static, no secrets) stay open. Request logs hold the client address, method, path
(without the query), status, time and token counts: never a header, so never the key. No CORS
headers unless `cors_origins` names the origins allowed. On a loopback address the server answers
only requests whose Host header names the machine itself (localhost, 127.0.0.1, [::1]): a web page
on a domain that an attacker re-points at 127.0.0.1 (DNS rebinding) would otherwise count as the
server's own origin and could read its answers. `allowed_hosts` names other host names.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import re
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from urllib.parse import urlsplit

from minillm.answer import ClientGone, collect, job_events, write_stream
from minillm.engine import Engine, Job, Overloaded
from minillm.prometheus import ServerMetrics
from minillm.openai_api import (APIError, GenerationRequest, ServedModel, chat_response, completion_response, error_body,
                                model_object, models_response, parse_chat_request, parse_completion_request, usage)

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")  # what a Host header may say to a server on a loopback address
HEADER_LIST = re.compile(r"[A-Za-z0-9-]+(\s*,\s*[A-Za-z0-9-]+)*")  # a preflight's Access-Control-Request-Headers
API_KEY_ENV = "MINILLM_API_KEY"  # serve.py reads the key from here when --api_key is not given
ROUTES = ("/", "/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions")
PAGE_HEADERS = {  # the chat page may talk to this server only, and may not be framed
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "Cache-Control": "no-store",
}


@dataclass
class ServerConfig:
    """What serve.py listens on and how much it takes on (`python serve.py --help` lists these)."""

    ckpt: str = ""  # a minillm checkpoint or run folder, or a Hugging Face GPT-2 folder (required)
    host: str = "127.0.0.1"  # address to listen on; 0.0.0.0 opens it to the network (set an API key then)
    port: int = 8000  # TCP port; 0 = any free port (the address is printed)
    model_name: str = ""  # the model id clients send and /v1/models lists; "" = the checkpoint's run folder name
    api_key: str = ""  # require "Authorization: Bearer KEY" on /v1/* and /metrics; "" = $MINILLM_API_KEY, else none
    max_batch: int = 8  # sequences decoded together (KV-cache rows; memory grows with it)
    queue_size: int = 32  # requests that may wait for a free row; beyond, 503 with Retry-After
    max_choices: int = 16  # choices (prompts x n) one request may ask for
    max_body_bytes: int = 1_048_576  # request bodies above this get 413
    request_timeout: float = 300.0  # seconds a request may take, waiting included; then its generation stops (504)
    socket_timeout: float = 30.0  # seconds a connection may sit idle or stall mid-request before it is closed
    max_connections: int = 256  # connections open at once; beyond, 503 and close
    cors_origins: str = ""  # comma-separated origins whose pages may call the API ("*" = any); "" = no CORS
    allowed_hosts: str = ""  # comma-separated names the Host header may give ("*" = any); "" = on a loopback address localhost, 127.0.0.1 and ::1 only, elsewhere any
    log_requests: bool = True  # one line per request on stderr (no headers, so never the key)
    device: str = "auto"  # cpu, cuda, cuda:1, ... or auto (cuda when available)
    dtype: str = "auto"  # float32, bfloat16, float16, or auto (bfloat16 on a GPU that has it, else float32)
    impl: str = "auto"  # attention/layernorm path: auto, torch or triton

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_choices", "max_body_bytes", "max_connections"):
            if getattr(self, name) < 1:
                raise ValueError(f"ServerConfig.{name} must be at least 1, got {getattr(self, name)}")
        if self.queue_size < 0:
            raise ValueError(f"ServerConfig.queue_size must be >= 0, got {self.queue_size}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"ServerConfig.port must be in [0, 65535], got {self.port}")
        for name in ("request_timeout", "socket_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ServerConfig.{name} must be positive seconds, got {getattr(self, name)}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"ServerConfig.dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")


def allowed_host_names(allowed_hosts: str, listen_host: str) -> frozenset[str] | None:
    """The host names a request's Host header may give, or None for any (see the module docstring)."""
    names = {host_name(n) for n in allowed_hosts.split(",") if n.strip()}
    if "*" in names:
        return None
    loopback = is_loopback(listen_host)
    if not names and not loopback:
        return None
    return frozenset(names | set(LOOPBACK_NAMES) | ({host_name(listen_host)} if loopback else set()))


def is_loopback(host: str) -> bool:
    """Whether a listen address (an IP address or the name localhost) is this machine only."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a name, not an address
        return host.lower().rstrip(".") == "localhost"


def host_name(header: str) -> str:
    """A Host header's name without its port, lower case: 'Example.com:80' -> 'example.com',
    '[::1]:8000' -> '::1'."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].partition("]")[0]
    name = header.rpartition(":")[0] if header.count(":") == 1 else header
    return name.rstrip(".")


def model_name_for(path: str | Path) -> str:
    """The default model id: the run folder's name (`runs/demo/ckpt-00000400` -> "demo")."""
    path = Path(path).resolve()
    return path.parent.name if path.name.startswith("ckpt-") else path.name


class _Call:
    """One request being answered: what the access log and the metrics need to know about it."""

    def __init__(self, handler: BaseHTTPRequestHandler):
        self.h, self.start = handler, time.perf_counter()
        self.path = urlsplit(handler.path).path
        known = self.path in ROUTES or self.path.startswith("/v1/models/")
        self.route = ("/v1/models" if self.path.startswith("/v1/models/") else self.path) if known else "other"
        self.status, self.headers_sent, self.body_read = 500, False, False
        self.prompt_tokens = self.completion_tokens = 0
        self.first_token: float | None = None


class Server:
    """The app: routes, auth, limits, streaming. `start()` serves from a thread, `serve_forever()` from
    this one; `close()` stops both the HTTP server and the engine. The port is bound on construction."""

    def __init__(self, pretrained, config: ServerConfig, *, log: Callable[[str], None] | None = None):
        if pretrained.tokenizer is None:
            raise ValueError(f"{pretrained.source} has no tokenizer; the server needs one to read and write text")
        self.config = config
        self.log = log or (lambda line: print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}", file=sys.stderr, flush=True))
        self.api_key = config.api_key
        model = pretrained.model
        self.engine = Engine(model, pretrained.tokenizer, config.max_batch, config.queue_size, log=self.log)
        self.served = ServedModel(config.model_name or (model_name_for(config.ckpt) if config.ckpt else "minillm"),
                                  pretrained.tokenizer, model.config.block_size, pretrained.template,
                                  config.max_choices, int(time.time()))
        self.metrics = ServerMetrics(self.engine.stats)
        self.page = resources.files("minillm").joinpath("static/chat.html").read_bytes()
        self.cors = [o.strip() for o in config.cors_origins.split(",") if o.strip()]
        self.allowed_hosts = allowed_host_names(config.allowed_hosts, config.host)
        handler = type("Handler", (_Handler,), {"timeout": config.socket_timeout})
        self.httpd = _HTTPServer((config.host, config.port), handler, self, config.max_connections)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "Server":
        """Serve from a background thread (idempotent); returns self."""
        if self._thread is not None:
            return self
        self.engine.start()
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="minillm-http", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self.engine.start()
        try:
            self.httpd.serve_forever(poll_interval=0.25)
        finally:
            self.engine.close()
            self.httpd.server_close()

    def close(self) -> None:
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join()
        self.httpd.server_close()
        self.engine.close()

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- one request ----

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        call = _Call(h)
        self.metrics.in_flight.add(1)
        try:
            self._route(call)
        except APIError as err:
            self._send_error(call, err)
        except (ClientGone, ConnectionError, TimeoutError):  # the socket broke or stalled while we answered
            call.status, h.close_connection = 499, True  # nginx's code for "client closed the request"
        except Exception:
            self.log(f"error answering {h.command} {call.path}:\n{traceback.format_exc()}")
            if call.headers_sent:
                h.close_connection = True
            else:
                self._send_error(call, APIError(500, "internal server error (see the server log)", type="server_error"))
        finally:
            seconds = time.perf_counter() - call.start
            self.metrics.in_flight.add(-1)
            self.metrics.requests.inc(1, call.route, str(call.status))
            self.metrics.latency.observe(seconds, call.route)
            if self.config.log_requests:
                tokens = f" tokens {call.prompt_tokens}+{call.completion_tokens}" if call.prompt_tokens else ""
                self.log(f'{h.client_address[0]} "{h.command} {call.path}" {call.status} {seconds:.3f}s{tokens}')

    def _route(self, call: _Call) -> None:
        method, path = call.h.command, call.path
        given = call.h.headers.get("Host")
        if self.allowed_hosts is not None and given is not None and host_name(given) not in self.allowed_hosts:
            raise APIError(403, f"this server does not answer to the host {given!r}: it answers to "
                           f"{', '.join(sorted(self.allowed_hosts))} (a page on another domain pointed at this address "
                           f"is refused; serve.py --allowed_hosts adds names)", code="host_not_allowed")
        if method == "OPTIONS":
            return self._preflight(call)
        routes = {"/": ("GET", self._page, False), "/health": ("GET", self._health, False),
                  "/metrics": ("GET", self._metrics, True), "/v1/models": ("GET", self._models, True),
                  "/v1/completions": ("POST", self._completions, True),
                  "/v1/chat/completions": ("POST", self._chat, True)}
        if path.startswith("/v1/models/"):
            routes[path] = ("GET", self._model, True)
        if path not in routes:
            raise APIError(404, f"no route {method} {path}; this server has {', '.join(ROUTES)}", code="not_found")
        want, answer, needs_key = routes[path]
        if method != want:
            raise APIError(405, f"{path} takes {want}, not {method}", code="method_not_allowed", headers={"Allow": want})
        if needs_key:
            self._authorize(call.h)
        answer(call)

    def _authorize(self, h: BaseHTTPRequestHandler) -> None:
        if not self.api_key:
            return
        scheme, _, given = h.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise APIError(401, "no API key given: send the header `Authorization: Bearer <key>`",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(given.strip().encode(), self.api_key.encode()):  # constant time
            raise APIError(401, "incorrect API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    # ---- responses ----

    def _cors_headers(self, call: _Call) -> dict[str, str]:
        origin = call.h.headers.get("Origin")
        if not self.cors or origin is None:
            return {}
        if "*" in self.cors:
            return {"Access-Control-Allow-Origin": "*"}
        return {"Access-Control-Allow-Origin": origin, "Vary": "Origin"} if origin in self.cors else {}

    def _send(self, call: _Call, status: int, body: bytes, content_type: str, headers: dict | None = None) -> None:
        h = call.h
        h.send_response(status)
        for name, value in {"Content-Type": content_type, "Content-Length": str(len(body)),
                            "X-Content-Type-Options": "nosniff", **(headers or {}), **self._cors_headers(call)}.items():
            h.send_header(name, value)
        h.end_headers()
        call.status, call.headers_sent = status, True
        try:
            h.wfile.write(body)
        except OSError:
            raise ClientGone() from None

    def _send_json(self, call: _Call, status: int, obj: dict, headers: dict | None = None) -> None:
        self._send(call, status, json.dumps(obj, ensure_ascii=False).encode(), "application/json", headers)

    def _send_error(self, call: _Call, err: APIError) -> None:
        headers = call.h.headers
        if not call.body_read and (headers.get("Content-Length", "0").strip() != "0" or "Transfer-Encoding" in headers):
            call.h.close_connection = True  # an unread body would be taken for the next request
        try:
            self._send_json(call, err.status, err.body(), err.headers)
        except (ClientGone, OSError):
            call.h.close_connection = True

    def _preflight(self, call: _Call) -> None:
        allowed = self._cors_headers(call)
        if not allowed:
            raise APIError(405, "OPTIONS: cross-origin requests are not enabled on this server (see --cors_origins)",
                           code="method_not_allowed", headers={"Allow": "GET, POST"})
        # the origin is trusted, so the headers its client asks to send are allowed: OpenAI's own
        # JavaScript client adds x-stainless-* headers to every request (a well-formed list only)
        asked = call.h.headers.get("Access-Control-Request-Headers", "")
        headers = asked if HEADER_LIST.fullmatch(asked) else "Authorization, Content-Type"
        self._send(call, 204, b"", "text/plain", {"Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                                                 "Access-Control-Allow-Headers": headers,
                                                 "Access-Control-Max-Age": "600"})

    def _page(self, call: _Call) -> None:
        self._send(call, 200, self.page, "text/html; charset=utf-8", PAGE_HEADERS)

    def _health(self, call: _Call) -> None:
        running = self.engine.running
        body = {"status": "ok" if running else "error", "model": self.served.name, **self.engine.stats()}
        self._send_json(call, 200 if running else 503, body)

    def _metrics(self, call: _Call) -> None:
        self._send(call, 200, self.metrics.render().encode(), "text/plain; version=0.0.4; charset=utf-8")

    def _models(self, call: _Call) -> None:
        self._send_json(call, 200, models_response(self.served))

    def _model(self, call: _Call) -> None:
        name = call.path.removeprefix("/v1/models/")
        if name != self.served.name:
            raise APIError(404, f"The model `{name}` does not exist; this server serves `{self.served.name}`",
                           param="model", code="model_not_found")
        self._send_json(call, 200, model_object(self.served))

    def _read_json(self, call: _Call):
        h = call.h
        if "chunked" in h.headers.get("Transfer-Encoding", "").lower():
            raise APIError(411, "chunked request bodies are not supported: send a Content-Length", code="length_required")
        content_type = h.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            raise APIError(415, f"the body must be JSON sent with `Content-Type: application/json`, got "
                           f"{content_type or 'no Content-Type'}", code="unsupported_media_type")
        try:
            length = int(h.headers.get("Content-Length", ""))
            if length < 0:
                raise ValueError
        except ValueError:
            raise APIError(411, "a POST needs a valid Content-Length header", code="length_required") from None
        if length > self.config.max_body_bytes:
            raise APIError(413, f"the request body is {length} bytes, over this server's limit of "
                           f"{self.config.max_body_bytes} (max_body_bytes)", code="request_too_large")
        try:
            data = h.rfile.read(length)
        except (TimeoutError, OSError):
            h.close_connection = True
            raise ClientGone() from None
        if len(data) < length:
            raise ClientGone()
        call.body_read = True
        try:
            return json.loads(data.decode("utf-8"), parse_constant=_no_constants)
        except UnicodeDecodeError as err:
            raise APIError(400, f"the body is not valid UTF-8: {err}", code="invalid_json") from None
        except ValueError as err:
            raise APIError(400, f"the body is not valid JSON: {err}", code="invalid_json") from None
        except RecursionError:
            raise APIError(400, "the body's JSON is nested too deeply", code="invalid_json") from None

    # ---- generation ----

    def _completions(self, call: _Call) -> None:
        self._generate(call, parse_completion_request(self._read_json(call), self.served))

    def _chat(self, call: _Call) -> None:
        self._generate(call, parse_chat_request(self._read_json(call), self.served))

    def _generate(self, call: _Call, req: GenerationRequest) -> None:
        job = Job(req.choice_prompts, req.configs)
        try:
            self.engine.submit(job)
        except Overloaded as err:
            raise APIError(503, f"the server is busy ({err}); retry shortly", type="server_error", code="overloaded",
                           headers={"Retry-After": "1"}) from None
        call.prompt_tokens = sum(map(len, req.prompts))
        self.metrics.prompt_tokens.inc(call.prompt_tokens)
        rid, created, name = f"{'chatcmpl' if req.chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", int(time.time()), self.served.name
        limit = self.config.request_timeout
        events = job_events(job, call.h.connection, call.start + limit, limit, lambda: self._on_token(call))
        try:
            if not req.stream:
                build = chat_response if req.chat else completion_response
                choices = collect(events, len(job), req.chat)
                return self._send_json(call, 200, build(rid, created, name, choices, self._usage(call)))
            chunked = call.h.request_version != "HTTP/1.0"  # an HTTP/1.0 client reads until the connection closes
            call.h.send_response(200)
            headers = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache",
                       "X-Accel-Buffering": "no", **self._cors_headers(call)}
            headers.update({"Transfer-Encoding": "chunked"} if chunked else {"Connection": "close"})
            for key, value in headers.items():
                call.h.send_header(key, value)
            call.h.end_headers()
            call.status, call.headers_sent, call.h.close_connection = 200, True, not chunked
            call.status = write_stream(call.h.wfile, events, req, rid, created, name, lambda: self._usage(call),
                                       chunked, backlog=lambda: not job.events.empty()) or 200
        finally:
            job.cancel()  # frees the rows of a job that did not finish (client gone, timeout); else a no-op

    def _on_token(self, call: _Call) -> None:
        call.completion_tokens += 1
        self.metrics.completion_tokens.inc()
        if call.first_token is None:
            call.first_token = time.perf_counter() - call.start
            self.metrics.ttft.observe(call.first_token, call.route)

    @staticmethod
    def _usage(call: _Call) -> dict:
        return usage(call.prompt_tokens, call.completion_tokens)


def _no_constants(name: str):
    raise ValueError(f"{name} is not a JSON number")


class _Handler(BaseHTTPRequestHandler):
    """Hands every request to the Server; answers what http.server itself rejects in JSON too."""

    protocol_version = "HTTP/1.1"  # keep-alive; streams use chunked encoding
    server_version = "minillm"
    sys_version = ""

    def do_GET(self) -> None:
        self.server.app.handle(self)

    do_POST = do_OPTIONS = do_PUT = do_DELETE = do_PATCH = do_GET

    def log_request(self, code="-", size="-") -> None:
        pass  # the Server writes its own access line (no headers, no query string)

    def log_message(self, format: str, *args) -> None:
        self.server.app.log(f"{self.client_address[0]} {format % args}")

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """A malformed request line, oversized headers, an unsupported method: OpenAI's error shape."""
        self.log_error("code %d, message %s", code, message)
        self.close_connection = True
        body = json.dumps(error_body(message or HTTPStatus(code).phrase)).encode()
        self.send_response(code, message)
        self.send_header("Content-Type", "application/json")
        self.send_header("Connection", "close")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if getattr(self, "command", None) != "HEAD" and code >= 200 and code not in (204, 304):
            self.wfile.write(body)


class _HTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer with a cap on connections: beyond it, a 503 at once instead of a thread."""

    daemon_threads = True
    request_queue_size = 128  # the listen backlog

    def __init__(self, address, handler, app: Server, max_connections: int):
        self.app = app
        self.connections = threading.BoundedSemaphore(max_connections)
        super().__init__(address, handler)

    def process_request(self, request, client_address) -> None:
        if not self.connections.acquire(blocking=False):
            body = json.dumps(error_body("too many connections; retry shortly", "server_error", code="overloaded")).encode()
            try:
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
                                b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.connections.release()
