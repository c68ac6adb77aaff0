"""Token files: round trips in both widths, every corruption refused naming the file, random
training windows from a torch.Generator, and the sequential evaluation pass."""

import struct

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from minillm.tokenfile import (HEADER_SIZE, IGNORE_INDEX, MAGIC, TokenFile, TokenFileError, TokenWriter, dtype_for_vocab,
                               eval_windows, random_windows, write_tokens)


@pytest.mark.parametrize("vocab_size,dtype", [(257, np.uint16), (65536, np.uint16), (65537, np.uint32),
                                              (100_000, np.uint32)])
def test_round_trip_both_widths(tmp_path, vocab_size, dtype):
    ids = np.random.default_rng(0).integers(0, vocab_size, size=1000)
    ids[:2] = [0, vocab_size - 1]
    path = tmp_path / "train.bin"
    write_tokens(path, ids, vocab_size)
    tf = TokenFile(path)
    assert tf.dtype == dtype and len(tf) == tf.num_tokens == 1000 and tf.vocab_size == vocab_size
    assert np.array_equal(tf.tokens, ids)
    assert path.stat().st_size == HEADER_SIZE + 1000 * np.dtype(dtype).itemsize
    assert not tf.tokens.flags.writeable


@given(vocab_size=st.integers(1, 2**32), data=st.data())
def test_round_trip_property(tmp_path_factory, vocab_size, data):
    ids = data.draw(st.lists(st.integers(0, vocab_size - 1), max_size=50))
    path = tmp_path_factory.mktemp("tf") / "x.bin"
    write_tokens(path, np.array(ids, dtype=np.int64), vocab_size)
    tf = TokenFile(path)
    assert tf.tokens.tolist() == ids and tf.vocab_size == vocab_size
    assert tf.dtype == (np.uint16 if vocab_size <= 65536 else np.uint32)


def test_header_layout_is_the_documented_one(tmp_path):
    write_tokens(tmp_path / "x.bin", [5, 6, 7], 300)
    raw = (tmp_path / "x.bin").read_bytes()
    assert raw[:8] == b"MLLMTOK\x00" and struct.unpack("<IIQQ", raw[8:32]) == (1, 2, 3, 300)
    assert raw[32:64] == bytes(32) and np.frombuffer(raw[64:], "<u2").tolist() == [5, 6, 7]


def test_empty_file_and_appending(tmp_path):
    write_tokens(tmp_path / "empty.bin", [], 500)
    assert len(TokenFile(tmp_path / "empty.bin")) == 0
    with TokenWriter(tmp_path / "parts.bin", 500) as writer:
        writer.write([1, 2])
        writer.write(np.array([3], dtype=np.int64))
    assert TokenFile(tmp_path / "parts.bin").tokens.tolist() == [1, 2, 3]


def test_writer_refuses_out_of_vocabulary_and_leaves_nothing_on_error(tmp_path):
    path = tmp_path / "bad.bin"
    with pytest.raises(ValueError, match="token id 500 is outside the vocabulary"):
        with TokenWriter(path, 500) as writer:
            writer.write([1, 500])
    assert not path.exists() and list(tmp_path.iterdir()) == []


def corrupt(path, offset, data):
    raw = bytearray(path.read_bytes())
    raw[offset : offset + len(data)] = data
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage,message", [
    (lambda p: corrupt(p, 0, b"GARBAGE!"), "not a minillm token file"),
    (lambda p: corrupt(p, 8, struct.pack("<I", 7)), "version 7 is not known"),
    (lambda p: corrupt(p, 12, struct.pack("<I", 3)), "3 bytes per token"),
    (lambda p: p.write_bytes(p.read_bytes()[:-1]), "truncated: the header promises 10 tokens"),
    (lambda p: p.write_bytes(p.read_bytes() + b"\x00\x00"), "has trailing bytes"),
    (lambda p: p.write_bytes(p.read_bytes()[:20]), "shorter than the 64-byte header"),
])
def test_corruption_is_refused_naming_the_file(tmp_path, damage, message):
    path = tmp_path / "val.bin"
    write_tokens(path, range(10), 300)
    damage(path)
    with pytest.raises(TokenFileError, match=message) as info:
        TokenFile(path)
    assert str(path) in str(info.value)
    with pytest.raises(TokenFileError, match="cannot read"):
        TokenFile(tmp_path / "missing.bin")


def test_random_windows_are_shifted_slices_repeatable_by_seed(tmp_path):
    ids = np.arange(1000) % 700
    write_tokens(tmp_path / "t.bin", ids, 700)
    tf = TokenFile(tmp_path / "t.bin")
    x, y = random_windows(tf, 8, 16, torch.Generator().manual_seed(1))
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        start = row_x[0]  # ids are their own positions here (below 700), so the row says where it is
        assert row_x == ids[start : start + 16].tolist() and row_y == ids[start + 1 : start + 17].tolist()
    x2, _ = random_windows(tf, 8, 16, torch.Generator().manual_seed(1))
    x3, _ = random_windows(tf, 8, 16, torch.Generator().manual_seed(2))
    assert torch.equal(x, x2) and not torch.equal(x, x3)
    # every start in [0, N - T - 1] is reachable, including the last window that ends at the last token
    starts = set()
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        starts.update(random_windows(ids[:20], 64, 16, g)[0][:, 0].tolist())
    assert starts == set(range(4))
    with pytest.raises(ValueError, match="too few for windows of block_size 16"):
        random_windows(ids[:16], 1, 16, g)


@given(n=st.integers(0, 300), block=st.integers(1, 40), batch=st.integers(1, 5), data=st.data())
def test_eval_windows_score_every_token_once(n, block, batch, data):
    stride = data.draw(st.integers(1, block))
    ids = np.arange(n, dtype=np.int64) + 1000  # distinct, so each target says which token it is
    scored = []
    for x, y in eval_windows(ids, batch, block, stride=stride):
        assert x.shape == y.shape and 1 <= x.shape[0] <= batch and x.shape[1] == block
        for row_x, row_y in zip(x.tolist(), y.tolist()):
            first_window = not scored
            for pos, target in enumerate(row_y):
                if target != IGNORE_INDEX:
                    assert row_x[: pos + 1] == list(range(target - pos - 1, target))  # the tokens before it
                    assert first_window or pos >= block - stride  # later windows: full overlap context
                    scored.append(target)
    assert scored == ids[1:].tolist()  # every token after the first, exactly once, in order


def test_eval_windows_context_with_stride():
    ids = np.arange(10)
    (x, y), = list(eval_windows(ids, 10, 4, stride=2))  # one batch: windows start at 0, 2, 4, 6
    assert x.tolist() == [[0, 1, 2, 3], [2, 3, 4, 5], [4, 5, 6, 7], [6, 7, 8, 0]]  # the last one padded
    assert y.tolist() == [[1, 2, 3, 4], [-100, -100, 5, 6], [-100, -100, 7, 8], [-100, -100, 9, -100]]
    with pytest.raises(ValueError, match="stride"):
        list(eval_windows(ids, 1, 4, stride=5))


def test_dtype_for_vocab():
    assert dtype_for_vocab(50257) == np.uint16 and dtype_for_vocab(2**16 + 1) == np.uint32
    with pytest.raises(ValueError):
        dtype_for_vocab(0)
    assert MAGIC == b"MLLMTOK\x00"
