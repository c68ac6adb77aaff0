"""Pretraining: next-token prediction on a prepared corpus, through the shared training loop.

`train.py` is a thin wrapper over `pretrain()`: read the folder `prepare.py` wrote (train.bin,
val.bin, tokenizer.bpe), build a GPT from a preset sized to the tokenizer, run `trainer.train` with
random training windows and a fixed validation pass, then report val perplexity and print samples.

Batches: every optimizer step draws the *global* batch (batch_size x world_size windows) from one
seeded generator, identical on every rank, and each rank keeps its own rows. So a 2-process run sees
exactly the windows a 1-process run with twice the batch size sees, and the generator's state is the
whole data position a checkpoint needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from minillm.distributed import DistInfo, mean_across_ranks
from minillm.model import GPT


class RandomWindows:
    """Training batches: random windows x = tokens[s : s+T], y = tokens[s+1 : s+T+1]."""

    def __init__(self, tokens: np.ndarray, batch_size: int, block_size: int, *, seed: int, dist: DistInfo | None = None):
        if len(tokens) < block_size + 1:
            raise ValueError(f"{len(tokens)} training tokens are too few for one window of {block_size} + 1")
        self.tokens, self.batch_size, self.block_size = tokens, batch_size, block_size
        self.dist = dist or DistInfo()
        self.generator = torch.Generator().manual_seed(seed)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, rank = self.batch_size, self.block_size, self.dist.rank
        starts = torch.randint(0, len(self.tokens) - T, (B * self.dist.world_size,), generator=self.generator)
        mine = starts[rank * B : (rank + 1) * B].tolist()
        windows = torch.from_numpy(np.stack([np.asarray(self.tokens[s : s + T + 1], dtype=np.int64) for s in mine]))
        return windows[:, :-1], windows[:, 1:]  # (B, T) each

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


def lm_evaluator(tokens: np.ndarray, batch_size: int, block_size: int, max_batches: int, dist: DistInfo | None = None):
    """An `evaluate(model)` for the trainer: mean next-token loss over the first `max_batches`
    batches of consecutive, non-overlapping windows of `tokens` (the same windows every time, so
    evaluations compare), spread over the ranks. Returns {"val_loss", "val_ppl"}."""
    dist = dist or DistInfo()
    T = block_size
    n_windows = min((len(tokens) - 1) // T, batch_size * max_batches)
    if n_windows < 1:
        raise ValueError(f"{len(tokens)} validation tokens are too few for one window of {T} + 1")
    mine = list(range(dist.rank, n_windows, dist.world_size))

    def evaluate(model: nn.Module) -> dict[str, float]:
        device = next(model.parameters()).device
        total = torch.zeros((), device=device, dtype=torch.float64)
        count = torch.zeros((), device=device, dtype=torch.float64)
        for i in range(0, len(mine), batch_size):
            rows = [np.asarray(tokens[w * T : w * T + T + 1], dtype=np.int64) for w in mine[i : i + batch_size]]
            windows = torch.from_numpy(np.stack(rows)).to(device)
            _, loss = model(windows[:, :-1], windows[:, 1:])
            total += loss.double() * len(rows)
            count += len(rows)
        mean = (mean_across_ranks(total, dist) / mean_across_ranks(count, dist)).item()
        return {"val_loss": mean, "val_ppl": math.exp(min(mean, 50.0))}

    return evaluate
