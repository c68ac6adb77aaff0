"""The byte-pair-encoding core as pure functions: apply merges to one chunk, render token bytes.

A tokenizer's merges are an ordered list: merge number r (its rank) turns the adjacent pair
(left id, right id) into one new id. Encoding a chunk starts from its UTF-8 bytes, one id per byte,
and repeatedly applies the lowest-ranked merge present, at its leftmost position, until no adjacent
pair has a merge. That is what tiktoken does, and it gives the same result as GPT-2's original
encoder (which applies the lowest-ranked merge at all its positions at once, left to right): a
pair made by merge r can only take part in merges ranked after r, so applying merge r at its
leftmost place never makes another place of it unreachable before its turn. Training (train.py)
applies each merge left to right over every chunk, so a trained tokenizer re-encodes its training
chunks into exactly the tokens training ended with (tested).

`encode_chunk` is O(n^2) in the chunk length n but fast for the short chunks that text splits into;
chunks longer than LONG_CHUNK (a run of 100,000 spaces, a base64 blob) go to `encode_long_chunk`, a
linked list plus a heap, O(n log n), with the same result (tested).

`encode_chunks_batch` runs the same algorithm on thousands of chunks at once with numpy, one merge
per chunk per step: a large new text (a first pass over a corpus) has tens of thousands of chunks
the cache has not seen, and in Python each merge step costs about a microsecond of interpreter time.
Same results again (tested), about 4x faster on such batches.
"""

from __future__ import annotations

import contextlib
import gc
import heapq
from itertools import chain
from typing import NamedTuple

import numpy as np

NO_MERGE = 1 << 62  # the rank of a pair that has no merge: above every real rank
LONG_CHUNK = 256


def encode_chunk(ids: list[int], ranks: dict[tuple[int, int], int], results: list[int]) -> list[int]:
    """Apply the merges to `ids` (modified in place and returned).

    ranks:   (left id, right id) -> rank of the merge of that pair
    results: rank -> id of the token that merge makes
    """
    if len(ids) < 2:
        return ids
    if len(ids) > LONG_CHUNK:
        return encode_long_chunk(ids, ranks, results)
    get = ranks.get
    # pair_ranks[i] is the rank of the pair (ids[i], ids[i + 1]); min and index run in C
    pair_ranks = [get(pair, NO_MERGE) for pair in zip(ids, ids[1:])]
    while pair_ranks:
        rank = min(pair_ranks)
        if rank == NO_MERGE:
            break
        i = pair_ranks.index(rank)
        ids[i] = results[rank]
        del ids[i + 1]
        del pair_ranks[i]  # the entries right of i now line up with the shortened ids again ...
        if i < len(pair_ranks):  # ... except the pair that now starts at i, and the one ending at i
            pair_ranks[i] = get((ids[i], ids[i + 1]), NO_MERGE)
        if i > 0:
            pair_ranks[i - 1] = get((ids[i - 1], ids[i]), NO_MERGE)
    return ids


def encode_long_chunk(ids: list[int], ranks: dict[tuple[int, int], int], results: list[int]) -> list[int]:
    """`encode_chunk` for long chunks: same result, O(n log n).

    Positions form a doubly linked list; the heap holds (rank, position) for every adjacent pair
    with a merge, so the lowest rank comes first and, among equal ranks, the leftmost position (a
    position keeps its original index, so index order is text order). An entry whose pair has
    changed since it was pushed is stale and skipped when popped (lazy deletion).
    """
    n = len(ids)
    ids = list(ids)
    nxt = list(range(1, n + 1))  # n means "no next position"
    prv = list(range(-1, n - 1))
    heap = [(r, i) for i, pair in enumerate(zip(ids, ids[1:])) if (r := ranks.get(pair)) is not None]
    heapq.heapify(heap)
    while heap:
        rank, i = heapq.heappop(heap)
        j = nxt[i]
        if ids[i] < 0 or j >= n or ranks.get((ids[i], ids[j])) != rank:
            continue  # stale: position i was merged away, or its pair changed
        ids[i] = results[rank]
        ids[j] = -1  # position j is merged into i
        k = nxt[j]
        nxt[i] = k
        if k < n:
            prv[k] = i
            if (r := ranks.get((ids[i], ids[k]))) is not None:
                heapq.heappush(heap, (r, i))
        h = prv[i]
        if h >= 0 and (r := ranks.get((ids[h], ids[i]))) is not None:
            heapq.heappush(heap, (r, h))
    return [t for t in ids if t >= 0]


class PairTable(NamedTuple):
    """The merges as a numpy hash table (open addressing, linear probing), for `encode_chunks_batch`:
    a vectorised lookup of a million pairs costs about one random memory access each."""

    keys: np.ndarray  # slot -> (left << 32 | right) of the merge stored there, or EMPTY
    ranks: np.ndarray  # slot -> that merge's rank
    results: np.ndarray  # rank -> the id the merge makes
    byte_ids: np.ndarray  # byte value -> id

    @classmethod
    def build(cls, ranks: dict[tuple[int, int], int], results: list[int], byte_ids) -> "PairTable":
        pairs = np.fromiter(chain.from_iterable(ranks), dtype=np.int64, count=2 * len(ranks)).reshape(-1, 2)
        keys = (pairs[:, 0] << 32) | pairs[:, 1]
        values = np.fromiter(ranks.values(), dtype=np.int64, count=len(ranks))
        size = 1 << max(4, (2 * len(keys)).bit_length())  # at most half full: short probe runs
        table_keys = np.full(size, EMPTY, dtype=np.int64)
        table_ranks = np.zeros(size, dtype=np.int64)
        todo, slot = np.arange(len(keys)), _hash(keys, size)
        while len(todo):  # each round, every free slot takes the first key that wants it
            free = table_keys[slot] == EMPTY
            taken, first = np.unique(slot[free], return_index=True)
            winners = todo[free][first]
            table_keys[taken], table_ranks[taken] = keys[winners], values[winners]
            placed = np.zeros(len(keys), dtype=bool)
            placed[winners] = True
            left = ~placed[todo]
            todo, slot = todo[left], (slot[left] + 1) & (size - 1)  # the rest try the next slot
        return cls(table_keys, table_ranks, np.array(results, dtype=np.int64), np.array(byte_ids, dtype=np.int64))

    def lookup(self, left: np.ndarray, right: np.ndarray) -> np.ndarray:
        """The merge rank of each pair (left[i], right[i]), NO_MERGE where there is none."""
        key = (left << 32) | right
        out = np.full(len(key), NO_MERGE, dtype=np.int64)
        todo, slot = np.arange(len(key)), _hash(key, len(self.keys))
        while len(todo):
            found = self.keys[slot]
            hit = found == key[todo]
            out[todo[hit]] = self.ranks[slot[hit]]
            go_on = ~hit & (found != EMPTY)  # a different key sits here: probe the next slot
            todo, slot = todo[go_on], (slot[go_on] + 1) & (len(self.keys) - 1)
        return out


EMPTY = -1


def _hash(keys: np.ndarray, size: int) -> np.ndarray:
    """Fibonacci hashing: multiply by 2^64 / golden ratio (wrapping), keep the top log2(size) bits."""
    product = keys.view(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    return (product >> np.uint64(64 - size.bit_length() + 1)).astype(np.int64)


def encode_chunks_batch(chunks: list[bytes], table: PairTable) -> list[list[int]]:
    """`encode_chunk` of every chunk (as UTF-8 bytes), all at once with numpy; same results.

    The chunks lie end to end in one array `tok`; chunk s is tok[starts[s] : starts[s] + lens[s]],
    and rank[i] is the merge rank of the pair (tok[i], tok[i+1]), NO_MERGE at each chunk's last
    position. Each step takes the lowest rank of every chunk (minimum.reduceat), merges at its
    leftmost position, deletes the right half of each merged pair, and looks up only the two pairs
    around each merge. A chunk with nothing left to merge is finished and leaves the arrays.
    """
    out: list[list[int] | None] = [None] * len(chunks)
    live = [i for i, data in enumerate(chunks) if len(data) >= 2]
    for i in set(range(len(chunks))).difference(live):
        out[i] = table.byte_ids[np.frombuffer(chunks[i], dtype=np.uint8)].tolist()
    if not live:
        return out
    which = np.array(live, dtype=np.int64)  # the chunk index of each live segment
    lens = np.array([len(chunks[i]) for i in live], dtype=np.int64)
    tok = table.byte_ids[np.frombuffer(b"".join(chunks[i] for i in live), dtype=np.uint8)]
    starts = np.concatenate(([0], np.cumsum(lens[:-1])))
    rank = np.empty(len(tok), dtype=np.int64)
    rank[:-1] = table.lookup(tok[:-1], tok[1:])
    rank[starts + lens - 1] = NO_MERGE  # the pair from a chunk's last token into the next chunk
    while True:
        lowest = np.minimum.reduceat(rank, starts)
        done = lowest == NO_MERGE
        if done.any():
            done_tokens = np.repeat(done, lens)
            flat, pos = tok[done_tokens].tolist(), 0
            for i, n in zip(which[done].tolist(), lens[done].tolist()):
                out[i] = flat[pos:pos + n]
                pos += n
            if done.all():
                return out
            keep = ~done_tokens
            tok, rank = tok[keep], rank[keep]
            which, lens, lowest = which[~done], lens[~done], lowest[~done]
            starts = np.concatenate(([0], np.cumsum(lens[:-1])))
        at = np.flatnonzero(rank == np.repeat(lowest, lens))
        if len(at) > len(lens):  # the lowest rank occurs twice in some chunk: keep each chunk's leftmost
            segment = np.searchsorted(starts, at, side="right") - 1
            first = np.ones(len(at), dtype=bool)
            first[1:] = segment[1:] != segment[:-1]
            at = at[first]
        tok[at] = table.results[rank[at]]
        keep = np.ones(len(tok), dtype=bool)
        keep[at + 1] = False
        tok, rank = tok[keep], rank[keep]
        shift = np.arange(len(at))  # each chunk before has lost one token
        at, starts, lens = at - shift, starts - shift, lens - 1
        has_right = at + 1 < starts + lens
        right = at[has_right]
        rank[right] = table.lookup(tok[right], tok[right + 1])
        rank[at[~has_right]] = NO_MERGE
        left = at[at > starts] - 1
        rank[left] = table.lookup(tok[left], tok[left + 1])


@contextlib.contextmanager
def gc_paused():
    """Pause Python's cyclic garbage collector during a burst of allocations.

    Encoding a large new text and training allocate hundreds of thousands of small lists, tuples
    and sets that never form reference cycles, and every 70,000 or so of them set off a full
    collection that walks every live object (the chunk lists, the cache, the pair index): measured
    at 20-40% of the time. Reference counting still frees everything at once; the collector is
    switched back on afterwards if it was on before.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def merge_pair(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace every occurrence of `pair` in `ids`, left to right and non-overlapping, by `new_id`."""
    a, b = pair
    out: list[int] = []
    i, n = 0, len(ids)
    while i < n:
        if ids[i] == a and i + 1 < n and ids[i + 1] == b:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def render(token: bytes) -> str:
    """A token's bytes as a readable, unambiguous quoted string: '" the"', '"\\n"', '"\\xe2\\x80"'.

    Valid UTF-8 shows as text; control and other invisible characters, quotes and backslashes are
    escaped; bytes that are not (complete) UTF-8 show as \\xNN.
    """
    out = []
    for ch in token.decode("utf-8", "surrogateescape"):
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte, escaped by surrogateescape
            out.append(f"\\x{code - 0xDC00:02x}")
        elif ch in '"\\':
            out.append("\\" + ch)
        elif ch.isprintable():
            out.append(ch)
        else:
            out.append(repr(ch)[1:-1])  # \n, \t, \x0b, \u200b, ...
    return '"' + "".join(out) + '"'
