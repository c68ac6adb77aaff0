"""The training loop. Pretraining (`train.py`) and every kind of finetuning (`finetune.py`) run it.

One optimizer step:

    for each of `accum` micro-batches (accum = tokens_per_step / tokens per micro-batch, all ranks):
        loss = loss_fn(model, batch) / accum        under autocast (bf16 or fp16 on GPU, fp32 on CPU)
        backward                                     (DDP all-reduces gradients on the last one only)
    clip the global gradient norm; if the loss or the norm is not finite: skip the step and count it
    AdamW step with the scheduled learning rate (linear warmup, cosine decay to a floor)

What a caller provides: the model, a `BatchSource` (`next_batch()` plus `state_dict()` /
`load_state_dict()`, so the data position is checkpointed), optionally an `evaluate(model) -> {"val_loss":
...}` function, a `loss_fn(model, batch)` (default: the language-model loss) and extra things to put in
each checkpoint (configs, a tokenizer writer).

Exact resume: a checkpoint holds the weights, the optimizer and loss-scaler state, the step, the
tokens seen, the batch source's state, the early-stopping and bad-step counters, and the Python,
numpy, torch and CUDA RNG states. Dropout is additionally reseeded from (seed, step, rank) at every
step, so data-parallel ranks stay reproducible without per-rank RNG files. On a CPU, a run killed at
any point and resumed ends bit for bit where an uninterrupted run ends (tested with SIGKILL).

A non-finite loss or gradient norm skips the step (no weight changes); `max_bad_steps` in a row stop
the run with an error naming the step. Weights are checked finite before every save, so no
checkpoint holds a NaN. With fp16 the loss scaler's own overflow skips are expected and not counted.
"""

from __future__ import annotations

import contextlib
import math
import random
import shutil
import signal
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn as nn

from minillm.checkpoint import find_checkpoint, list_checkpoints, load_checkpoint, restore_weights, save_checkpoint
from minillm.distributed import DistInfo, barrier, mean_across_ranks
from minillm.optim import build_adamw, load_optimizer_state, lr_at, optimizer_state_tensors
from minillm.plot import plot_loss_curve
from minillm.runlog import MetricsLog, format_step, peak_flops

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainConfig:
    """How to train: optimizer, schedule, batch, evaluation, checkpoints, precision."""

    out_dir: Path = Path("runs/default")  # checkpoints, metrics.jsonl and loss.svg go here
    max_steps: int = 1000  # optimizer steps in the whole run
    batch_size: int = 16  # sequences per micro-batch on each process
    tokens_per_step: int = 0  # tokens per optimizer step over all processes (0: one micro-batch each); sets accumulation
    learning_rate: float = 6e-4  # peak learning rate, reached at the end of warmup
    min_lr_ratio: float = 0.1  # the cosine decays to this fraction of the peak
    warmup_steps: int = 100  # linear warmup steps
    weight_decay: float = 0.1  # AdamW decoupled weight decay, on matrices only
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.95  # AdamW second-moment decay
    grad_clip: float = 1.0  # clip the global gradient norm to this (0: no clipping)
    eval_every: int = 100  # evaluate every N steps, and always at the end (0: only at the end)
    early_stopping: int = 0  # stop after N evaluations without a new best val loss (0: never)
    checkpoint_every: int = 500  # save a checkpoint every N steps, and always at the end
    keep_last: int = 3  # how many checkpoints to keep in out_dir
    resume: bool = False  # continue from the newest complete checkpoint in out_dir
    overwrite: bool = False  # start afresh even if out_dir holds an earlier run (its checkpoints and logs are deleted)
    max_bad_steps: int = 5  # stop after this many non-finite steps in a row
    seed: int = 1337  # seeds weights, data order and dropout
    device: str = "auto"  # auto (cuda when available), cpu, cuda, cuda:N
    dtype: str = "auto"  # auto (bf16 on GPUs that have it, fp16 on older GPUs, fp32 on CPU), fp32, bf16, fp16
    compile: bool = False  # torch.compile the model (faster steps after a slow first one)
    activation_checkpointing: bool = False  # recompute block activations in backward: less memory, ~30% slower
    log_every: int = 1  # print a step line every N steps

    def __post_init__(self) -> None:
        positive = ("max_steps", "batch_size", "keep_last", "max_bad_steps", "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be at least 1, got {getattr(self, name)}")
        for name in ("tokens_per_step", "warmup_steps", "eval_every", "early_stopping", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must not be negative, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise ValueError(f"TrainConfig.learning_rate must be positive, got {self.learning_rate}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"TrainConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"TrainConfig.beta1 and beta2 must be in [0, 1), got {self.beta1}, {self.beta2}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("TrainConfig.weight_decay and grad_clip must not be negative")
        if self.resume and self.overwrite:
            raise ValueError("TrainConfig: --resume continues a run and --overwrite deletes it; pick one")
        if self.dtype not in ("auto", *DTYPES):
            raise ValueError(f"TrainConfig.dtype must be auto, fp32, bf16 or fp16; got {self.dtype!r}")
        self.out_dir = Path(self.out_dir)


class BatchSource(Protocol):
    """Where micro-batches come from. Its state must be the same on every rank (rank 0's is saved)."""

    def next_batch(self) -> tuple[torch.Tensor, ...]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class TrainingDiverged(RuntimeError):
    """Too many non-finite steps in a row."""


@dataclass
class TrainResult:
    steps: int  # optimizer steps completed (resumed steps included)
    tokens: int  # tokens seen over all processes
    last_loss: float  # training loss of the last completed step
    best_val_loss: float | None
    last_val: dict[str, float]  # the last evaluation's metrics
    stop_reason: str  # "max_steps", "early stopping", "interrupted" (Ctrl-C)
    checkpoint: Path | None  # the newest checkpoint (rank 0; None on other ranks)
    skipped_steps: int  # non-finite steps skipped over the whole run
    seconds: float  # wall time of this process's part of the run


def lm_loss(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The language-model loss: batch = (inputs, targets), both (B, T)."""
    return model(batch[0], batch[1])[1]


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return DTYPES[name]
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def rng_states() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every global RNG's state: tensors (torch, CUDA) and JSON (Python, numpy)."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors |= {f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return tensors, {"python": [version, list(internal), gauss], "numpy": [name, keys.tolist(), pos, has_gauss, cached]}


def set_rng_states(tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def _split_state(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    return tensors, {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}


def _all_finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def train(
    model: nn.Module,
    config: TrainConfig,
    batches: BatchSource,
    *,
    dist: DistInfo | None = None,
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
    loss_fn: Callable[[nn.Module, tuple], torch.Tensor] = lm_loss,
    tokens_in: Callable[[tuple], int] = lambda batch: batch[0].numel(),
    flops_per_token: float | None = None,
    checkpoint_configs: dict[str, Any] | None = None,
    checkpoint_writers: dict[str, Callable[[Path], None]] | None = None,
    on_step: Callable[[int], None] | None = None,
    print_fn: Callable[[str], None] = print,
) -> TrainResult:
    """Train `model` (already on `dist.device`) as `config` says; see the module docstring.

    `on_step(step)`, if given, runs at the start of every optimizer step (0-based), before its
    batches: e.g. gradual unfreezing flips `requires_grad` there. It must depend on `step` alone, so
    a resumed run follows the same schedule. Parameters that will ever train must require grad
    when `train` is called (the optimizer is built from them); one that has no gradient in a step
    (requires_grad turned off) is left untouched by that step, weight decay included."""
    dist = dist or DistInfo(device=next(model.parameters()).device)
    device, main = dist.device, dist.is_main
    say = print_fn if main else (lambda _: None)
    dtype = resolve_dtype(config.dtype, device)
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext())
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    raw_model = model
    if config.activation_checkpointing:
        if not hasattr(raw_model, "activation_checkpointing"):
            raise ValueError(f"{type(raw_model).__name__} does not support activation checkpointing")
        raw_model.activation_checkpointing = True
    optimizer = build_adamw(raw_model, lr=config.learning_rate, weight_decay=config.weight_decay,
                            betas=(config.beta1, config.beta2), device=device)
    out_dir = config.out_dir
    if main:
        claim_out_dir(out_dir, config)
    metrics = MetricsLog(out_dir / "metrics.jsonl", enabled=main)

    # where to start: fresh, or exactly where the newest checkpoint left off
    start_step, tokens_seen, skipped, bad_in_a_row = 0, 0, 0, 0
    best_val, evals_since_best, last_val = math.inf, 0, {}
    if config.resume:
        try:
            ckpt = load_checkpoint(out_dir)
        except FileNotFoundError:
            say(f"resume: no checkpoint in {out_dir} yet; starting from step 0")
            metrics.truncate_after(0)  # the log of a run killed before its first checkpoint starts again too
        else:
            restore_weights(raw_model, ckpt.tensors(device=device), source=ckpt.path)
            state = ckpt.json("trainer_state.json")
            load_optimizer_state(optimizer, ckpt.tensors("optimizer.safetensors", device=device), state["optimizer"])
            if state["scaler"]:
                scaler.load_state_dict(state["scaler"])
            saved = ckpt.tensors("trainer_state.safetensors")
            set_rng_states({k[4:]: v for k, v in saved.items() if k.startswith("rng.")}, state["rng"])
            batches.load_state_dict({**state["data"], **{k[5:]: v for k, v in saved.items() if k.startswith("data.")}})
            start_step, tokens_seen, skipped = ckpt.step, state["tokens"], state["skipped_steps"]
            bad_in_a_row, evals_since_best = state["bad_in_a_row"], state["evals_since_best"]
            best_val = state["best_val"] if state["best_val"] is not None else math.inf
            metrics.truncate_after(start_step)
            say(f"resumed from {ckpt.path} at step {start_step} ({tokens_seen:,} tokens seen)")

    if config.compile:
        model = torch.compile(model)
    if dist.distributed:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def save(step: int) -> Path | None:
        """Rank 0 writes the checkpoint for `step`; everyone waits for it."""
        path = None
        if main:
            if not _all_finite(raw_model):
                raise TrainingDiverged(f"refusing to save step {step}: the weights hold a non-finite value")
            opt_tensors, opt_meta = optimizer_state_tensors(optimizer)
            rng_tensors, rng_json = rng_states()
            data_tensors, data_json = _split_state(batches.state_dict())
            state = {
                "optimizer": opt_meta, "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                "rng": rng_json, "data": data_json, "tokens": tokens_seen, "skipped_steps": skipped,
                "bad_in_a_row": bad_in_a_row, "evals_since_best": evals_since_best,
                "best_val": best_val if math.isfinite(best_val) else None, "last_val": last_val,
            }
            path = save_checkpoint(
                out_dir, step, raw_model, configs={"train": config, **(checkpoint_configs or {})},
                tensors={"optimizer.safetensors": opt_tensors,
                         "trainer_state.safetensors": {**{f"rng.{k}": v for k, v in rng_tensors.items()},
                                                       **{f"data.{k}": v for k, v in data_tensors.items()}}},
                json_files={"trainer_state.json": state}, writers=checkpoint_writers, keep_last=config.keep_last,
            )
        barrier(dist)
        return path

    def run_eval(step: int) -> None:
        nonlocal best_val, evals_since_best, last_val
        if evaluate is None:
            return
        model.eval()
        with torch.no_grad(), autocast:
            last_val = evaluate(raw_model)
        model.train()
        val_loss = last_val.get("val_loss")
        if val_loss is not None and val_loss < best_val:
            best_val, evals_since_best = val_loss, 0
        elif val_loss is not None:
            evals_since_best += 1
        say(f"eval step {step} | " + " | ".join(f"{k} {v:.4f}" for k, v in last_val.items()))
        metrics.write({"kind": "val", "step": step, "tokens": tokens_seen, **last_val})
        if main:
            plot_loss_curve(metrics.path, out_dir / "loss.svg", title=f"{out_dir.name}: loss")

    probe = batches.next_batch() if start_step < config.max_steps else None  # sizes the accumulation
    tokens_per_micro = tokens_in(probe) * dist.world_size if probe is not None else 1
    accum = 1
    if config.tokens_per_step:
        accum = config.tokens_per_step // tokens_per_micro
        if accum < 1 or accum * tokens_per_micro != config.tokens_per_step:
            raise ValueError(
                f"tokens_per_step={config.tokens_per_step} must be a multiple of the tokens in one micro-batch "
                f"on all processes ({tokens_per_micro} = batch_size x sequence length x {dist.world_size} process(es))"
            )
    peak = peak_flops(device, dtype)
    if start_step == 0:
        say(f"training: {config.max_steps} steps x {accum} micro-batch(es) of {tokens_per_micro:,} tokens "
            f"= {accum * tokens_per_micro:,} tokens/step on {dist.world_size} x {device} in {str(dtype)[6:]}")

    model.train()
    stop_reason, last_loss, completed = "max_steps", math.nan, start_step
    step_times: list[float] = []
    started = time.perf_counter()
    with _stop_on_ctrl_c(enabled=not dist.distributed, say=say) as interrupted:
        for step in range(start_step, config.max_steps):
            t0 = time.perf_counter()
            if on_step is not None:
                on_step(step)
            torch.manual_seed(config.seed + 1_000_003 * step + dist.rank)  # dropout: a pure function of (seed, step, rank)
            lr = lr_at(step, peak=config.learning_rate, warmup_steps=config.warmup_steps,
                       max_steps=config.max_steps, min_lr_ratio=config.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), device=device)
            step_tokens = 0
            for micro in range(accum):
                batch = probe if probe is not None else batches.next_batch()
                probe = None
                step_tokens += tokens_in(batch) * dist.world_size
                batch = tuple(t.to(device, non_blocking=True) for t in batch)
                sync = contextlib.nullcontext() if (micro == accum - 1 or not dist.distributed) else model.no_sync()
                with sync:
                    with autocast:
                        loss = loss_fn(model, batch) / accum
                    scaler.scale(loss).backward()
                loss_sum += loss.detach()
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), config.grad_clip or math.inf)
            last_loss = mean_across_ranks(loss_sum, dist).item()
            tokens_seen += step_tokens
            loss_bad = not math.isfinite(last_loss)
            norm_bad = not math.isfinite(grad_norm.item()) and not scaler.is_enabled()
            note = ""
            if loss_bad or norm_bad:
                optimizer.zero_grad(set_to_none=True)
                if scaler.is_enabled():
                    scaler.update()
                skipped += 1
                bad_in_a_row += 1
                note = f"skipped: non-finite {'loss' if loss_bad else 'gradient norm'} ({bad_in_a_row} in a row)"
                if bad_in_a_row >= config.max_bad_steps:
                    say(format_step(step + 1, config.max_steps, last_loss, lr, 0.0, 0.0, None, None, note))
                    raise TrainingDiverged(
                        f"step {step + 1}: {bad_in_a_row} non-finite steps in a row (max_bad_steps="
                        f"{config.max_bad_steps}); stopping. The last checkpoint in {out_dir} holds finite weights; "
                        f"try a lower learning_rate or grad_clip"
                    )
            else:
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                bad_in_a_row = 0
            completed = step + 1
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            step_s = time.perf_counter() - t0
            step_times = (step_times + [step_s])[-20:]
            tok_s = step_tokens / step_s
            mfu = flops_per_token * tok_s / (peak * dist.world_size) if (peak and flops_per_token) else None
            metrics.write({"kind": "train", "step": completed, "tokens": tokens_seen, "loss": last_loss, "lr": lr,
                           "grad_norm": grad_norm.item(), "ms": 1000 * step_s, "tok_s": tok_s, "mfu": mfu,
                           "skipped": bool(note)})
            last = completed == config.max_steps
            if completed % config.log_every == 0 or last or note:
                eta = (config.max_steps - completed) * statistics.median(step_times)  # robust to a slow first (compiling) step
                say(format_step(completed, config.max_steps, last_loss, lr, 1000 * step_s, tok_s, mfu, eta, note))
            if (config.eval_every and completed % config.eval_every == 0) or last:
                run_eval(completed)
                if config.early_stopping and evals_since_best >= config.early_stopping and not last:
                    say(f"early stopping at step {completed}: no better val loss in {evals_since_best} "
                        f"evaluations (best {best_val:.4f})")
                    stop_reason = "early stopping"
            if interrupted() and not last and stop_reason == "max_steps":
                stop_reason = "interrupted"
                say(f"interrupted: stopping after step {completed}; `--resume` continues from here")
            if (config.checkpoint_every and completed % config.checkpoint_every == 0) or last or stop_reason != "max_steps":
                path = save(completed)
                if path:
                    say(f"checkpoint: {path}")
            if stop_reason != "max_steps":
                break
    return TrainResult(
        steps=completed, tokens=tokens_seen, last_loss=last_loss,
        best_val_loss=best_val if math.isfinite(best_val) else None, last_val=last_val, stop_reason=stop_reason,
        checkpoint=find_checkpoint(out_dir) if main and list_checkpoints(out_dir) else None,
        skipped_steps=skipped, seconds=time.perf_counter() - started,
    )


def claim_out_dir(out_dir: Path, config: TrainConfig) -> None:
    """Make `out_dir`, refusing to mix a new run into an earlier one's checkpoints and metrics.
    `train` calls it; a job that writes into `out_dir` before training calls it first."""
    out_dir.mkdir(parents=True, exist_ok=True)
    earlier = list_checkpoints(out_dir) + [p for p in (out_dir / "metrics.jsonl", out_dir / "loss.svg") if p.exists()]
    if config.resume or not earlier:
        return
    if not config.overwrite:
        raise ValueError(f"{out_dir} already holds a run ({', '.join(p.name for p in earlier[:4])}): "
                         f"pass --resume to continue it, --overwrite to start again, or another --out_dir")
    for path in earlier:
        shutil.rmtree(path) if path.is_dir() else path.unlink()


@contextlib.contextmanager
def _stop_on_ctrl_c(enabled: bool, say: Callable[[str], None]):
    """The first Ctrl-C asks the loop to stop after the current step (and save, so the resume is
    exact); a second one aborts at once. Yields a function telling whether a stop was asked for."""
    requested = False
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return

    def handler(signum, frame):
        nonlocal requested
        if requested:
            raise KeyboardInterrupt
        requested = True
        say("\nCtrl-C: finishing this step and saving a checkpoint (press again to abort at once)")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: requested
    finally:
        signal.signal(signal.SIGINT, previous)

