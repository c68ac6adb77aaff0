"""The report card of a training run: one markdown file with what the run is and how good it is, so
runs can be compared side by side (`eval.py report RUN_A RUN_B` puts them in columns).

From the run folder's files: the newest checkpoint's configs (`minillm.json`: model shape, training
and data settings) and `trainer_state.json` (tokens seen), and `metrics.jsonl` (the trainer's log:
one `"kind": "train"` record per step with its loss and milliseconds, and `"kind": "val"` records).
The training time is the sum of the steps' times, evaluations and checkpoint saves left out; records
past the checkpoint's step (a run killed after its last save) are ignored. From running the model:
perplexity and bits per byte on the given texts (by default the held-out splits of the prepared
corpus the run was trained on, read from its "pretrain" config), multiple-choice benchmark scores,
and a few samples. The loss-curve picture is the run's `loss.svg`, linked relative to the report.

Every number is labelled with what it was measured on, and what is missing says so ("no training
log"), so a report of an imported model (no metrics.jsonl) still renders.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minillm.checkpoint import Checkpoint, load_checkpoint
from minillm.generate import SamplingConfig, generate
from minillm.model import GPT
from minillm.multiple_choice import MultipleChoiceConfig, MultipleChoiceResult, evaluate_multiple_choice
from minillm.perplexity import PerplexityConfig, PerplexityResult, evaluate_perplexity
from minillm.progress import format_duration
from minillm.runlog import read_metrics

METRICS_FILE, LOSS_CURVE, STATE_FILE = "metrics.jsonl", "loss.svg", "trainer_state.json"
DEFAULT_PROMPTS = ("", "The", "Once upon a time")  # when the run's corpus gives none; "" = from <|endoftext|>


@dataclass
class ReportConfig:
    """What `eval.py report` measures and where it writes."""

    texts: tuple[str, ...] = ()  # perplexity texts (files, folders, token files); default: the run's prepared val.bin and test.bin
    benchmarks: tuple[str, ...] = ()  # multiple-choice files to score (see `eval.py mc`)
    prompts: tuple[str, ...] = ()  # sample prompts (comma separated); default: the openings of the first val documents
    samples: int = 3  # samples shown (0: none)
    sample_tokens: int = 64  # new tokens per sample
    temperature: float = 0.8  # sampling temperature of the samples (0 = greedy)
    seed: int = 0  # sampling seed; also picks the --max_docs samples
    max_docs: int | None = None  # score a random sample of this many documents/questions per text or benchmark
    stride: int | None = None  # perplexity window stride; None = half the block
    batch_size: int = 8  # windows (perplexity) or choices (benchmarks) per forward pass
    out: str = ""  # the markdown file; default RUN/report.md for one run, report.md here for several

    def __post_init__(self) -> None:
        for name in ("texts", "benchmarks", "prompts"):
            setattr(self, name, tuple(getattr(self, name)))
        if self.samples < 0 or self.sample_tokens < 1 or self.batch_size < 1:
            raise ValueError("ReportConfig: samples must be >= 0, sample_tokens and batch_size >= 1")


@dataclass
class RunCard:
    """Everything one column of the report shows."""

    run_dir: Path
    checkpoint: Checkpoint
    parameters: int
    facts: dict[str, str] = field(default_factory=dict)  # summary rows that come from files
    perplexity: list[PerplexityResult] = field(default_factory=list)
    benchmarks: list[MultipleChoiceResult] = field(default_factory=list)
    samples: list[tuple[str, str]] = field(default_factory=list)  # (prompt, continuation)


def count_parameters(checkpoint: Checkpoint) -> int:
    """Parameters of the checkpoint's model, without reading its weights (built on the meta device)."""
    with torch.device("meta"):
        return GPT(checkpoint.model_config()).num_params()


def training_facts(checkpoint: Checkpoint, run_dir: Path) -> dict[str, str]:
    """The summary rows read from the run's files (see the module docstring)."""
    cfg = checkpoint.model_config()
    facts = {"checkpoint": f"{checkpoint.path.name} (step {checkpoint.step:,})",
             "shape": f"{cfg.n_layer} layers, {cfg.n_head} heads, width {cfg.n_embd}, block {cfg.block_size}, "
                      f"vocabulary {cfg.vocab_size:,}"}
    state = checkpoint.json(STATE_FILE) if (checkpoint.path / STATE_FILE).is_file() else {}
    log = run_dir / METRICS_FILE
    records = [r for r in read_metrics(log) if r.get("step", 0) <= checkpoint.step] if log.is_file() else []
    train = [r for r in records if r.get("kind") == "train"]
    val = [r for r in records if r.get("kind") == "val"]
    tokens = state.get("tokens", train[-1]["tokens"] if train else None)
    facts["tokens seen"] = f"{tokens:,}" if tokens is not None else "unknown (no training log)"
    if train:
        seconds = sum(r.get("ms", 0.0) for r in train) / 1000
        facts["training time"] = (f"{format_duration(seconds)} ({len(train):,} steps, "
                                  f"{train[-1]['tokens'] / max(seconds, 1e-9):,.0f} tok/s on average)")
        last = train[-1]
        recent = [r["loss"] for r in train[-10:] if math.isfinite(r.get("loss", math.nan))]
        facts["final train loss"] = (f"{last['loss']:.4f} at step {last['step']:,}" +
                                     (f" (mean of the last {len(recent)}: {sum(recent) / len(recent):.4f})" if len(recent) > 1 else ""))
    else:
        facts["training time"] = facts["final train loss"] = "unknown (no training log)"
    if val:
        last = val[-1]
        best = min(val, key=lambda r: r.get("val_loss", math.inf))
        facts["final val loss"] = (f"{last['val_loss']:.4f} (perplexity {math.exp(min(last['val_loss'], 50)):.2f}) at step "
                                   f"{last['step']:,}; best {best['val_loss']:.4f} at step {best['step']:,}")
    else:
        facts["final val loss"] = "unknown (no validation records)"
    return facts


def default_texts(checkpoint: Checkpoint) -> list[Path]:
    """The held-out splits of the prepared corpus the run was trained on, when they are still there."""
    data = checkpoint.meta.get("pretrain", {}).get("data")
    if not data:
        return []
    return [p for p in (Path(data) / "val.bin", Path(data) / "test.bin") if p.is_file() and p.stat().st_size > 64 + 4]


def default_prompts(checkpoint: Checkpoint, tokenizer, count: int, length: int = 8) -> list[str]:
    """The first `length` tokens of the first documents of the run's val split (each follows an
    <|endoftext|>), else generic openings."""
    from minillm.tokenfile import TokenFile

    texts = [p for p in default_texts(checkpoint) if p.name == "val.bin"]
    if texts and tokenizer is not None and tokenizer.eot_id is not None:
        head = np.asarray(TokenFile(texts[0]).tokens[:100_000])
        starts = np.flatnonzero(head == tokenizer.eot_id) + 1
        openings = [head[s : s + length] for s in starts[: 4 * count]]
        prompts = [tokenizer.decode(ids.tolist()) for ids in openings if len(ids) == length and tokenizer.eot_id not in ids]
        if prompts:
            return prompts[:count]
    return list(DEFAULT_PROMPTS[:count])


def build_card(run_dir: str | os.PathLike, config: ReportConfig, *, model=None, tokenizer=None,
               dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", progress: bool = True) -> RunCard:
    """Read a run's files, then measure its newest checkpoint: perplexity, benchmarks, samples.
    `model`/`tokenizer` default to the checkpoint's own."""
    run_dir = Path(run_dir)
    checkpoint = load_checkpoint(run_dir)
    if checkpoint.path.resolve() == run_dir.resolve():
        run_dir = run_dir.parent  # given a checkpoint folder: its run folder holds the log
    if model is None:
        model = checkpoint.model(device)
    if tokenizer is None:
        tokenizer = checkpoint.tokenizer()
    card = RunCard(run_dir, checkpoint, count_parameters(checkpoint), training_facts(checkpoint, run_dir))
    texts = list(config.texts) or default_texts(checkpoint)
    ppl_config = PerplexityConfig(stride=config.stride, batch_size=config.batch_size, max_docs=config.max_docs, seed=config.seed)
    for text in texts:
        card.perplexity.append(evaluate_perplexity(model, tokenizer, text, ppl_config, dtype=dtype, progress=progress))
    mc_config = MultipleChoiceConfig(batch_size=config.batch_size, max_docs=config.max_docs, seed=config.seed)
    for bench in config.benchmarks:
        card.benchmarks.append(evaluate_multiple_choice(model, tokenizer, bench, mc_config, dtype=dtype, progress=progress))
    if config.samples:
        prompts = list(config.prompts) or default_prompts(checkpoint, tokenizer, config.samples)
        prompts = [prompts[i % len(prompts)] for i in range(config.samples)]
        sampling = SamplingConfig(max_new_tokens=config.sample_tokens, temperature=config.temperature, top_k=50,
                                  seed=config.seed)
        if tokenizer is not None:
            completions = generate(model, prompts, sampling, tokenizer=tokenizer)
            card.samples = [(p, c.text) for p, c in zip(prompts, completions)]
    return card


# ---- markdown ----


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def _fence(text: str) -> list[str]:
    fence = "````" if "```" in text else "```"
    return [fence + "text", text, fence]


def render(cards: Sequence[RunCard], out: Path, *, commands: str = "") -> str:
    """The markdown of one report card, or of several side by side (one column per run)."""
    names = [str(c.run_dir) for c in cards]
    title = "Report card: " + names[0] if len(cards) == 1 else "Report cards: " + " vs ".join(names)
    lines = [f"# {title}", ""]
    if commands:
        lines += [f"Written by `{commands}`.", ""]
    rows = [["parameters"] + [f"{c.parameters:,} ({c.parameters / 1e6:.2f}M)" for c in cards]]
    for key in ("checkpoint", "shape", "tokens seen", "training time", "final train loss", "final val loss"):
        rows.append([key] + [c.facts.get(key, "") for c in cards])
    sources = list(dict.fromkeys(r.source for c in cards for r in c.perplexity))
    for source in sources:
        cells = []
        for c in cards:
            found = [r for r in c.perplexity if r.source == source]
            cells.append(found[0].total.line() if found else "not measured")
        rows.append([f"perplexity on {source}"] + cells)
    benches = list(dict.fromkeys(r.source for c in cards for r in c.benchmarks))
    for bench in benches:
        cells = []
        for c in cards:
            found = [r for r in c.benchmarks if r.source == bench]
            cells.append(f"acc {found[0].acc:.4f}, acc_norm {found[0].acc_norm:.4f} ({found[0].questions:,} questions)"
                         if found else "not measured")
        rows.append([f"{bench}"] + cells)
    lines += ["## Summary", ""] + _table([""] + names, rows) + [""]
    if not sources:
        lines += ["No perplexity texts: pass `--texts` (the run's prepared corpus was not found).", ""]
    lines += ["Perplexity cells: mean loss per token (nats), perplexity, bits per byte (comparable across "
              "tokenizers), then the tokens and bytes scored.", ""]
    for card, name in zip(cards, names):
        heading = "" if len(cards) == 1 else f" of {name}"
        lines += [f"## Samples{heading}", ""]
        if not card.samples:
            lines += ["None (asked for none, or the model has no tokenizer).", ""]
        for prompt, text in card.samples:
            lines += _fence((prompt or "<|endoftext|>") + " ▸ " + text) + [""]
        curve = card.run_dir / LOSS_CURVE
        lines += [f"## Loss curve{heading}", ""]
        if curve.is_file():
            lines += [f"![loss curve of {name}]({Path(os.path.relpath(curve, out.parent)).as_posix()})", ""]
        else:
            lines += [f"No loss curve: {curve} does not exist.", ""]
        settings = {k: v for k, v in card.checkpoint.meta.items() if k not in ("format", "version")}
        lines += [f"## Settings{heading}", "", "<details><summary>minillm.json of "
                  f"{card.checkpoint.path}</summary>", "", "```json", json.dumps(settings, indent=2), "```", "",
                  "</details>", ""]
    return "\n".join(lines)


def write_report(cards: Sequence[RunCard], out: str | os.PathLike, *, commands: str = "") -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(render(cards, out, commands=commands), encoding="utf-8")
    os.replace(tmp, out)
    return out
