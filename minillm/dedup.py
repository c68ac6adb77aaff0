"""Duplicate detection: exact (a hash of the normalised text) and near (MinHash + LSH banding).

Exact: `exact_key` hashes the text after casefolding and collapsing whitespace, so two documents
that differ only in case or spacing count as the same document.

Near: two documents are near-duplicates when the Jaccard similarity of their sets of word
shingles (runs of `shingle_words` consecutive words) is at least `threshold`. Comparing every pair
is quadratic, so (Broder 1997; Leskovec, Rajaraman & Ullman, "Mining of Massive Datasets", ch. 3):
- MinHash: each of `num_perm` random hash functions maps a shingle set to its smallest hash value;
  two sets agree on one of these minima with probability equal to their Jaccard similarity, so the
  share of agreeing positions in two signatures estimates it.
- LSH banding: cut the signature into `bands` bands of `rows` values; documents that agree on all
  of one band become candidates. A pair with similarity s becomes a candidate with probability
  1 - (1 - s^rows)^bands, an S-curve; `lsh_params` picks the (bands, rows) whose curve best
  separates pairs below and above the threshold. Candidates are then confirmed on the full
  signature, so a false candidate costs time, never a wrong decision.

Hash functions are deterministic (a polynomial hash of each word's bytes, another over the words
of a shingle, and multiply-shift permutations drawn from a numpy generator seeded with `seed`): the same corpus and
seed give the same decisions on any machine and in any process.

`DuplicateIndex` holds what has been kept so far; `minillm.data` walks the documents in a fixed
order (test, then val, then train; in reading order within each) and asks it about each one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

_SHINGLE_MIX = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit constant (2^64 / golden ratio)
_EMPTY = np.zeros(0, dtype=np.uint32)
# shingles hashed at a time: a (1024, num_perm) block of uint64 is 1 MB at 128 permutations, and a
# 30 MB document never needs its whole (shingles, num_perm) matrix (gigabytes) at once
_SHINGLE_BLOCK = 1024


@dataclass
class DedupConfig:
    """Which duplicates are removed and how near a near-duplicate is."""

    exact_dedup: bool = True  # drop documents whose normalised text was already kept
    near_dedup: bool = True  # drop near-duplicates (MinHash + LSH over word shingles)
    near_threshold: float = 0.8  # Jaccard similarity of word-shingle sets that counts as near
    shingle_words: int = 5  # words per shingle
    num_perm: int = 128  # MinHash signature length (memory: 4 bytes each per document)
    cross_split_dedup: bool = True  # drop train/val documents that duplicate a val/test document
    seed: int = 0  # seeds the MinHash permutations (a plain --seed also seeds the hash split)

    def __post_init__(self) -> None:
        if not 0.0 < self.near_threshold <= 1.0:
            raise ValueError(f"DedupConfig.near_threshold must be in (0, 1], got {self.near_threshold}")
        if self.shingle_words < 1:
            raise ValueError(f"DedupConfig.shingle_words must be at least 1, got {self.shingle_words}")
        if not 2 <= self.num_perm <= 1024:
            raise ValueError(f"DedupConfig.num_perm must be in [2, 1024], got {self.num_perm}")


def exact_key(text: str) -> bytes:
    """16-byte digest of the text, casefolded and with all whitespace runs made one space."""
    return hashlib.blake2b(" ".join(text.casefold().split()).encode("utf-8"), digest_size=16).digest()


def _word_byte_table() -> np.ndarray:
    """uint8 -> is it part of a word: ASCII letters, digits and "_", and every byte of a non-ASCII
    UTF-8 character (so words in any script hash whole; "don’t" is one word)."""
    table = np.zeros(256, dtype=bool)
    for lo, hi in ((48, 57), (65, 90), (97, 122), (95, 95), (128, 255)):
        table[lo : hi + 1] = True
    return table


_WORD_BYTES = _word_byte_table()
_BYTE_MIX = np.uint64(0x100000001B3)  # odd: invertible mod 2^64 (the FNV-1 64-bit prime)
_BYTE_MIX_INVERSE = np.uint64(pow(0x100000001B3, -1, 2**64))
# bytes hashed at a time: the prefix sums and powers cost 8-16 bytes per byte, so a long text goes in
# blocks cut between words (a word's hash depends only on its own bytes: blocks give the same hashes)
_WORD_BLOCK = 1 << 20


def byte_powers(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(M^j, M^-j) mod 2^64 for j = 0 .. n-1, M the byte-mixing constant."""
    factors = np.full((2, max(n, 1)), [[_BYTE_MIX], [_BYTE_MIX_INVERSE]], dtype=np.uint64)
    factors[:, 0] = 1
    with np.errstate(over="ignore"):
        powers = np.cumprod(factors, axis=1)
    return powers[0], powers[1]


def word_hashes(text: str, powers: Callable[[int], tuple[np.ndarray, np.ndarray]] = byte_powers,
                block: int = _WORD_BLOCK) -> np.ndarray:
    """A 64-bit hash of each word of the lowercased text, in order, computed without a Python loop
    (but one per `block` bytes of text, so memory stays a small multiple of the block).

    Word i spanning bytes [s, e) hashes to sum((b[j] + 1) * M^(j - s) for j in [s, e)) mod 2^64:
    from prefix sums P[e] - P[s] of (b[j] + 1) * M^j, scaled back by M^-s (M is odd, so M^-1 mod
    2^64 exists; numpy's uint64 arithmetic wraps mod 2^64, exactly what this needs). `powers(n)`
    gives at least n powers (MinHasher passes a cached table).
    """
    data = np.frombuffer(text.lower().encode("utf-8"), dtype=np.uint8)
    if data.size <= block:
        return _block_word_hashes(data, powers)
    outside = ~_WORD_BYTES[data]  # bytes that are in no word: blocks end after one
    parts, begin = [], 0
    while begin < data.size:
        end = begin + block
        if end < data.size:
            gaps = np.flatnonzero(outside[begin:end])
            if gaps.size:
                end = begin + int(gaps[-1]) + 1
            else:  # one word fills the block: it goes on to the next gap, or to the end of the text
                ahead = int(np.argmax(outside[end:]))  # the first gap (0 when there is none)
                end = end + ahead + 1 if outside[end + ahead] else data.size
        parts.append(_block_word_hashes(data[begin:end], powers))
        begin = end
    return np.concatenate(parts)


def _block_word_hashes(data: np.ndarray, powers: Callable[[int], tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """`word_hashes` of UTF-8 bytes that cut no word in two."""
    in_word = np.zeros(data.size + 2, dtype=bool)
    in_word[1:-1] = _WORD_BYTES[data]
    edges = np.flatnonzero(in_word[1:] != in_word[:-1])  # alternately where a word starts and ends
    if edges.size == 0:
        return np.zeros(0, dtype=np.uint64)
    starts, ends = edges[0::2], edges[1::2]
    power, inverse = powers(data.size)
    prefix = np.zeros(data.size + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        np.cumsum((data + np.uint64(1)) * power[: data.size], out=prefix[1:])
        return (prefix[ends] - prefix[starts]) * inverse[starts]


def shingle_hashes(text: str, shingle_words: int,
                   powers: Callable[[int], tuple[np.ndarray, np.ndarray]] = byte_powers) -> np.ndarray:
    """64-bit hashes of the word shingles of `text` (lowercased), repeats included (the minimum
    over a set does not change when members repeat); a text with fewer words than a shingle is
    one shingle. Empty when the text has no words."""
    words = word_hashes(text, powers)
    if words.size == 0:
        return words
    k = min(shingle_words, words.size)
    n = words.size - k + 1
    mixed = words[:n].copy()
    with np.errstate(over="ignore"):
        for j in range(1, k):  # a polynomial in _SHINGLE_MIX, wrapping mod 2^64: order-sensitive
            mixed *= _SHINGLE_MIX
            mixed += words[j : j + n]
    return mixed


class MinHasher:
    """`num_perm` multiply-shift hash functions h(x) = ((a*x + b) mod 2^64) >> 32 with odd a."""

    def __init__(self, num_perm: int = 128, seed: int = 0, shingle_words: int = 5):
        rng = np.random.default_rng(seed)
        self.a = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self.b = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64)
        self.shingle_words = shingle_words
        self._powers = byte_powers(1 << 14)

    def powers(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """At least n byte powers, from a table that doubles when a longer text comes."""
        if n > len(self._powers[0]):
            self._powers = byte_powers(max(n, 2 * len(self._powers[0])))
        return self._powers

    def signature(self, text: str) -> np.ndarray:
        """(num_perm,) uint32 minima; empty when the text has no words (never a near-duplicate)."""
        shingles = shingle_hashes(text, self.shingle_words, self.powers)
        if shingles.size == 0:
            return _EMPTY
        block = np.empty((min(shingles.size, _SHINGLE_BLOCK), self.a.size), dtype=np.uint64)
        minima = np.full(self.a.size, np.iinfo(np.uint64).max, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for begin in range(0, shingles.size, _SHINGLE_BLOCK):  # a running minimum over blocks of shingles
                part = shingles[begin : begin + _SHINGLE_BLOCK]
                hashed = np.multiply(part[:, None], self.a, out=block[: part.size])  # wrapping mod 2^64
                hashed += self.b
                np.minimum(minima, hashed.min(axis=0), out=minima)
        # the top 32 bits of the smallest value are the smallest top 32 bits: shift 128 values, not all
        return (minima >> np.uint64(32)).astype(np.uint32)


def estimated_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    return float(np.count_nonzero(sig_a == sig_b)) / sig_a.size


def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) with bands * rows <= num_perm minimising the area of false positives below the
    threshold plus false negatives above it under the S-curve 1 - (1 - s^rows)^bands."""
    s = np.linspace(0.0, 1.0, 1001)  # a uniform grid: sums stand in for the integrals
    below, above = s < threshold, s >= threshold
    best, best_err = (1, num_perm), float("inf")
    for rows in range(1, num_perm + 1):
        bands = num_perm // rows
        p = 1.0 - (1.0 - s**rows) ** bands
        err = p[below].sum() + (1.0 - p[above]).sum()
        if err < best_err:
            best, best_err = (bands, rows), err
    return best


class DuplicateIndex:
    """The documents kept so far, looked up by exact key and by LSH band; answers "is this new
    document a duplicate of one already kept, and of which?".

    Memory per kept document: its key, a reference to its signature, and one entry per band. A
    band is keyed by a 64-bit hash of its rows (a collision only adds a candidate, which the full
    signature then rejects), and a bucket holding one document holds the bare id, not a list.
    """

    def __init__(self, threshold: float, num_perm: int):
        self.threshold = threshold
        self.bands, self.rows = lsh_params(threshold, num_perm)
        self.exact: dict[bytes, int] = {}
        self.buckets: list[dict[int, int | list[int]]] = [{} for _ in range(self.bands)]
        self.signatures: dict[int, np.ndarray] = {}
        self._mix = np.random.default_rng(0).integers(0, 2**63, size=self.rows, dtype=np.uint64) * 2 + 1

    def _band_keys(self, signature: np.ndarray) -> list[int]:
        bands = signature[: self.bands * self.rows].reshape(self.bands, self.rows).astype(np.uint64)
        with np.errstate(over="ignore"):
            return (bands * self._mix).sum(axis=1, dtype=np.uint64).tolist()

    def find_exact(self, key: bytes) -> int | None:
        return self.exact.get(key)

    def find_near(self, signature: np.ndarray | None) -> int | None:
        """A kept document whose estimated similarity to `signature` reaches the threshold, or None."""
        if signature is None or signature.size == 0:
            return None
        seen: set[int] = set()
        for bucket, key in zip(self.buckets, self._band_keys(signature)):
            hit = bucket.get(key)
            for doc in (hit,) if isinstance(hit, int) else hit or ():
                if doc not in seen:
                    seen.add(doc)
                    if estimated_jaccard(signature, self.signatures[doc]) >= self.threshold:
                        return doc
        return None

    def add(self, doc: int, key: bytes, signature: np.ndarray | None) -> None:
        self.exact.setdefault(key, doc)
        if signature is None or signature.size == 0:
            return
        self.signatures[doc] = signature
        for bucket, band in zip(self.buckets, self._band_keys(signature)):
            hit = bucket.get(band)
            if hit is None:
                bucket[band] = doc
            elif isinstance(hit, int):
                bucket[band] = [hit, doc]
            else:
                hit.append(doc)
