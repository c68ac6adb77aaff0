"""The optimizer and its schedule: AdamW with decay on matrices only, warmup then cosine decay.

Why decay only matrices: weight decay pulls weights toward zero; on the matrices of Linear and
Embedding layers that is useful regularisation, on biases and LayerNorm gains it only fights the
scale they exist to learn (the GPT-2/GPT-3 recipe; nanoGPT does the same).

Optimizer state goes into checkpoints as tensors (safetensors) plus JSON for the hyperparameters, so
a resumed run continues bit for bit and nothing is ever unpickled.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn


def lr_at(step: int, *, peak: float, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Learning rate for optimizer step `step` (0-based).

    Linear warmup from peak/warmup_steps to peak over the first `warmup_steps` steps, then a cosine
    from peak down to `min_lr_ratio * peak` at the last step; past `max_steps` it stays at the floor.
    """
    floor = peak * min_lr_ratio
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    decay_steps = max_steps - warmup_steps
    if decay_steps <= 0 or step >= max_steps:
        return floor if step >= max_steps else peak
    progress = (step - warmup_steps) / decay_steps  # 0 -> 1 over the decay
    return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (peak - floor)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups over the trainable parameters: matrices decayed, vectors (biases, norms) not."""
    decay, no_decay = [], []
    for param in model.parameters():  # a tied weight appears once
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters (every requires_grad is False)")
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_adamw(model: nn.Module, *, lr: float, weight_decay: float, betas: tuple[float, float], device: torch.device) -> torch.optim.AdamW:
    """AdamW, fused (one pass over each parameter for the whole update) on CUDA and CPU, where torch
    has it: on this project's 2-core CPU that measured 5x faster than the foreach implementation for
    the `mini` model (2 ms against 10 ms per step); foreach on other devices."""
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, fused=fused or None,
                             foreach=None if fused else True)


def optimizer_state_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer's state into tensors (for safetensors) and JSON (hyperparameters)."""
    state = optimizer.state_dict()
    tensors = {}
    for index, per_param in state["state"].items():
        for key, value in per_param.items():
            tensors[f"{index}.{key}"] = value if isinstance(value, torch.Tensor) else torch.tensor(value)
    groups = [{k: v for k, v in group.items()} for group in state["param_groups"]]
    return tensors, {"param_groups": groups}


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Inverse of `optimizer_state_tensors`: restore the state into `optimizer`."""
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        index, _, key = name.partition(".")
        per_param.setdefault(int(index), {})[key] = value
    groups = meta["param_groups"]
    for group in groups:  # JSON turned tuples into lists
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
    optimizer.load_state_dict({"state": per_param, "param_groups": groups})
