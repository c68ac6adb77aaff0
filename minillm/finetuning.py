"""What classification and instruction finetuning share: the pretrained model they start from, which
of its parameters train, and batches of variable-length examples. Both then run `trainer.train`,
the same loop pretraining runs; only the model wrapper, the loss, the batches and the evaluation
differ (`minillm.classify`, `minillm.instruct`).

Which parameters train (`--trainable`), in layer groups from the top of the model down:

    group 0       the task head: the classifier (classification), or an untied lm_head
    group 1       the final LayerNorm ln_f and the last block
    group 2..L    the blocks below it, one per group
    group L+1     the embeddings wte and wpe (with a tied head, also the output projection)

`head` trains group 0, `last` groups 0..last_blocks, `all` everything, `lora` only low-rank
adapters (`minillm.lora`) and, for classification, the head. Gradual unfreezing
(`--unfreeze_every N`, after Howard & Ruder's ULMFiT) starts from that selection and adds the next
group down every N steps, so the layers nearest the new head adapt first and the general features
of the lower layers are disturbed last. The schedule is a pure function of the step, applied by the
trainer's `on_step` hook, so a resumed run unfreezes exactly when an uninterrupted one does.

Batches: `ExampleBatches` deals shuffled epochs of examples. Like pretraining's windows, every step
draws the global batch (batch_size x world_size examples) from one seeded generator, the same on
every rank, and each rank keeps its own rows; the generator, the epoch's order and the position in
it are the batch source's checkpointed state, so a resumed run sees the same batches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from minillm.distributed import DistInfo
from minillm.lora import LoRAConfig, add_lora

TRAINABLE = ("head", "last", "all", "lora")


@dataclass
class FinetuneConfig:
    """Where finetuning starts and which parameters it trains."""

    init_from: str = ""  # the pretrained model: a minillm checkpoint or run folder, or a Hugging Face GPT-2 folder
    trainable: str = "last"  # which parameters train: head, last (last_blocks blocks + ln_f + head), all, or lora
    last_blocks: int = 1  # with --trainable=last: how many blocks, counted from the top, train
    unfreeze_every: int = 0  # gradual unfreezing: every N steps the next block down starts training too (0: off)
    dropout: float | None = None  # the model's dropout while finetuning (None: as the pretrained model has it)

    def __post_init__(self) -> None:
        if self.trainable not in TRAINABLE:
            raise ValueError(f"FinetuneConfig.trainable must be one of {', '.join(TRAINABLE)}; got {self.trainable!r}")
        if self.last_blocks < 0 or self.unfreeze_every < 0:
            raise ValueError("FinetuneConfig.last_blocks and unfreeze_every must not be negative")
        if self.trainable == "lora" and self.unfreeze_every:
            raise ValueError("FinetuneConfig: gradual unfreezing (--unfreeze_every) does not combine with "
                             "--trainable=lora, which keeps the base weights frozen")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"FinetuneConfig.dropout must be in [0, 1), got {self.dropout}")


def load_base(config: FinetuneConfig, device: torch.device):
    """The pretrained model to finetune (a `minillm.hf.Pretrained`: model, tokenizer, template)."""
    from minillm.hf import load_pretrained

    if not config.init_from:
        raise ValueError("finetuning starts from a pretrained model: pass --init_from (a minillm checkpoint or "
                         "run folder, or a Hugging Face GPT-2 folder)")
    overrides = {} if config.dropout is None else {"dropout": config.dropout}
    pretrained = load_pretrained(config.init_from, device, **overrides)
    if pretrained.tokenizer is None:
        raise ValueError(f"{pretrained.source} has no tokenizer, and finetuning must read text as it was pretrained")
    return pretrained


def layer_groups(model: nn.Module, head: Sequence[nn.Parameter]) -> list[list[nn.Parameter]]:
    """The model's parameters in groups from the top down (see the module docstring)."""
    t = model.transformer
    blocks = list(t.h)
    groups = [list(head), [*t.ln_f.parameters(), *blocks[-1].parameters()]]
    groups += [list(block.parameters()) for block in reversed(blocks[:-1])]
    groups.append([*t.wte.parameters(), *t.wpe.parameters()])
    return groups


class TrainableSchedule:
    """Which parameters train at each step: `__call__(step)` sets requires_grad (the trainer's
    `on_step` hook); `prepare()` first marks every parameter that will ever train, so the
    optimizer, built once, holds them all."""

    def __init__(self, model: nn.Module, config: FinetuneConfig, head: Sequence[nn.Parameter],
                 lora: LoRAConfig | None = None):
        self.model, self.config = model, config
        if config.trainable == "lora":
            if lora is None:
                raise ValueError("--trainable=lora needs LoRA settings")
            add_lora(model, lora)  # freezes the base
            adapters = [p for n, p in model.named_parameters() if n.endswith((".lora_A", ".lora_B"))]
            self.groups = [adapters + (list(head) if lora.lora_head else [])]
            self.initial = 1
            self.label = "the LoRA adapters" + (" and the head" if lora.lora_head and head else "")
        else:
            self.groups = layer_groups(model, head)
            if not self.groups[0] and config.trainable == "head":
                raise ValueError("--trainable=head: this model has no head of its own (its output head is the tied "
                                 "token embedding); use last, all or lora")
            last = min(config.last_blocks, len(model.transformer.h))
            self.initial = {"head": 1, "last": 1 + last, "all": len(self.groups)}[config.trainable]
            self.label = {"head": "the head", "last": f"the head, ln_f and the last {last} block(s)",
                          "all": "every parameter"}[config.trainable]

    def groups_at(self, step: int) -> int:
        """How many groups, from the top, train at optimizer step `step` (0-based)."""
        more = step // self.config.unfreeze_every if self.config.unfreeze_every else 0
        return min(len(self.groups), self.initial + more)

    def prepare(self) -> None:
        self._set(len(self.groups) if self.config.unfreeze_every else self.initial)

    def __call__(self, step: int) -> None:
        self._set(self.groups_at(step))

    def _set(self, count: int) -> None:
        self.model.requires_grad_(False)
        for group in self.groups[:count]:
            for p in group:
                p.requires_grad_(True)

    def describe(self) -> str:
        total = sum(p.numel() for p in self.model.parameters())
        trained = sum(p.numel() for group in self.groups[: self.initial] for p in group)
        line = f"trainable: {self.label}: {trained:,} of {total:,} parameters ({100 * trained / total:.2f}%)"
        if self.config.unfreeze_every:
            line += f"; one more block every {self.config.unfreeze_every} steps until all {len(self.groups)} groups train"
        return line


class ExampleBatches:
    """Training batches of examples in shuffled epochs (a `trainer.BatchSource`; see the module
    docstring). `collate(list of examples) -> tuple of tensors` makes one micro-batch."""

    def __init__(self, examples: Sequence[Any], batch_size: int, collate: Callable[[list], tuple], *,
                 seed: int, dist: DistInfo | None = None):
        if not examples:
            raise ValueError("no training examples")
        self.examples, self.batch_size, self.collate = examples, batch_size, collate
        self.dist = dist or DistInfo()
        self.generator = torch.Generator().manual_seed(seed)
        self.order = torch.randperm(len(examples), generator=self.generator)
        self.position, self.epoch = 0, 0

    def next_batch(self) -> tuple[torch.Tensor, ...]:
        picked = []
        while len(picked) < self.batch_size * self.dist.world_size:
            if self.position == len(self.order):  # a new epoch, newly shuffled
                self.order = torch.randperm(len(self.examples), generator=self.generator)
                self.position, self.epoch = 0, self.epoch + 1
            picked.append(int(self.order[self.position]))
            self.position += 1
        mine = picked[self.dist.rank * self.batch_size : (self.dist.rank + 1) * self.batch_size]
        return self.collate([self.examples[i] for i in mine])

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "order": self.order.clone(), "position": self.position,
                "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.order, self.position, self.epoch = state["order"].long(), int(state["position"]), int(state["epoch"])


def check_train_config(train_config) -> None:
    """Finetuning pads each batch to its own longest example, so tokens per micro-batch vary and
    token-based accumulation has no fixed size."""
    if train_config.tokens_per_step:
        raise ValueError("--tokens_per_step is for pretraining's fixed-size windows; finetuning batches vary in "
                         "length: set the number of examples per step with --batch_size")


@dataclass
class FinetuneStart:
    """What every finetuning job begins with: its process group, the pretrained model, and a print
    that only rank 0 speaks through."""

    dist: DistInfo
    base: Any  # minillm.hf.Pretrained
    say: Callable[..., None]


@contextmanager
def finetune_start(ft: FinetuneConfig, train_config, print_fn=print) -> Iterator[FinetuneStart]:
    """Check the settings, join the process group (one process, or one per torchrun rank), seed and
    load the base model; the process group is torn down however the job ends."""
    from minillm.distributed import setup, teardown

    check_train_config(train_config)
    dist = setup(train_config.device)
    try:
        if ft.unfreeze_every and dist.distributed:
            raise ValueError("gradual unfreezing runs in one process (DistributedDataParallel needs every trained "
                             "parameter to get a gradient at every step)")
        torch.manual_seed(train_config.seed)
        base = load_base(ft, dist.device)
        yield FinetuneStart(dist, base, print_fn if dist.is_main else (lambda *_: None))
    finally:
        teardown(dist)
