"""LoRA: low-rank adapters (Hu et al. 2021), so finetuning trains a few thousand numbers per
projection instead of the projection itself.

A Linear layer y = x W^T + b (W: out x in) becomes

    y = x W^T + b + (alpha / r) * dropout(x) A^T B^T          A: r x in, B: out x r

with W and b frozen and only A and B trained. B starts at zero, so at initialisation the adapted
model computes exactly what the base model computes; A starts random (Kaiming-uniform, as
nn.Linear initialises its weights), so B's gradient is not zero from the first step. The scale
alpha / r keeps the size of the update comparable when the rank changes (the paper's choice).

Where: any of each block's `attn.c_attn` (q, k, v at once), `attn.c_proj`, `mlp.c_fc`, `mlp.c_proj`
(`LoRAConfig.lora_targets`). Trainable parameters: r * (in + out) per adapted projection, so with
all four in every block of a GPT of width C: n_layer * r * (4C + 2C + 5C + 5C) = 16 r C n_layer
(GPT-2 small at r = 8: 1.18M of its 124M).

Names: an adapted projection keeps its weight and bias under their GPT names
(`transformer.h.0.attn.c_attn.weight`) and adds `...c_attn.lora_A` and `...c_attn.lora_B`. So the
base weights load from any GPT checkpoint, a checkpoint of the adapted model loads back into a GPT
with adapters added (`minillm.checkpoint` does that when minillm.json has a "lora" section), and
the adapters alone make a small file of their own (`save_adapters` / `load_adapters`).

Merging: W' = W + (alpha / r) B A folds an adapter into its projection (`merge_lora`), leaving a
plain GPT with GPT's names, for export, sampling or serving at no extra cost per token.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from minillm import cli
from minillm.safetensors import load_file_with_metadata, save_file

TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # the projections of a block
ADAPTERS_FILE = "adapters.safetensors"  # the adapters (and a trained head) alone, in each LoRA checkpoint


@dataclass
class LoRAConfig:
    """Low-rank adapters: where they go and how big they are (used with --trainable=lora)."""

    lora_rank: int = 8  # r: the inner dimension of each adapter; trainable parameters grow linearly with it
    lora_alpha: float = 16.0  # the update B @ A is scaled by alpha / rank
    lora_dropout: float = 0.0  # dropout on the adapters' input (the frozen path keeps the model's own)
    lora_targets: tuple[str, ...] = TARGETS  # which projections of every block get adapters (comma separated)
    lora_head: bool = True  # classification: the new classifier head trains along with the adapters

    def __post_init__(self) -> None:
        self.lora_targets = tuple(self.lora_targets)
        if isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int) or self.lora_rank < 1:
            raise ValueError(f"LoRAConfig.lora_rank must be a positive integer, got {self.lora_rank!r}")
        if not self.lora_alpha > 0:
            raise ValueError(f"LoRAConfig.lora_alpha must be positive, got {self.lora_alpha!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"LoRAConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        unknown = [t for t in self.lora_targets if t not in TARGETS]
        if unknown or not self.lora_targets:
            raise ValueError(f"LoRAConfig.lora_targets must name some of {', '.join(TARGETS)}; got {self.lora_targets!r}")

    @property
    def scale(self) -> float:
        return self.lora_alpha / self.lora_rank


class LoRALinear(nn.Linear):
    """A Linear layer plus a low-rank update: forward = base(x) + scale * B(A(dropout(x)))."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        nn.Module.__init__(self)  # not nn.Linear's: the base's weight and bias are adopted, not made anew
        self.in_features, self.out_features = base.in_features, base.out_features
        self.register_parameter("weight", base.weight)
        self.register_parameter("bias", base.bias)
        like = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **like))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **like))  # (out, r)
        self.rank, self.scale = rank, alpha / rank
        self.lora_dropout = nn.Dropout(dropout)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's own initialisation
        nn.init.zeros_(self.lora_B)  # the update starts at exactly zero

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)  # (..., out) through r
        return F.linear(x, self.weight, self.bias) + self.scale * update

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain Linear computing what this layer computes in eval mode (the update folded in)."""
        with torch.device("meta"):  # its own weights are replaced at once: skip initialising them
            linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        acc = torch.promote_types(self.weight.dtype, torch.float32)  # sums in fp32 at least (fp64 stays fp64)
        delta = self.lora_B.to(acc) @ self.lora_A.to(acc)  # (out, in)
        weight = (self.weight.to(acc) + self.scale * delta).to(self.weight.dtype)
        linear.weight = nn.Parameter(weight, requires_grad=self.weight.requires_grad)
        linear.bias = self.bias
        return linear

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, scale={self.scale:g}"


def _projections(model: nn.Module, targets: tuple[str, ...]):
    """(qualified name, parent module, attribute) of each target projection in each block."""
    for i, block in enumerate(model.transformer.h):
        for target in targets:
            parent_name, _, attribute = target.rpartition(".")
            yield f"transformer.h.{i}.{target}", block.get_submodule(parent_name), attribute


def add_lora(model: nn.Module, config: LoRAConfig, *, freeze: bool = True) -> list[str]:
    """Put adapters on `config.lora_targets` in every block of a GPT (or a model built on one), in
    place; with `freeze`, every other parameter stops requiring grad. Returns the adapted names."""
    if freeze:
        model.requires_grad_(False)
    adapted = []
    for name, parent, attribute in _projections(model, config.lora_targets):
        linear = getattr(parent, attribute)
        if isinstance(linear, LoRALinear):
            raise ValueError(f"{name} already has a LoRA adapter")
        setattr(parent, attribute, LoRALinear(linear, config.lora_rank, config.lora_alpha, config.lora_dropout))
        adapted.append(name)
    return adapted


def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its projection, in place, leaving plain Linear layers (GPT's names
    only, no lora_A/lora_B). Returns how many were merged."""
    count = 0
    for name, module in list(model.named_modules()):
        for attribute, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, attribute, child.merged())
                count += 1
    return count


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def lora_parameter_count(n_layer: int, n_embd: int, mlp_ratio: int, config: LoRAConfig) -> int:
    """Trainable adapter parameters a GPT of this shape gets: r * (in + out) per adapted projection."""
    C, H = n_embd, mlp_ratio * n_embd
    sizes = {"attn.c_attn": C + 3 * C, "attn.c_proj": C + C, "mlp.c_fc": C + H, "mlp.c_proj": H + C}
    return n_layer * config.lora_rank * sum(sizes[t] for t in config.lora_targets)


def adapter_tensors(model: nn.Module, include: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """What LoRA finetuning changed or added: every adapter, any other parameter that trains, and
    the parameters whose names start with one of `include` (a new classifier head, which the base
    weights cannot rebuild even when it stayed frozen). With the base weights they are the whole
    finetuned model."""
    return {name: p.detach() for name, p in model.named_parameters()
            if name.endswith((".lora_A", ".lora_B")) or p.requires_grad or name.startswith(include)}


def save_adapters(model: nn.Module, config: LoRAConfig, path: str | os.PathLike, *, base: str = "",
                  include: tuple[str, ...] = ()) -> None:
    """Write `adapter_tensors(model, include)` to a safetensors file whose metadata holds the LoRA
    settings (and `base`: where the base weights came from)."""
    metadata = {"format": "pt", "lora": json.dumps(cli.to_dict(config)), "base": str(base)}
    save_file({k: v.contiguous() for k, v in adapter_tensors(model, include).items()}, path, metadata=metadata)


def load_adapters(model: nn.Module, path: str | os.PathLike) -> LoRAConfig:
    """Load an adapters file written by `save_adapters` into `model` (the base weights already in
    it), adding the adapters first if the model has none. Returns the file's LoRA settings."""
    tensors, metadata = load_file_with_metadata(path)
    if "lora" not in metadata:
        raise ValueError(f"{path}: not a LoRA adapters file (its metadata has no 'lora' entry)")
    config = cli.from_dict(LoRAConfig, json.loads(metadata["lora"]), source=f"{path} [lora]")
    if not has_lora(model):
        add_lora(model, config)
    params = dict(model.named_parameters())
    missing = sorted(n for n in params if n.endswith((".lora_A", ".lora_B")) and n not in tensors)
    unknown = sorted(set(tensors) - set(params))
    wrong = [f"{n} {tuple(t.shape)} != {tuple(params[n].shape)}" for n, t in tensors.items()
             if n in params and t.shape != params[n].shape]
    if missing or unknown or wrong:
        raise ValueError(f"{path}: adapters do not fit the model: missing {missing[:4]}, unknown {unknown[:4]}, "
                         f"shapes {wrong[:4]}")
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor)
    return config
