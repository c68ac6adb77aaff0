"""Checkpoints: one folder per save, written whole or not at all. The one checkpoint module every
script uses (training, resume, evaluation, finetuning, sampling, serving).

A run folder holds numbered checkpoint folders:

    runs/demo/
      ckpt-00000500/
        minillm.json          format, version, step, and every config of the run (JSON, human-readable)
        model.safetensors     the weights (a tied lm_head is stored once, as transformer.wte.weight)
        ...                   whatever else the caller adds: tokenizer, optimizer and RNG state, ...
      ckpt-00001000/

Crash safety: a checkpoint is written into a hidden temporary folder, every file fsynced, and only
then renamed to its final name; a rename within a folder is atomic, so a crash (even SIGKILL) during
a save leaves the previous checkpoints whole and at worst a `.tmp` folder, which the next save
removes. Old checkpoints beyond `keep_last` are deleted the same way round: renamed away first.

Finetuned models are saved the same way: a classifier (`minillm.classify`) has GPT's weights minus
lm_head plus `classifier.*`, and a "classifier" section in minillm.json; a LoRA model
(`minillm.lora`) has GPT's weights plus `*.lora_A`/`*.lora_B` and a "lora" section, and
`Checkpoint.model()` merges its adapters into the weights.

Nothing here unpickles: weights are safetensors (our own reader), everything else JSON.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from minillm import cli
from minillm.config import GPTConfig
from minillm.model import GPT
from minillm.safetensors import load_file, save_file
from minillm.tokenizer import TOKENIZER_FILE, Tokenizer

FORMAT = "minillm-checkpoint"
VERSION = 1
META_FILE = "minillm.json"
WEIGHTS_FILE = "model.safetensors"
# minillm.json sections that change what the weights are: a classifier head (minillm.classify) and
# LoRA adapters (minillm.lora); `Checkpoint.model()` reads the second and refuses the first
CLASSIFIER_KEY, LORA_KEY = "classifier", "lora"
_NAME = re.compile(r"^ckpt-(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"ckpt-{step:08d}"


def model_tensors(model: GPT) -> dict[str, torch.Tensor]:
    """The model's state dict with the tied lm_head alias left out (it is wte's tensor)."""
    state = dict(model.state_dict())
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    return state


def restore_weights(model: GPT, tensors: dict[str, torch.Tensor], *, source: str | os.PathLike, assign: bool = False) -> None:
    """Load saved `tensors` into `model`, re-tying a tied head; a mismatch names `source`. Works for
    any model whose state dict uses GPT's names plus its own (a classifier head, LoRA adapters).

    `assign=True` adopts the tensors themselves (for a model built on the meta device); otherwise
    they are copied into the model's existing parameters, which an optimizer may already hold.
    """
    state = dict(tensors)
    expected = model.state_dict()
    # a classifier has no lm_head (its head is replaced), so there is no alias to re-tie
    tied = getattr(getattr(model, "config", None), "tie_embeddings", False) and "lm_head.weight" in expected
    if tied and "transformer.wte.weight" in state:
        state["lm_head.weight"] = state["transformer.wte.weight"]
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        raise ValueError(f"{source}: weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}, shapes {wrong[:5]}")
    model.load_state_dict(state, assign=assign)
    if tied and assign:
        model.lm_head.weight = model.transformer.wte.weight  # assign=True replaced the shared Parameter


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    model: GPT,
    *,
    configs: dict[str, Any] | None = None,
    tensors: dict[str, dict[str, torch.Tensor]] | None = None,
    json_files: dict[str, Any] | None = None,
    writers: dict[str, Callable[[Path], None]] | None = None,
    keep_last: int | None = None,
) -> Path:
    """Write checkpoint `step` of `model` into `run_dir` atomically; returns its folder.

    configs:    extra sections for minillm.json beside "model" (e.g. {"train": TrainConfig(...)}),
                dataclasses or plain dicts
    tensors:    more safetensors files, file name -> tensors (e.g. optimizer state)
    json_files: more JSON files, file name -> object (e.g. RNG and data position)
    writers:    file name -> function that writes that file at the path it is given (e.g. a tokenizer)
    keep_last:  afterwards, delete all but the newest `keep_last` checkpoints
    """
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be at least 1, got {keep_last}")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in run_dir.glob(".ckpt-*.tmp*"):  # left by a save or delete that crashed
        shutil.rmtree(stale, ignore_errors=True)
    final = run_dir / checkpoint_name(step)
    tmp = run_dir / f".{final.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    meta = {"format": FORMAT, "version": VERSION, "step": step, "model": cli.to_dict(model.config)}
    for section, config in (configs or {}).items():
        meta[section] = cli.to_dict(config) if not isinstance(config, dict) else config
    _write_json(tmp / META_FILE, meta)
    save_file(model_tensors(model), tmp / WEIGHTS_FILE, metadata={"format": "pt"})
    for name, group in (tensors or {}).items():
        save_file(group, tmp / name)
    for name, obj in (json_files or {}).items():
        _write_json(tmp / name, obj)
    for name, write in (writers or {}).items():
        write(tmp / name)
    _fsync_tree(tmp)
    if final.exists():  # saving the same step again (e.g. a resumed run): replace it whole
        doomed = run_dir / f".{final.name}.tmp-old-{os.getpid()}"
        os.replace(final, doomed)
        shutil.rmtree(doomed)
    os.replace(tmp, final)
    _fsync_dir(run_dir)
    if keep_last is not None:
        for old in list_checkpoints(run_dir)[:-keep_last]:
            doomed = run_dir / f".{old.name}.tmp-del"
            os.replace(old, doomed)
            shutil.rmtree(doomed)
    return final


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """The complete checkpoints in `run_dir`, oldest step first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := _NAME.match(p.name)) and (p / META_FILE).is_file()]
    return [p for _, p in sorted(found)]


def find_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint folder itself, or the newest complete checkpoint of a run folder."""
    path = Path(path)
    if (path / META_FILE).is_file():
        return path
    found = list_checkpoints(path)
    if not found:
        what = "does not exist" if not path.exists() else f"holds no {META_FILE} and no ckpt-*/ folders"
        raise FileNotFoundError(f"no minillm checkpoint at {path}: it {what}")
    return found[-1]


@dataclass
class Checkpoint:
    """A checkpoint folder opened for reading: its metadata, and loaders for what it holds."""

    path: Path
    meta: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    def model_config(self, **overrides) -> GPTConfig:
        config = cli.from_dict(GPTConfig, self.meta["model"], source=str(self.path / META_FILE))
        return GPTConfig(**{**cli.to_dict(config), **overrides})

    def tensors(self, name: str = WEIGHTS_FILE, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        return load_file(self.path / name, device)

    def json(self, name: str) -> Any:
        return _read_json(self.path / name)

    def tokenizer(self) -> Tokenizer | None:
        """The tokenizer saved with this checkpoint (its TOKENIZER_FILE), or None if it has none."""
        path = self.path / TOKENIZER_FILE
        return Tokenizer.load(path) if path.is_file() else None

    def lora_config(self):
        """The LoRA settings of a checkpoint whose weights include low-rank adapters, else None."""
        from minillm.lora import LoRAConfig  # imported here: only LoRA checkpoints need it

        data = self.meta.get(LORA_KEY)
        return None if data is None else cli.from_dict(LoRAConfig, data, source=f"{self.path / META_FILE} [{LORA_KEY}]")

    def model(self, device: str | torch.device = "cpu", **config_overrides) -> GPT:
        """The GPT with the saved weights, on `device`, in eval mode (e.g. `impl="torch"` to force a path).
        LoRA adapters, if the checkpoint has them, are merged into the weights they adapt."""
        if CLASSIFIER_KEY in self.meta:
            raise ValueError(f"{self.path} holds a classifier, not a language model: "
                             f"load it with minillm.classify.load_classifier (or finetune.py classify --predict)")
        config = self.model_config(**config_overrides)
        lora = self.lora_config()
        with torch.device("meta"):  # no point initialising weights that are replaced at once
            model = GPT(config)
            if lora is not None:
                from minillm.lora import add_lora

                add_lora(model, lora)
        restore_weights(model, self.tensors(device=device), source=self.path / WEIGHTS_FILE, assign=True)
        if lora is not None:
            from minillm.lora import merge_lora

            merge_lora(model)
        return model.to(device).eval()


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Open a checkpoint folder (or a run folder's newest); checks the format and version."""
    folder = find_checkpoint(path)
    meta = _read_json(folder / META_FILE)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{folder / META_FILE}: not a minillm checkpoint (format is {meta.get('format') if isinstance(meta, dict) else meta!r})")
    if meta.get("version") != VERSION:
        raise ValueError(f"{folder / META_FILE}: checkpoint version {meta.get('version')!r} is not supported (this minillm reads {VERSION})")
    return Checkpoint(folder, meta)


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON (line {err.lineno}: {err.msg})") from None


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
