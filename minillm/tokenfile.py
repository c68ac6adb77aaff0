"""Token files: one split of a prepared corpus as a flat array of token ids, and how training and
evaluation read it.

Layout (little-endian), a 64-byte header then the ids:

    offset  size  field
    0       8     magic b"MLLMTOK\\0"
    8       4     format version (1)
    12      4     bytes per token: 2 (uint16, when the vocabulary has at most 65,536 ids) or 4 (uint32)
    16      8     number of tokens N
    24      8     vocabulary size (ids are < this), so a reader can check it against its tokenizer
    32      32    zero padding (room for later fields; keeps the ids 64-byte aligned)
    64      N*w   the ids

`prepare.py` writes `<|endoftext|>` before every document, so any window of the file shows the
model where documents start and end. Files are written under a temporary name and renamed, and the
header is written last, so a crash never leaves a file that looks whole.

Reading: `TokenFile(path)` checks the magic, the version, the token width and that the size matches
the header (a truncated or padded file is refused, naming the file), then memory-maps the ids
read-only: opening a 10 GB file costs nothing and every process shares the pages.
- `random_windows(tokens, batch_size, block_size, generator)` -> x, y (B, T) int64 with y = x
  shifted by one, window starts drawn from the `torch.Generator` (seed it, and the batches repeat).
- `eval_windows(tokens, batch_size, block_size, stride)` -> consecutive (x, y) batches that score
  every token after the first exactly once; with stride < block_size each window overlaps the
  previous one to give the model context, and only the new positions are scored. Unscored and
  padded targets are `IGNORE_INDEX` (-100, what the model's loss skips).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported where windows are made: preparing data needs no torch
    import torch

MAGIC = b"MLLMTOK\x00"
VERSION = 1
HEADER_SIZE = 64
_HEADER = struct.Struct("<8sIIQQ")  # magic, version, bytes per token, token count, vocab size
IGNORE_INDEX = -100  # targets the model's loss skips (minillm.model.IGNORE_INDEX)


class TokenFileError(ValueError):
    """A token file that cannot be read: wrong magic, unknown version, truncated, ..."""


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 when every id fits in 16 bits (GPT-2's 50,257 do), else uint32."""
    if not 0 < vocab_size <= 2**32:
        raise ValueError(f"vocab_size must be in [1, 2^32], got {vocab_size}")
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


class TokenWriter:
    """Appends ids to a token file; `close()` (or leaving the `with` block) makes it final.

    The ids go to `<path>.tmp` after a placeholder header; on close the real header is written,
    the file is fsynced and renamed over `path`. On an exception inside `with` the temporary file
    is removed and `path` is untouched.
    """

    def __init__(self, path: str | os.PathLike, vocab_size: int):
        self.path = Path(path)
        self.vocab_size = vocab_size
        self.dtype = dtype_for_vocab(vocab_size)
        self.num_tokens = 0
        self._tmp = self.path.with_name(self.path.name + ".tmp")
        self._file = open(self._tmp, "wb")
        self._file.write(b"\x00" * HEADER_SIZE)

    def write(self, ids) -> None:
        array = np.asarray(ids)
        if array.size == 0:
            return
        if array.min() < 0 or array.max() >= self.vocab_size:
            bad = int(array.max() if array.max() >= self.vocab_size else array.min())
            raise ValueError(f"{self.path}: token id {bad} is outside the vocabulary [0, {self.vocab_size})")
        self._file.write(array.astype(self.dtype, copy=False).tobytes())
        self.num_tokens += array.size

    def close(self) -> None:
        if self._file.closed:
            return
        self._file.seek(0)
        self._file.write(_HEADER.pack(MAGIC, VERSION, self.dtype.itemsize, self.num_tokens, self.vocab_size))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        self._file.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> "TokenWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.abort() if exc_type is not None else self.close()


def write_tokens(path: str | os.PathLike, ids, vocab_size: int) -> None:
    """Write a whole token file at once."""
    with TokenWriter(path, vocab_size) as writer:
        writer.write(ids)


class TokenFile:
    """A token file, validated and memory-mapped read-only. `tokens` is a numpy view of the ids."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                header = f.read(HEADER_SIZE)
        except OSError as err:
            raise TokenFileError(f"{self.path}: cannot read token file ({err.strerror})") from None
        if len(header) < HEADER_SIZE:
            raise TokenFileError(f"{self.path}: truncated: {size} bytes, shorter than the {HEADER_SIZE}-byte header")
        magic, version, width, num_tokens, vocab_size = _HEADER.unpack_from(header)
        if magic != MAGIC:
            raise TokenFileError(f"{self.path}: not a minillm token file (magic {magic!r}, expected {MAGIC!r})")
        if version != VERSION:
            raise TokenFileError(f"{self.path}: token file version {version} is not known "
                                 f"(this minillm reads version {VERSION})")
        if width not in (2, 4):
            raise TokenFileError(f"{self.path}: bad header: {width} bytes per token (expected 2 or 4)")
        expected = HEADER_SIZE + num_tokens * width
        if size != expected:
            what = "truncated" if size < expected else "has trailing bytes"
            raise TokenFileError(f"{self.path}: {what}: the header promises {num_tokens:,} tokens "
                                 f"({expected:,} bytes) but the file has {size:,} bytes")
        self.num_tokens: int = num_tokens
        self.vocab_size: int = vocab_size
        self.dtype = np.dtype(np.uint16 if width == 2 else np.uint32)
        if num_tokens:
            self.tokens = np.memmap(self.path, dtype=self.dtype, mode="r", offset=HEADER_SIZE, shape=(num_tokens,))
        else:  # numpy cannot map zero bytes
            self.tokens = np.zeros(0, dtype=self.dtype)

    def __len__(self) -> int:
        return self.num_tokens

    def __repr__(self) -> str:
        return f"TokenFile({str(self.path)!r}, num_tokens={self.num_tokens:,}, dtype={self.dtype.name})"


def _array(tokens) -> tuple[np.ndarray, str]:
    if isinstance(tokens, TokenFile):
        return tokens.tokens, str(tokens.path)
    return np.asarray(tokens), "token array"


def random_windows(tokens, batch_size: int, block_size: int, generator: torch.Generator,
                   device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """A training batch: B windows of T+1 consecutive tokens at uniformly random starts.

    Returns x = window[:, :-1] and y = window[:, 1:], both (B, T) int64 on `device`. The starts come
    from `torch.randint(..., generator=generator)`, so a seeded CPU generator repeats the batches
    exactly (and its state can be saved in a checkpoint to resume them).
    """
    import torch

    array, name = _array(tokens)
    if len(array) < block_size + 1:
        raise ValueError(f"{name}: {len(array):,} tokens is too few for windows of block_size {block_size} "
                         f"(need at least {block_size + 1})")
    starts = torch.randint(0, len(array) - block_size, (batch_size,), generator=generator).numpy()
    windows = array[starts[:, None] + np.arange(block_size + 1)]  # (B, T+1), copied out of the map
    batch = torch.from_numpy(windows.astype(np.int64))
    x, y = batch[:, :-1], batch[:, 1:]
    if torch.device(device).type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def eval_windows(tokens, batch_size: int, block_size: int, stride: int | None = None,
                 device: str | torch.device = "cpu") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches (x, y) of shape (b, T), b <= batch_size, that together score every token of the file
    after the first exactly once, in order.

    Window k starts at k * stride and covers at most T+1 tokens. Its targets before position
    T - stride were scored by the previous window and are IGNORE_INDEX, so with stride < T each
    prediction still sees up to T - stride tokens of context. The last window is padded (x with 0,
    y with IGNORE_INDEX). Summing the loss over targets != IGNORE_INDEX and dividing by
    len(tokens) - 1 gives the mean loss per token.
    """
    import torch

    array, name = _array(tokens)
    stride = block_size if stride is None else stride
    if not 1 <= stride <= block_size:
        raise ValueError(f"stride must be in [1, block_size={block_size}], got {stride}")
    n = len(array)
    if n < 2:
        return
    # subtle: once a window reaches the end of the file, later starts would score nothing new
    starts = [s for s in range(0, n - 1, stride) if s == 0 or s - stride + block_size < n - 1]
    for i in range(0, len(starts), batch_size):
        chunk = starts[i : i + batch_size]
        x = np.zeros((len(chunk), block_size), dtype=np.int64)
        y = np.full((len(chunk), block_size), IGNORE_INDEX, dtype=np.int64)
        for row, start in enumerate(chunk):
            window = np.asarray(array[start : start + block_size + 1], dtype=np.int64)
            length = len(window) - 1
            x[row, :length] = window[:-1]
            first_new = 0 if start == 0 else block_size - stride  # earlier targets: previous window
            y[row, first_new:length] = window[1 + first_new :]
        yield torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
