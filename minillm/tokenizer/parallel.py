"""Worker processes for the tokenizer's two parallel jobs: pre-splitting a training corpus and
encoding a batch of documents. Python threads would not help (the work holds the GIL).

Start method: "fork" where the platform has it safely (Linux), because a forked worker inherits the
tokenizer and its chunk cache for free, while a "spawn"ed one must import minillm (and with it
torch, about 2 s) and unpickle the tokenizer. Elsewhere (macOS, Windows) "spawn" is used.
"""

from __future__ import annotations

import array
import itertools
import multiprocessing
import os
import sys
import traceback


def cpu_count() -> int:
    """The CPUs this process may run on (respects taskset/cgroup affinity where the OS tells)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def resolve_workers(num_workers: int | None) -> int:
    """None -> every CPU; otherwise the number given, which must be at least 1."""
    if num_workers is None:
        return cpu_count()
    if not isinstance(num_workers, int) or num_workers < 1:
        raise ValueError(f"num_workers must be a positive integer or None, got {num_workers!r}")
    return num_workers


def context():
    return multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")


def process_pool(num_workers: int):
    """A multiprocessing pool of `num_workers` processes; use it as a context manager."""
    return context().Pool(num_workers)


def encode_in_processes(tokenizer, texts: list[str], workers: int) -> list[list[int]]:
    """`tokenizer.encode_ordinary` of each text, on `workers` processes (this one included), started
    for this one call."""
    with EncodingWorkers(tokenizer, workers) as pool:
        return pool.encode(texts)


class EncodingWorkers:
    """Processes that encode batches of documents with one tokenizer, kept for as many batches as
    the caller has (`prepare.py` sends thousands of documents at a time), so each worker's chunk
    cache stays warm from batch to batch, as the caller's own does.

    Each batch is cut into `workers` contiguous groups of about equal size; this process encodes the
    first itself while the others encode the rest. A worker gets its texts through a pipe and sends
    back one flat uint32 array plus the length of each text's ids, which pickles as raw bytes. With
    fork (Linux) a worker inherits the tokenizer and its cache as they are when it starts.
    """

    def __init__(self, tokenizer, workers: int):
        self.tokenizer = tokenizer
        self.children: list = []
        ctx = context()
        try:
            for _ in range(workers - 1):
                ours, theirs = ctx.Pipe()
                child = ctx.Process(target=_encode_worker, args=(tokenizer, theirs), daemon=True)
                child.start()
                theirs.close()
                self.children.append((child, ours))
        except BaseException:
            self.close()
            raise

    def encode(self, texts: list[str]) -> list[list[int]]:
        groups = _balanced_groups(texts, len(self.children) + 1)
        for (child, conn), group in zip(self.children, groups[1:]):
            try:
                conn.send(group)
            except OSError:
                _died(child)
        results = [self.tokenizer._encode_many(groups[0])]
        for child, conn in self.children:
            try:
                status, payload, lengths = conn.recv()
            except EOFError:
                _died(child)
            if status != "ok":
                raise RuntimeError(f"tokenizer worker process {child.pid} failed:\n{payload}")
            flat = payload.tolist()
            starts = list(itertools.accumulate(lengths, initial=0))
            results.append([flat[a:b] for a, b in zip(starts, starts[1:])])
        return [ids for group in results for ids in group]

    def close(self) -> None:
        """Tell the workers to exit and wait for them (a worker that does not stop is killed)."""
        for child, conn in self.children:
            try:
                conn.send(None)
            except OSError:  # it is gone already
                pass
            conn.close()
        for child, _ in self.children:
            child.join(timeout=5)
            if child.is_alive():
                child.kill()
        self.children = []

    def __enter__(self) -> "EncodingWorkers":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _died(child) -> None:
    child.join()
    raise RuntimeError(f"tokenizer worker process {child.pid} died (exit code {child.exitcode})") from None


def _balanced_groups(texts: list[str], n: int) -> list[list[str]]:
    """`texts` cut into `n` contiguous groups of about equal total length (some may be empty)."""
    total = sum(map(len, texts))
    groups: list[list[str]] = [[] for _ in range(n)]
    done = 0
    for text in texts:
        groups[min(n - 1, done * n // max(total, 1))].append(text)
        done += len(text)
    return groups


def _encode_worker(tokenizer, conn) -> None:
    """Worker side of `EncodingWorkers`: until told to stop (None), encode each group of texts it
    receives and send back (status, ids, lengths)."""
    try:
        while (texts := conn.recv()) is not None:
            try:
                ids = array.array("I")
                lengths = []
                for encoded in tokenizer._encode_many(texts):
                    ids.extend(encoded)
                    lengths.append(len(encoded))
                conn.send(("ok", ids, lengths))
            except Exception:  # report the failure to the parent rather than dying silently
                conn.send(("error", traceback.format_exc(), None))
    except (EOFError, KeyboardInterrupt):  # the parent is gone, or Ctrl-C reached the whole group
        pass
    finally:
        conn.close()
