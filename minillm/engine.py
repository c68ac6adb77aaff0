"""Continuous batching: one scheduler thread owns the model and a KV cache with a row per slot, and
advances every running sequence together, one token per step; sequences join and leave the batch
between steps, so a request never waits for another one to finish.

    request threads --Engine.submit(Job)--> waiting line (bounded: Overloaded beyond it)
    scheduler loop, one step:
        free the rows of cancelled jobs
        admit waiting sequences into free rows: one prefill for all of them (minillm.generate.prefill)
        each row's next token from its logits (SequenceState.advance): its Chunks go to the job's queue
        one decode_step for every row still going: the logits for the next step
    request threads <--Job.events-- Chunk (token, text, finish_reason) or JobError

Why one thread: the model and its cache must see one caller at a time; the HTTP threads only wait on
their job's queue. Why throughput grows with the clients: a decode step over 16 rows costs little
more than over one on a small model, since the weights are read once per step, not once per row, and
on a CPU the per-step Python and dispatch overhead is shared too.

A job is one request: several sequences (OpenAI's `n` choices, several prompts), each with its own
SamplingConfig (and seed). Sequence k's Chunks carry index k. Its text goes through the tokenizer's
incremental decoder, so no Chunk splits a UTF-8 character, and stop strings are held back until known.

Limits: a sequence must fit the context window (prompt + max_new_tokens <= block_size; `submit`
raises ValueError otherwise). There is no sliding window here on purpose: a server should refuse a
request that does not fit (the HTTP layer answers 400) rather than silently forget a prompt's start.
Waiting sequences are admitted first in, first out; a long prompt's prefill runs between two decode
steps and delays the other rows by that long (no chunked prefill).

Cancellation (`Job.cancel`: the client went away, or its time ran out) is seen at the start of the next
step: the job's rows are freed and the next waiting sequence can take them. A failure inside a model
call fails the jobs in that step with a JobError and frees their rows; the engine keeps serving.
"""

from __future__ import annotations

import queue
import threading
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from minillm.generate import Chunk, SamplingConfig, SequenceState, decode_step, prefill
from minillm.kv_cache import KVCache


class Overloaded(Exception):
    """The waiting line is full: try again later (the server answers 503 with Retry-After)."""


@dataclass
class JobError:
    """An event that ends a job: the engine could not finish it (a failed model call, shutdown)."""

    message: str


class Job:
    """One request's sequences: prompts[k] is generated with configs[k] (whose seed must be set);
    every Chunk of sequence k, and finally one with finish_reason set, arrives on `events`."""

    def __init__(self, prompts: Sequence[Sequence[int]], configs: Sequence[SamplingConfig]):
        if len(prompts) != len(configs) or not prompts:
            raise ValueError(f"a job needs one config per prompt and at least one prompt, got {len(prompts)} and {len(configs)}")
        if any(c.seed is None for c in configs):
            raise ValueError("every sequence of a job needs a seed (the caller draws one, so it can report it)")
        self.prompts = [list(p) for p in prompts]
        self.configs = list(configs)
        self.events: queue.SimpleQueue[Chunk | JobError] = queue.SimpleQueue()
        self._cancelled = threading.Event()

    def __len__(self) -> int:
        return len(self.prompts)

    def cancel(self) -> None:
        """Stop generating: the rows are freed at the next step (harmless once the job has ended)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


@dataclass
class _Slot:
    """A cache row in use: which job and sequence it holds, and that sequence's state."""

    job: Job
    state: SequenceState


class Engine:
    """The scheduler: `start()` its thread, `submit(job)` from any thread, `close()` at the end."""

    def __init__(self, model, tokenizer, max_batch: int = 8, queue_size: int = 32,
                 log: Callable[[str], None] | None = None):
        if max_batch < 1 or queue_size < 0:
            raise ValueError(f"max_batch must be >= 1 and queue_size >= 0, got {max_batch} and {queue_size}")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_batch, self.queue_size = max_batch, queue_size
        self.cache = KVCache.for_model(model, max_batch)
        self.log = log or (lambda line: None)
        self._slots: list[_Slot | None] = [None] * max_batch  # touched by the scheduler thread only
        self._waiting: deque[tuple[Job, int]] = deque()  # (job, sequence index), first in first out
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.failure: str | None = None  # set if the scheduler loop itself died (health turns red)
        self.steps = 0  # decode steps run
        self.tokens = 0  # tokens generated, for every job (cancelled ones included)

    # ---- called from request threads ----

    def submit(self, job: Job) -> None:
        """Queue a job; raises Overloaded when the waiting line is full, ValueError when a sequence
        cannot fit the context window."""
        block = self.cache.max_len
        for k, (prompt, config) in enumerate(zip(job.prompts, job.configs)):
            if not prompt or len(prompt) + config.max_new_tokens > block:
                raise ValueError(f"sequence {k}: {len(prompt)} prompt tokens + {config.max_new_tokens} new tokens "
                                 f"do not fit the context window of {block} (and a prompt needs at least one token)")
        with self._cond:
            if self._closed or self.failure:
                raise Overloaded("the engine is not running")
            if len(job) > self._unclaimed_rows() and self._waiting_jobs() >= self.queue_size:
                raise Overloaded(f"{self._waiting_jobs()} requests are already waiting (queue_size {self.queue_size})")
            self._waiting.extend((job, k) for k in range(len(job)))
            self._cond.notify()

    @property
    def running(self) -> bool:
        """The scheduler thread is up and has not died."""
        return self.failure is None and self._thread is not None and self._thread.is_alive()

    def stats(self) -> dict[str, int]:
        """Rows in use, rows in all, requests waiting for a row: for /health and /metrics."""
        with self._cond:
            waiting = self._waiting_jobs()
        return {"busy": sum(s is not None for s in self._slots), "slots": self.max_batch, "waiting": waiting}

    def _waiting_jobs(self) -> int:
        return len({id(job) for job, _ in self._waiting if not job.cancelled})

    def _unclaimed_rows(self) -> int:
        return sum(s is None for s in self._slots) - len(self._waiting)

    # ---- the scheduler thread ----

    def start(self) -> "Engine":
        if self._thread is not None:
            return self
        self._thread = threading.Thread(target=self._run, name="minillm-engine", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop the loop; jobs still waiting or running get a JobError."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
        self._fail_all("the server is shutting down")

    def _run(self) -> None:
        logits: dict[int, torch.Tensor] = {}  # row -> logits for its next token
        try:
            while True:
                with self._cond:
                    while not self._closed and not self._waiting and not any(self._slots):
                        self._cond.wait()
                    if self._closed:
                        return
                    admitted = self._admit()
                try:
                    self._step(admitted, logits)
                except Exception:  # a failed model call: fail this step's jobs, keep serving
                    self.log(f"engine: a generation step failed; its requests get a 500:\n{traceback.format_exc()}")
                    logits.clear()
                    for row, slot in enumerate(self._slots):
                        if slot is not None:
                            slot.job.events.put(JobError("generation failed inside the model (see the server log)"))
                            slot.job.cancel()
                            self._slots[row] = None
        except BaseException:  # a bug in the loop itself: say so on /health rather than hang requests
            self.failure = traceback.format_exc()
            self.log(f"engine: the scheduler stopped:\n{self.failure}")
            self._fail_all("the generation engine stopped (see the server log)")

    def _admit(self) -> list[int]:
        """Move waiting sequences into free rows (under the lock); returns the rows filled."""
        for row, slot in enumerate(self._slots):
            if slot is not None and slot.job.cancelled:
                self._slots[row] = None
        rows = []
        free = [row for row, slot in enumerate(self._slots) if slot is None]
        while self._waiting and free:
            job, k = self._waiting.popleft()
            if job.cancelled:
                continue
            config = job.configs[k]
            state = SequenceState(k, list(job.prompts[k]), config, self.model, self.tokenizer, config.seed)
            row = free.pop(0)
            self._slots[row] = _Slot(job, state)
            rows.append(row)
        return rows

    def _step(self, admitted: list[int], logits: dict[int, torch.Tensor]) -> None:
        for row in [r for r in logits if self._slots[r] is None]:  # cancelled since the last step
            del logits[row]
        if admitted:
            out = prefill(self.model, self.cache, [self._slots[r].state.context for r in admitted], admitted)
            logits.update(zip(admitted, out))
        going = []
        for row in sorted(logits):
            slot = self._slots[row]
            for chunk in slot.state.advance(logits[row]):
                slot.job.events.put(chunk)
                self.tokens += chunk.token is not None
            if slot.state.finish_reason:
                self._slots[row] = None
            else:
                going.append(row)
        logits.clear()
        if going:
            tokens = [self._slots[r].state.context[-1] for r in going]
            logits.update(zip(going, decode_step(self.model, self.cache, tokens, going)))
            self.steps += 1

    def _fail_all(self, message: str) -> None:
        with self._cond:
            jobs = {id(job): job for job, _ in self._waiting}
            jobs.update({id(s.job): s.job for s in self._slots if s is not None})
            self._waiting.clear()
            self._slots = [None] * self.max_batch
        for job in jobs.values():
            job.events.put(JobError(message))
            job.cancel()

