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

import itertools
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from minillm import cli
from minillm.distributed import DistInfo, mean_across_ranks, setup, teardown
from minillm.config import GPTConfig
from minillm.model import GPT, IGNORE_INDEX
from minillm.tokenfile import eval_windows, random_windows
from minillm.trainer import TrainConfig, TrainResult, train


class RandomWindows:
    """Training batches: the global batch of random windows, drawn once, this rank's rows kept."""

    def __init__(self, tokens, batch_size: int, block_size: int, *, seed: int, dist: DistInfo | None = None):
        self.tokens, self.batch_size, self.block_size = tokens, batch_size, block_size
        self.dist = dist or DistInfo()
        self.generator = torch.Generator().manual_seed(seed)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        B, rank = self.batch_size, self.dist.rank
        x, y = random_windows(self.tokens, B * self.dist.world_size, self.block_size, self.generator)
        return x[rank * B : (rank + 1) * B], y[rank * B : (rank + 1) * B]  # (B, T) each

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


def lm_evaluator(tokens, batch_size: int, block_size: int, max_batches: int, dist: DistInfo | None = None):
    """An `evaluate(model)` for the trainer: the mean next-token loss over the first `max_batches`
    global batches (`batch_size` windows per process) of consecutive, non-overlapping windows of
    `tokens`: the same windows every time, so evaluations compare, and the same windows whatever the
    number of processes, each scoring its share of every batch. Returns {"val_loss", "val_ppl"}.

    This is the quick estimate a training run tracks; `eval.py` scores whole files with overlap.
    """
    dist = dist or DistInfo()
    global_batch = batch_size * dist.world_size
    batches = list(itertools.islice(eval_windows(tokens, global_batch, block_size), max_batches))
    if not batches:
        raise ValueError(f"{len(tokens)} validation tokens are too few to evaluate on (need at least 2)")
    mine = [(x[dist.rank :: dist.world_size], y[dist.rank :: dist.world_size]) for x, y in batches]

    def evaluate(model: nn.Module) -> dict[str, float]:
        device = next(model.parameters()).device
        total = torch.zeros((), device=device, dtype=torch.float64)
        count = torch.zeros((), device=device, dtype=torch.float64)
        for x, y in mine:
            scored = (y != IGNORE_INDEX).sum()
            if scored == 0:  # a short last batch can leave a rank without rows
                continue
            _, loss = model(x.to(device), y.to(device))  # the mean over scored targets
            total += loss.double() * scored
            count += scored
        mean = (mean_across_ranks(total, dist) / mean_across_ranks(count, dist)).item()
        return {"val_loss": mean, "val_ppl": math.exp(min(mean, 50.0))}

    return evaluate


@dataclass
class PretrainConfig:
    """What to pretrain on and from; the loop's settings are in TrainConfig, the shape in GPTConfig."""

    data: Path = Path("data/corpus")  # folder written by prepare.py: train.bin, val.bin, tokenizer.bpe
    model: str = "mini"  # GPTConfig preset; --n_layer=... and the other GPTConfig options override its fields
    init_from: str = ""  # start from the weights of this minillm checkpoint or run folder ("": random init)
    eval_batches: int = 20  # micro-batches of the val split per evaluation
    samples: int = 3  # samples printed at the end (0: none)
    sample_tokens: int = 48  # new tokens per sample

    def __post_init__(self) -> None:
        self.data = Path(self.data)
        if self.eval_batches < 1 or self.samples < 0 or self.sample_tokens < 1:
            raise ValueError("PretrainConfig: eval_batches and sample_tokens must be >= 1, samples >= 0")


def run_configs(argv: list[str], pre: PretrainConfig, train_config: TrainConfig,
                model: GPTConfig) -> tuple[PretrainConfig, TrainConfig, dict[str, Any]]:
    """(PretrainConfig, TrainConfig, the GPTConfig options given) that a train.py command line asks
    for, on top of the defaults given. The GPTConfig options stay overrides, applied to the chosen
    preset later (`model_config`): checked against the default preset they could be refused wrongly.

    `--resume` of a run that has a checkpoint starts from the settings that run was started with (its
    checkpoint's minillm.json), shape included, so `train.py --out_dir=X --resume` continues the same
    run to the same max_steps and schedule; options on the command line still override them."""
    from minillm.checkpoint import list_checkpoints, load_checkpoint

    pre_options, train_options, model_options = cli.parse_overrides(argv, pre, train_config, model)
    pre, train_config = replace(pre, **pre_options), replace(train_config, **train_options)
    if train_config.resume and list_checkpoints(train_config.out_dir):
        ckpt = load_checkpoint(train_config.out_dir)
        source = str(ckpt.path / "minillm.json")
        if "pretrain" not in ckpt.meta or "train" not in ckpt.meta:
            raise ValueError(f"{source}: not a pretraining checkpoint (no pretrain/train settings); resume it with "
                             f"the script that wrote it")
        pre = replace(cli.from_dict(PretrainConfig, ckpt.meta["pretrain"], source=source), **pre_options)
        saved_train = {**ckpt.meta["train"], "out_dir": train_config.out_dir}
        train_config = replace(cli.from_dict(TrainConfig, saved_train, source=source), **train_options)
        model_options = {**ckpt.meta["model"], **model_options}
    return pre, train_config, model_options


def model_config(pre: PretrainConfig, overrides: dict[str, Any], vocab_size: int) -> GPTConfig:
    """The preset with the command line's GPTConfig options applied, sized to the tokenizer."""
    if overrides.get("vocab_size", vocab_size) < vocab_size:
        raise ValueError(f"--vocab_size={overrides['vocab_size']} is smaller than the tokenizer's {vocab_size} tokens")
    return GPTConfig.from_preset(pre.model, **{"vocab_size": vocab_size, **overrides})


def open_prepared(folder: Path):
    """(tokenizer, train tokens, val tokens) from a prepare.py output folder, with clear errors."""
    from minillm.tokenfile import TokenFile
    from minillm.tokenizer import TOKENIZER_FILE, Tokenizer

    folder = Path(folder)
    missing = [name for name in ("train.bin", "val.bin", TOKENIZER_FILE) if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{folder} is not a prepared corpus (missing {', '.join(missing)}): run `python prepare.py --out {folder}` first"
        )
    tokenizer = Tokenizer.load(folder / TOKENIZER_FILE)
    train_tokens, val_tokens = TokenFile(folder / "train.bin"), TokenFile(folder / "val.bin")
    if len(val_tokens) < 2:
        raise ValueError(f"{folder / 'val.bin'} holds {len(val_tokens)} tokens: too few to evaluate on")
    return tokenizer, train_tokens, val_tokens


def sample_prompts(tokens, eot_id: int | None, count: int, length: int = 8) -> list[list[int]]:
    """The first `length` tokens of the first `count` documents in a token file (they follow EOT)."""
    array = tokens.tokens if hasattr(tokens, "tokens") else tokens
    head = np.asarray(array[: 200_000])
    starts = (np.flatnonzero(head == eot_id) + 1).tolist() if eot_id is not None else [0]
    prompts = [head[s : s + length].tolist() for s in starts if s + length <= len(head)]
    prompts = [p for p in prompts if eot_id not in p]
    return prompts[:count]


def pretrain(pre: PretrainConfig, train_config: TrainConfig, model_overrides: dict[str, Any],
             print_fn=print) -> TrainResult:
    """The whole pretraining job; `train.py` calls this. Returns the loop's result."""
    from minillm.checkpoint import list_checkpoints, load_checkpoint, restore_weights
    from minillm.generate import SamplingConfig, generate
    from minillm.tokenizer import TOKENIZER_FILE

    dist = setup(train_config.device)
    say = print_fn if dist.is_main else (lambda *_: None)
    try:
        tokenizer, train_tokens, val_tokens = open_prepared(pre.data)
        torch.manual_seed(train_config.seed)
        config = model_config(pre, model_overrides, tokenizer.vocab_size)
        model = GPT(config)
        if pre.init_from and not (train_config.resume and list_checkpoints(train_config.out_dir)):
            source = load_checkpoint(pre.init_from)
            restore_weights(model, source.tensors(), source=source.path)
            say(f"initialised from {source.path} (step {source.step})")
        model.to(dist.device)
        T = config.block_size
        say(cli.format_config(pre, train_config, config))
        say(f"model: {model.num_params():,} parameters ({model.num_params(non_embedding=True):,} non-embedding); "
            f"corpus: {len(train_tokens):,} train / {len(val_tokens):,} val tokens, vocabulary {tokenizer.vocab_size:,}")
        result = train(
            model, train_config,
            RandomWindows(train_tokens, train_config.batch_size, T, seed=train_config.seed, dist=dist),
            dist=dist,
            evaluate=lm_evaluator(val_tokens, train_config.batch_size, T, pre.eval_batches, dist),
            flops_per_token=model.flops_per_token(T),
            checkpoint_configs={"pretrain": pre},
            checkpoint_writers={TOKENIZER_FILE: tokenizer.save},
            print_fn=print_fn,
        )
        if dist.is_main:
            val = result.last_val
            say(f"done: {result.steps} steps, {result.tokens:,} tokens in {result.seconds:.0f}s ({result.stop_reason})"
                + (f"; val loss {val['val_loss']:.4f}, val perplexity {val['val_ppl']:.2f}" if val else ""))
            prompts = sample_prompts(val_tokens, tokenizer.eot_id, pre.samples)
            if prompts:
                completions = generate(model, prompts, SamplingConfig(max_new_tokens=pre.sample_tokens, temperature=0.8,
                                                                      top_k=50, seed=train_config.seed), tokenizer=tokenizer)
                for prompt, completion in zip(prompts, completions):
                    say(f"--- sample {completion.index + 1}\n{tokenizer.decode(prompt)}{completion.text}")
            say(f"checkpoint: {result.checkpoint}\nmetrics: {train_config.out_dir / 'metrics.jsonl'}\n"
                f"loss curve: {train_config.out_dir / 'loss.svg'}")
        return result
    finally:
        teardown(dist)
