"""Scoring text under a model: the log-probability it gives each target token. Perplexity (a sliding
window over a stream) and multiple-choice benchmarks (each choice after its context) are both sums
of these numbers, so both call `target_logprobs`.

Numerics: the log-softmax is taken in float32 whatever the model runs in, as logsumexp(logits) minus
the target's logit, on the scored positions only (a window with stride < block size scores just its
new tokens, and its other positions never reach the output head), HEAD_ROWS positions at a time so
memory stays bounded whatever the batch and vocabulary. On a GPU the matmuls run under
bfloat16 autocast by default (`dtype="auto"`); the weights stay as loaded.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from minillm.model import IGNORE_INDEX

HEAD_ROWS = 1024  # positions sent through the output head at once: 200 MB of fp32 logits for GPT-2's vocabulary
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """"auto" -> cuda when there is one, else cpu; anything else as torch reads it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """"auto" -> bfloat16 on a GPU that has it, else float32."""
    if name == "auto":
        fast = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if fast else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype must be auto or one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision for a 16-bit dtype, nothing for float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.inference_mode()
def target_logprobs(model, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """log p(y[b, t] | x[b, :t+1]) for every target that is not IGNORE_INDEX, as float32 (B, T);
    ignored positions hold 0. x and y are (B, T) token ids on the model's device."""
    scored = y != IGNORE_INDEX  # (B, T)
    out = torch.zeros(y.shape, dtype=torch.float32, device=y.device)
    if not bool(scored.any()):
        return out
    with autocast(x.device, dtype):
        hidden = model.hidden_states(x)[scored]  # (k, C): only the positions that are scored
    targets = y[scored].long()  # (k,)
    picked = torch.empty(len(targets), dtype=torch.float32, device=y.device)
    for i in range(0, len(targets), HEAD_ROWS):  # a bounded slice of (k, V) logits at a time
        with autocast(x.device, dtype):
            logits = model.lm_head(hidden[i : i + HEAD_ROWS]).float()  # (rows, V)
        picked[i : i + HEAD_ROWS] = logits.gather(1, targets[i : i + HEAD_ROWS, None]).squeeze(1) - torch.logsumexp(logits, -1)
    out[scored] = picked
    return out


def sample_indices(count: int, max_docs: int | None, seed: int) -> np.ndarray | None:
    """Which of `count` documents (or questions) a `--max_docs` run scores: a seeded random sample,
    in the original order; None when it scores them all."""
    if max_docs is None or max_docs >= count:
        return None
    return np.sort(np.random.default_rng(seed).choice(count, size=max_docs, replace=False))
