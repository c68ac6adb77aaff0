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
    """`tokenizer.encode_ordinary` of each text, on `workers` processes (this one included).

    The texts are cut into `workers` contiguous groups of about equal size; this process encodes the
    first itself (with its warm cache) while forked children encode the rest. A child gets its texts
    and the tokenizer by inheritance (fork), not by pickling, and sends back one flat uint32 array
    plus the length of each text's ids, which pickles as raw bytes.
    """
    groups = _balanced_groups(texts, workers)
    ctx = context()
    children = []
    try:
        for group in groups[1:]:
            receiver, sender = ctx.Pipe(duplex=False)
            child = ctx.Process(target=_encode_worker, args=(tokenizer, group, sender), daemon=True)
            child.start()
            sender.close()
            children.append((child, receiver))
        results = [tokenizer._encode_many(groups[0])]
        for child, receiver in children:
            try:
                status, payload, lengths = receiver.recv()
            except EOFError:
                child.join()
                raise RuntimeError(f"tokenizer worker process {child.pid} died (exit code {child.exitcode})") from None
            if status != "ok":
                raise RuntimeError(f"tokenizer worker process {child.pid} failed:\n{payload}")
            flat = payload.tolist()
            starts = list(itertools.accumulate(lengths, initial=0))
            results.append([flat[a:b] for a, b in zip(starts, starts[1:])])
    finally:
        for child, receiver in children:
            receiver.close()
            child.join(timeout=5)
            if child.is_alive():
                child.kill()
    return [ids for group in results for ids in group]


def _balanced_groups(texts: list[str], n: int) -> list[list[str]]:
    """`texts` cut into `n` contiguous groups of about equal total length (some may be empty)."""
    total = sum(map(len, texts))
    groups: list[list[str]] = [[] for _ in range(n)]
    done = 0
    for text in texts:
        groups[min(n - 1, done * n // max(total, 1))].append(text)
        done += len(text)
    return groups


def _encode_worker(tokenizer, texts: list[str], sender) -> None:
    """Child side of `encode_in_processes`: encode, send (status, ids, lengths), exit."""
    try:
        ids = array.array("I")
        lengths = []
        for encoded in tokenizer._encode_many(texts):
            ids.extend(encoded)
            lengths.append(len(encoded))
        sender.send(("ok", ids, lengths))
    except BaseException:  # report any failure to the parent rather than dying silently
        sender.send(("error", traceback.format_exc(), None))
    finally:
        sender.close()
