"""Answering one generation request once its Job is in the engine: wait for the Chunks (within the
request's time limit, noticing a client that has gone), then either collect them into one JSON body
or write them as server-sent events while they come. minillm.server's request threads call this; it
sees HTTP only as a socket to watch and a chunked body to write.

Waiting: the thread blocks on the job's queue for at most POLL seconds at a time; between events (and
at least every POLL seconds) it checks the socket. A closed connection reads as end-of-file, so a
client that disconnects is noticed within POLL seconds even while its text is held back (a possible
stop string) and nothing is being written; a failed write notices it at once. Either way ClientGone
is raised and the server cancels the job, which frees its KV-cache rows at the engine's next step.

Streams: one `data: {json}` event per piece of text, OpenAI's chunk shapes (minillm.openai_api):
chat streams open each choice with {"role": "assistant"}; each choice ends with a chunk carrying its
finish_reason; with include_usage a last chunk has the usage and no choices; then `data: [DONE]`.
Chat replies lose their leading whitespace (the transcript ends in "Assistant:"), in both forms.
"""

from __future__ import annotations

import json
import queue
import select
import socket
import time
from collections.abc import Callable, Iterator

from minillm.engine import Job, JobError
from minillm.generate import Chunk
from minillm.openai_api import APIError, GenerationRequest, chat_chunk, completion_chunk, usage_chunk

POLL = 0.1  # seconds between checks that a waiting request's client is still connected


class ClientGone(Exception):
    """The client closed its connection: stop working for it."""


def client_gone(sock: socket.socket) -> bool:
    """True when the peer has closed the connection (the socket reads end-of-file) or it broke.
    A client that half-closes its socket after sending its request reads as gone too."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


def job_events(job: Job, sock: socket.socket, deadline: float, limit: float,
               on_token: Callable[[], None]) -> Iterator[Chunk]:
    """The job's Chunks until every sequence has finished; `on_token` is called once per generated
    token. Raises ClientGone, or APIError 504 past `deadline` (time.perf_counter()) and 500 when the
    engine fails the job."""
    remaining, next_check = len(job), 0.0
    while remaining:
        now = time.perf_counter()
        if now >= deadline:
            raise APIError(504, f"the request ran past the server's time limit of {limit:g}s (request_timeout) "
                           "and was stopped", type="server_error", code="timeout")
        try:
            event = job.events.get(timeout=min(POLL, deadline - now))
        except queue.Empty:
            event = None
        if event is None or time.perf_counter() >= next_check:
            if client_gone(sock):
                raise ClientGone()
            next_check = time.perf_counter() + POLL
        if event is None:
            continue
        if isinstance(event, JobError):
            raise APIError(500, event.message, type="server_error")
        if event.token is not None:
            on_token()
        remaining -= event.finish_reason is not None
        yield event


def collect(events: Iterator[Chunk], choices: int, chat: bool) -> list[tuple[str, str]]:
    """(text, finish_reason) of each choice, in index order, once all have finished."""
    texts, reasons = [""] * choices, [""] * choices
    for event in events:
        texts[event.index] += event.text
        reasons[event.index] = event.finish_reason or reasons[event.index]
    return list(zip([t.lstrip() for t in texts] if chat else texts, reasons))


def write_chunk(wfile, data: bytes, chunked: bool = True) -> None:
    """One piece of a `Transfer-Encoding: chunked` body (b"" ends it), or of a body that ends when the
    connection closes (HTTP/1.0 clients); a broken pipe means the client left."""
    try:
        if chunked:
            wfile.write(b"%X\r\n%s\r\n" % (len(data), data))
        elif data:
            wfile.write(data)
        wfile.flush()
    except OSError:
        raise ClientGone() from None


def write_stream(wfile, events: Iterator[Chunk], req: GenerationRequest, rid: str, created: int, model: str,
                 final_usage: Callable[[], dict], chunked: bool = True, backlog: Callable[[], bool] = lambda: False) -> int | None:
    """Write the events as SSE (the status line and headers are sent already) and end the body.
    Returns the status of an APIError raised on the way, which is sent as an error event (OpenAI's
    client raises it), or None when the stream completed. While `backlog()` says more events are
    already waiting, their SSE events are gathered into one write (fewer system calls when this
    thread falls behind the engine); otherwise each is sent at once."""
    pending: list[bytes] = []

    def send(obj: dict) -> None:
        pending.append(b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n")

    def flush() -> None:
        if pending:
            write_chunk(wfile, b"".join(pending), chunked)
            pending.clear()

    choices, failed = len(req.configs), None
    if req.chat:
        for k in range(choices):
            send(chat_chunk(rid, created, model, k, {"role": "assistant", "content": ""}))
        flush()
    started = [not req.chat] * choices  # chat: drop whitespace until a reply's first visible character
    try:
        for event in events:
            text, k = event.text, event.index
            if not started[k]:
                text = text.lstrip()
                started[k] = bool(text)
            if text:
                send(chat_chunk(rid, created, model, k, {"content": text}) if req.chat
                     else completion_chunk(rid, created, model, k, text))
            if event.finish_reason:
                send(chat_chunk(rid, created, model, k, {}, event.finish_reason) if req.chat
                     else completion_chunk(rid, created, model, k, "", event.finish_reason))
            if not backlog():
                flush()
        if req.include_usage:
            send(usage_chunk(req.chat, rid, created, model, final_usage()))
    except APIError as err:  # the status line is gone already: the error travels in the stream
        failed = err.status
        send(err.body())
    pending.append(b"data: [DONE]\n\n")
    flush()
    write_chunk(wfile, b"", chunked)  # the end of the chunked body
    return failed
