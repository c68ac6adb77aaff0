"""Builders the evaluation tests share: tiny tokenizers and GPTs, a GPT rigged into a unigram model,
a prepared corpus in prepare.py's layout, and a run folder as the trainer leaves it. Everything is
written under the folder a test passes in (its tmp_path)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from minillm.checkpoint import save_checkpoint
from minillm.config import GPTConfig
from minillm.model import GPT
from minillm.tokenfile import TokenWriter
from minillm.tokenizer import TOKENIZER_FILE, Tokenizer

CORPUS = (
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs!\n"
    "Ça va? Très bien, merci. 東京は大きい。 Numbers: 3.14, 1,000 and 42.\n\n"
    "The cat sat on the mat. A dog ran in the park! Why? Because it could, 3 times.\n"
) * 12


def bpe_tokenizer(vocab_size: int = 320, pattern: str = "gpt2") -> Tokenizer:
    return Tokenizer.train(CORPUS, vocab_size=vocab_size, pattern=pattern)


def byte_tokenizer() -> Tokenizer:
    """No merges: one token per byte, plus <|endoftext|> (id 256)."""
    return Tokenizer.train(CORPUS, vocab_size=257)


def tiny_gpt(vocab_size: int, block_size: int = 32, seed: int = 0, tie: bool = True) -> GPT:
    torch.manual_seed(seed)
    config = GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=2, n_head=2, n_embd=32,
                       tie_embeddings=tie, impl="torch")
    return GPT(config).eval()


def unigram_model(tokenizer: Tokenizer, preferences: dict[str, float], block_size: int = 64):
    """A GPT rigged to ignore its input: ln_f's weight is 0 and its bias a unit vector, so every
    position's hidden state is that vector and the logits are one fixed column of lm_head: a unigram
    model with logit preferences[c] for the byte c and 0 for every other token. Returns the model
    and its log-probabilities (float64, one per token id)."""
    config = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=block_size, n_layer=1, n_head=2, n_embd=16,
                       tie_embeddings=False, impl="torch")
    model = GPT(config).eval()
    logits = torch.zeros(config.vocab_size)
    for char, value in preferences.items():
        (token,) = tokenizer.encode_ordinary(char)
        logits[token] = value
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.zero_()
        model.transformer.ln_f.bias[0] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[:, 0] = logits
    return model, torch.log_softmax(logits.double(), -1)


def make_prepared(folder: Path, tokenizer: Tokenizer, splits: dict[str, list[str]]) -> Path:
    """prepare.py's layout: <split>.bin with <|endoftext|> before every document, documents.jsonl
    with each document's offset and length, tokenizer.bpe."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for split, texts in splits.items():
        with TokenWriter(folder / f"{split}.bin", tokenizer.vocab_size) as writer:
            for i, text in enumerate(texts):
                ids = tokenizer.encode_ordinary(text)
                writer.write([tokenizer.eot_id])
                rows.append({"id": f"{split}-{i}", "split": split, "label": None, "offset": writer.num_tokens,
                             "length": len(ids), "source": "test"})
                writer.write(ids)
    (folder / "documents.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokenizer.save(folder / TOKENIZER_FILE)
    return folder


def make_run(run_dir: Path, model: GPT, tokenizer: Tokenizer | None, *, step: int = 20, data: Path | None = None,
             logged_steps: int | None = None, ms: float = 250.0, tokens_per_step: int = 512) -> Path:
    """A run folder as the trainer leaves it: checkpoint `step` (configs, trainer_state.json with the
    tokens seen, the tokenizer), metrics.jsonl with a train record per step and a val record every 10
    (`logged_steps` past the checkpoint, as a run killed after its last save leaves them), loss.svg."""
    run_dir.mkdir(parents=True, exist_ok=True)
    logged = step if logged_steps is None else logged_steps
    with open(run_dir / "metrics.jsonl", "w") as f:
        for s in range(1, logged + 1):
            loss = 6.0 - 0.1 * s
            f.write(json.dumps({"kind": "train", "step": s, "tokens": s * tokens_per_step, "loss": loss, "lr": 1e-3,
                                "grad_norm": 1.0, "ms": ms, "tok_s": tokens_per_step / ms * 1000, "mfu": None,
                                "skipped": False}) + "\n")
            if s % 10 == 0:
                f.write(json.dumps({"kind": "val", "step": s, "tokens": s * tokens_per_step, "val_loss": loss + 0.2,
                                    "val_ppl": math.exp(loss + 0.2)}) + "\n")
    (run_dir / "loss.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"></svg>\n')
    save_checkpoint(
        run_dir, step, model,
        configs={"train": {"max_steps": step, "out_dir": str(run_dir)}, "pretrain": {"data": str(data) if data else ""}},
        json_files={"trainer_state.json": {"tokens": step * tokens_per_step, "skipped_steps": 0}},
        writers={TOKENIZER_FILE: tokenizer.save} if tokenizer is not None else None,
    )
    return run_dir
