"""The KV cache: every attention layer's keys and values for the tokens seen so far, kept so that each
new token costs one position's work instead of a pass over the whole sequence.

Without a cache, generating token n runs the model over all n tokens again. With one, the prompt is
run once (prefill) and each later call feeds only the newest token: its query attends over the cached
keys and values of everything before it, and its own key and value are appended. The logits are the
same as a full recompute (tested to 1e-5 in fp32).

Layout: per layer, one preallocated buffer for keys and one for values, each (rows, nh, max_len, hs),
allocated once (no concatenation per step). Each row is a slot holding one sequence with its own
length, so rows of different lengths share a batch: a row's new tokens are written at positions
`length .. length + T - 1` of its slot, and a per-row mask hides the slack past each row's end. When
all rows have the same length (one prompt, or a batch that advances together) the mask is the plain
end-aligned causal one and the writes are slices.

Slots are what continuous batching needs: a server keeps one cache, prefills a new request into a
free row (`reset` it, then run the prompt on `cache.select([row])`), decodes the active rows together
(`cache.select(active_rows)`), and frees a row when its request ends.

Capacity: a row holds at most `max_len <= block_size` tokens (GPT-2's learned position table ends
there). Appending past it raises a ValueError that says so; sliding a window over longer text is the
generation loop's job (`minillm.generate`), which re-encodes the kept tokens at their new positions
because cached keys carry their absolute positions and cannot simply be shifted.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from minillm.config import GPTConfig


class KVCache:
    """Preallocated keys and values for `batch_size` sequences of up to `max_len` tokens each."""

    def __init__(
        self,
        config: GPTConfig,
        batch_size: int,
        max_len: int | None = None,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        max_len = config.block_size if max_len is None else max_len
        if batch_size < 1:
            raise ValueError(f"KVCache batch_size must be at least 1, got {batch_size}")
        if not 1 <= max_len <= config.block_size:
            raise ValueError(f"KVCache max_len must be in [1, block_size={config.block_size}], got {max_len}")
        shape = (batch_size, config.n_head, max_len, config.head_size)  # (rows, nh, max_len, hs)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.lengths = [0] * batch_size  # tokens held per row (host-side: plans are built without a sync)
        self.batch_size, self.max_len, self.dtype = batch_size, max_len, dtype

    @classmethod
    def for_model(cls, model: torch.nn.Module, batch_size: int, max_len: int | None = None) -> "KVCache":
        """A cache on the model's device, in the dtype it computes in: its parameters' dtype, or the
        autocast dtype when called under torch.autocast (as in a mixed-precision training loop)."""
        weight = model.transformer.wte.weight
        dtype = weight.dtype
        if weight.is_floating_point() and torch.is_autocast_enabled(weight.device.type):
            dtype = torch.get_autocast_dtype(weight.device.type)
        return cls(model.config, batch_size, max_len, device=weight.device, dtype=dtype)

    def reset(self, rows: Sequence[int] | None = None) -> None:
        """Empty some rows (all by default); their old contents are simply overwritten later."""
        for row in range(self.batch_size) if rows is None else rows:
            self.lengths[row] = 0

    def truncate(self, row: int, length: int) -> None:
        """Forget the tokens of `row` after its first `length` (e.g. to drop right-padding)."""
        if not 0 <= length <= self.lengths[row]:
            raise ValueError(f"cannot truncate row {row} of {self.lengths[row]} tokens to {length}")
        self.lengths[row] = length

    def select(self, rows: Sequence[int]) -> "CacheRows":
        """A view of some rows to pass as the model's `cache=`: the model then reads (len(rows), T)."""
        return CacheRows(self, list(rows))

    def step(self, num_tokens: int, rows: Sequence[int] | None = None) -> "CacheStep":
        """Plan one model call that appends `num_tokens` tokens to each of `rows` (all by default);
        the model calls this itself. Raises ValueError when a row has no room left."""
        return CacheStep(self, num_tokens, None if rows is None else list(rows))


class CacheRows:
    """Some rows of a KVCache, for a model call on just those sequences (see `KVCache.select`)."""

    def __init__(self, cache: KVCache, rows: list[int]):
        bad = [r for r in rows if not 0 <= r < cache.batch_size]
        if bad or len(set(rows)) != len(rows) or not rows:
            raise ValueError(f"rows must be distinct indices in [0, {cache.batch_size}), got {rows}")
        self.cache, self.rows = cache, rows

    def step(self, num_tokens: int) -> "CacheStep":
        return self.cache.step(num_tokens, self.rows)


class CacheStep:
    """Where one model call writes its keys and values and which cached keys each query may see.

    Built once per call (not per layer): positions for the position embedding, and the per-row mask
    when rows differ in length. Advances the rows' lengths when built.
    """

    def __init__(self, cache: KVCache, num_tokens: int, rows: list[int] | None):
        self.cache, self.num_tokens = cache, num_tokens
        device = cache.keys[0].device if cache.keys else "cpu"
        rows = list(range(cache.batch_size)) if rows is None else rows
        starts = [cache.lengths[r] for r in rows]
        for row, start in zip(rows, starts):
            if start + num_tokens > cache.max_len:
                raise ValueError(
                    f"KV cache row {row} holds {start} tokens and cannot take {num_tokens} more: its capacity "
                    f"is {cache.max_len} (the block size caps it; slide the window or start again)"
                )
        # the rows to read and write: a slice when they are consecutive (a view, no copy), else an index
        consecutive = rows == list(range(rows[0], rows[0] + len(rows)))
        self.index = slice(rows[0], rows[0] + len(rows)) if consecutive else torch.tensor(rows, device=device)
        self.key_len = max(starts) + num_tokens  # Tk: keys read, the longest row's end
        offsets = torch.arange(num_tokens, device=device)
        if len(set(starts)) == 1:
            self.start = starts[0]
            self.positions = starts[0] + offsets  # (T,): every row continues at the same place
            self.mask = None  # the end-aligned causal mask is exact, and no slack to hide
        else:
            self.start = None
            self.positions = torch.tensor(starts, device=device)[:, None] + offsets  # (B, T)
            # key j is visible to the query at position p iff j <= p: its past and itself, not the slack
            keys = torch.arange(self.key_len, device=device)
            self.mask = (keys[None, None, :] <= self.positions[:, :, None])[:, None]  # (B, 1, T, Tk)
        for row in rows:
            cache.lengths[row] += num_tokens

    def layer(self, i: int):
        """The `kv` function attention layer `i` calls with its new keys and values."""
        return functools.partial(self.append, i)

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (B, nh, T, hs) for `layer`; return all keys and values to attend over and the mask."""
        if k.dtype != self.cache.dtype:
            raise ValueError(f"KV cache holds {self.cache.dtype} but the model computes in {k.dtype}; build the cache in that dtype")
        out = []
        for buf, new in ((self.cache.keys[layer], k), (self.cache.values[layer], v)):
            if self.start is not None:
                buf[self.index, :, self.start : self.start + self.num_tokens] = new
            else:
                # subtle: advanced indices around a slice put their broadcast dims first: (B, T, nh, hs)
                rows = self.index if isinstance(self.index, torch.Tensor) else torch.arange(
                    self.index.start, self.index.stop, device=buf.device)
                buf[rows[:, None], :, self.positions] = new.transpose(1, 2)
            out.append(buf[self.index, :, : self.key_len])  # (B, nh, Tk, hs)
        return out[0], out[1], self.mask
