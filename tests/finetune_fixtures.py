"""Builders the finetuning tests share: a tiny tokenizer and GPT saved as a pretrained checkpoint,
a small labelled data set with a learnable rule, and instruction records. Everything is written
under the folder a test passes in (its tmp_path)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from minillm.checkpoint import save_checkpoint
from minillm.config import GPTConfig
from minillm.model import GPT
from minillm.tokenizer import TOKENIZER_FILE, Tokenizer

WORDS = ("the cat sat on a mat and we went to see it at noon with some tea before the rain came "
         "win a free prize now call claim cash urgent reply stop").split()
SPAM_WORDS = ("win", "free", "prize", "claim", "cash", "urgent")
HAM_WORDS = ("cat", "mat", "tea", "rain", "noon", "sat")


def tiny_tokenizer() -> Tokenizer:
    return Tokenizer.train(" ".join(WORDS * 20) + "\n### Instruction: Response: Input: Below is\n", vocab_size=300)


def tiny_config(vocab_size: int, **overrides) -> GPTConfig:
    settings = dict(vocab_size=vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32, impl="torch")
    return GPTConfig(**{**settings, **overrides})


def pretrained_checkpoint(folder: Path, seed: int = 0, **overrides) -> tuple[Path, GPT, Tokenizer]:
    """A randomly initialised tiny GPT and its tokenizer, saved as a minillm checkpoint."""
    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    model = GPT(tiny_config(tokenizer.vocab_size, **overrides))
    path = save_checkpoint(folder, 0, model, writers={TOKENIZER_FILE: tokenizer.save})
    return path, model, tokenizer


def labelled_texts(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """(label, text) pairs: spam texts end with one of SPAM_WORDS, ham texts with one of HAM_WORDS,
    so the label is readable from the last token (what the classifier looks at)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "spam" if i % 3 == 0 else "ham"
        body = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 9)))
        rows.append((label, f"{body} {rng.choice(SPAM_WORDS if label == 'spam' else HAM_WORDS)}"))
    return rows


def write_tsv(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("".join(f"{label}\t{text}\n" for label, text in rows), encoding="utf-8")
    return path


def instruction_records(n: int = 24) -> list[dict[str, str]]:
    """Records with a fixed, learnable answer per instruction; a third of them have an input. Only
    six words occur, so every test record's instruction also occurs in train."""
    records = []
    for i in range(n):
        word = ("tea", "rain", "noon", "win", "cash", "stop")[i % 6]
        if i % 3 == 0:
            records.append({"instruction": "Repeat the input.", "input": word, "output": word})
        else:
            records.append({"instruction": f"Say {word}.", "input": "", "output": f"{word} {word}"})
    return records


def write_records(path: Path, records: list[dict]) -> Path:
    path.write_text(json.dumps(records, indent=1), encoding="utf-8")
    return path
