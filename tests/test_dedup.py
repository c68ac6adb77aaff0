"""Duplicate detection: exact keys, word hashing against a plain-Python reference, MinHash estimates
against true Jaccard similarity, LSH parameters, and near-copies found (and non-copies not)."""

import random
import re
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minillm.dedup import (DedupConfig, DuplicateIndex, MinHasher, estimated_jaccard, exact_key, lsh_params,
                           shingle_hashes, word_hashes)

M = 0x100000001B3


def reference_word_hashes(text: str) -> list[int]:
    """The definition, one word at a time: bytes of each run of [0-9A-Za-z_] or non-ASCII bytes,
    hashed as sum((b + 1) * M^j) mod 2^64."""
    data = text.lower().encode("utf-8")
    words = re.findall(rb"[0-9A-Za-z_\x80-\xff]+", data)
    return [sum((b + 1) * pow(M, j, 2**64) for j, b in enumerate(w)) % 2**64 for w in words]


@given(st.text(max_size=80))
def test_word_hashes_match_reference(text):
    assert word_hashes(text).tolist() == reference_word_hashes(text)


@given(st.text(st.sampled_from(list("ab1_ é-.\n日")), max_size=60), st.integers(1, 9))
def test_word_hashes_in_blocks_match_reference(text, block):
    """A long text is hashed in blocks cut between words (here tiny ones, so every cut is tried,
    also a word longer than a block); no word's hash may change."""
    assert word_hashes(text, block=block).tolist() == reference_word_hashes(text)


def test_exact_key_ignores_case_and_spacing_only():
    assert exact_key("Hello  World\n") == exact_key("hello world")
    assert exact_key("Hello World") != exact_key("Hello World!")
    assert len(exact_key("x")) == 16


def words(n, seed):
    rng = random.Random(seed)
    return [f"w{rng.randrange(5000)}" for _ in range(n)]


def true_jaccard(a: list[str], b: list[str], k: int = 5) -> float:
    sa = {tuple(a[i : i + k]) for i in range(len(a) - k + 1)}
    sb = {tuple(b[i : i + k]) for i in range(len(b) - k + 1)}
    return len(sa & sb) / len(sa | sb)


def test_minhash_estimates_jaccard():
    hasher = MinHasher(num_perm=256, seed=0)
    base = words(400, 1)
    for changed in (0, 5, 20, 60, 200):
        other = list(base)
        for i in random.Random(changed).sample(range(400), changed):
            other[i] = "zz"
        estimate = estimated_jaccard(hasher.signature(" ".join(base)), hasher.signature(" ".join(other)))
        # the standard error of a 256-permutation estimate is at most 0.5 / 16 = 0.031
        assert abs(estimate - true_jaccard(base, other)) < 0.1


def test_signatures_are_deterministic_and_seeded():
    text = " ".join(words(50, 3))
    assert np.array_equal(MinHasher(seed=7).signature(text), MinHasher(seed=7).signature(text))
    assert not np.array_equal(MinHasher(seed=7).signature(text), MinHasher(seed=8).signature(text))
    assert MinHasher().signature("!!! ...").size == 0  # no words: no signature
    assert shingle_hashes("just three words", 5).size == 1  # shorter than a shingle: one shingle


def whole_matrix_signature(hasher: MinHasher, text: str) -> np.ndarray:
    """The signature as first written: every shingle against every permutation in one matrix."""
    shingles = shingle_hashes(text, hasher.shingle_words)
    with np.errstate(over="ignore"):
        hashed = np.multiply.outer(shingles, hasher.a) + hasher.b
    return (hashed.min(axis=0) >> np.uint64(32)).astype(np.uint32)


@settings(max_examples=20)
@given(st.integers(1, 3000), st.integers(0, 2**32), st.sampled_from([2, 64, 128]))
def test_signatures_in_blocks_are_bit_identical(num_words, seed, num_perm):
    """Shingles are hashed block by block with a running minimum: bit for bit what the whole
    (shingles, num_perm) matrix gave, across block boundaries (1,024 shingles) too."""
    hasher = MinHasher(num_perm, seed % 1000)
    text = " ".join(words(num_words, seed))
    assert np.array_equal(hasher.signature(text), whole_matrix_signature(hasher, text))


def test_a_huge_document_is_hashed_in_bounded_memory():
    """200,000 words (1.2 MB of text, past the 1 MB word-hashing block) at 128 permutations: the
    whole shingle matrix alone would be 200,000 * 128 * 8 bytes = 205 MB."""
    text = " ".join(words(200_000, 5))
    hasher = MinHasher()
    tracemalloc.start()
    try:
        signature = hasher.signature(text)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 80_000_000, f"{peak / 1e6:.0f} MB"
    assert signature.dtype == np.uint32 and signature.shape == (128,)  # the values: the two tests above


def test_lsh_params_put_the_s_curve_at_the_threshold():
    for threshold in (0.5, 0.7, 0.8, 0.9):
        bands, rows = lsh_params(threshold, 128)
        assert bands * rows <= 128
        candidate = lambda s: 1 - (1 - s**rows) ** bands  # noqa: E731
        assert candidate(threshold - 0.2) < 0.25 and candidate(min(threshold + 0.1, 1.0)) > 0.75


def test_index_finds_near_copies_and_not_strangers():
    config = DedupConfig()
    hasher = MinHasher(config.num_perm, config.seed)
    index = DuplicateIndex(config.near_threshold, config.num_perm)
    originals = [words(300, seed) for seed in range(20)]
    for doc_id, doc in enumerate(originals):
        text = " ".join(doc)
        assert index.find_near(hasher.signature(text)) is None  # unrelated texts: never near
        index.add(doc_id, exact_key(text), hasher.signature(text))
    for doc_id, doc in enumerate(originals):
        near = list(doc)
        near[100] = "changed"  # one word: about 5 of 296 shingles differ
        near.insert(200, "inserted")
        signature = hasher.signature(" ".join(near))
        assert index.find_near(signature) == doc_id
        assert index.find_exact(exact_key(" ".join(doc).upper())) == doc_id
        far = list(doc)
        for i in range(0, 300, 4):  # a quarter of the words changed: similarity ~0.1
            far[i] = "x"
        assert index.find_near(hasher.signature(" ".join(far))) is None


def test_config_validation():
    with pytest.raises(ValueError, match="near_threshold"):
        DedupConfig(near_threshold=0.0)
    with pytest.raises(ValueError, match="num_perm"):
        DedupConfig(num_perm=1)
