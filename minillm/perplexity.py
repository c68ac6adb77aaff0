"""Perplexity and bits per byte of a model on text: a text file, a JSONL file of documents, a folder
of them, or a token file written by prepare.py; in total and per document; any size.

The stream (`minillm.token_stream`). Every input becomes one stream of token ids laid out as prepare.py
writes token files, `<|endoftext|>` before every document, with the documents' positions: a token file
as it is, text tokenized into a temporary token file, so any size works. A token may see the end of
the previous document as context, as it does in training.

The window. `minillm.tokenfile.eval_windows` slides a window of `block_size` tokens along the stream
by `stride` and scores each target once: the first window scores all its targets, every later one
only its last `stride`, with the `block_size - stride` tokens before them as context. stride =
block_size is fastest (no overlap; early positions of each window see little context); stride = 1
gives every token the full block of context at one forward pass per token. The default, half the
block, gives every token at least half a block of context for twice the cost of no overlap.

What is scored: the tokens of the documents, each given everything before it in the window, the
`<|endoftext|>` in front of its document included; the separators themselves are not targets (the
bytes of a text have no byte for them). So for a text that fits the block, the loss is that of one
forward pass over `EOT + text` (tested), and every byte of the text is accounted for once.

The numbers, from the summed negative log-likelihood NLL (nats) over the N scored tokens that spell
B bytes of UTF-8 text:

    loss = NLL / N            perplexity = exp(loss)            bits per byte = NLL / (B * ln 2)

Perplexity depends on the tokenizer (a token is more or fewer bytes); bits per byte does not, so
models with different tokenizers compare by it. A model that predicts uniformly over V tokens has
perplexity V (tested).
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from minillm.progress import Progress
from minillm.scoring import target_logprobs
from minillm.token_stream import TokenStream, is_token_file, text_stream, token_file_stream
from minillm.tokenfile import IGNORE_INDEX, TokenFile, eval_windows


@dataclass
class PerplexityConfig:
    """What `eval.py ppl` scores, and how."""

    data: tuple[str, ...] = ()  # text, JSONL or token files, or folders of text/JSONL files (comma separated); one result each
    block_size: int | None = None  # window length in tokens; None = the model's block size
    stride: int | None = None  # new tokens scored per window, the rest being context; None = half the window
    batch_size: int = 8  # windows per forward pass
    per_document: bool = False  # also report each document's loss, perplexity and bits per byte
    max_docs: int | None = None  # score a random sample of this many documents of each input; None = all
    seed: int = 0  # which random sample --max_docs takes
    text_field: str = "text"  # the field that holds the text in JSONL inputs
    scratch_dir: str | None = None  # where text is tokenized to (a temporary token file); None = the system temp folder

    def __post_init__(self) -> None:
        self.data = tuple(self.data)
        for name in ("block_size", "stride", "max_docs"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"PerplexityConfig.{name} must be a positive integer or None, got {value!r}")
        if self.batch_size < 1:
            raise ValueError(f"PerplexityConfig.batch_size must be positive, got {self.batch_size!r}")


# ---- results ----


@dataclass
class Score:
    """The summed negative log-likelihood of `tokens` scored tokens that spell `bytes` bytes."""

    name: str
    tokens: int = 0
    nll: float = 0.0  # nats
    bytes: int | None = 0  # None when no tokenizer says what the tokens spell

    @property
    def loss(self) -> float:
        return self.nll / self.tokens if self.tokens else math.nan

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.tokens else math.nan

    @property
    def bits_per_byte(self) -> float | None:
        if self.bytes is None:
            return None
        return self.nll / (self.bytes * math.log(2)) if self.bytes else math.nan

    def to_dict(self) -> dict:
        """JSON-ready; an undefined value (no tokens, no bytes) is None rather than NaN, which JSON lacks."""
        def finite(value: float | None) -> float | None:
            return value if value is not None and math.isfinite(value) else None

        return {"name": self.name, "tokens": self.tokens, "bytes": self.bytes, "nll": self.nll, "loss": finite(self.loss),
                "perplexity": finite(self.perplexity), "bits_per_byte": finite(self.bits_per_byte)}

    def line(self) -> str:
        """`loss 3.2161 | ppl 24.93 | bpb 1.1873 | 52,110 tokens | 219,004 bytes`"""
        parts = [f"loss {self.loss:.4f}", f"ppl {self.perplexity:.2f}"]
        if self.bytes is not None:
            parts.append(f"bpb {self.bits_per_byte:.4f}")
        parts.append(f"{self.tokens:,} tokens")
        if self.bytes is not None:
            parts.append(f"{self.bytes:,} bytes")
        return " | ".join(parts)


@dataclass
class PerplexityResult:
    source: str
    total: Score
    documents: list[Score] = field(default_factory=list)  # filled when asked for per-document scores
    num_documents: int = 0
    block_size: int = 0
    stride: int = 0
    seconds: float = 0.0  # scoring time (tokenizing text not included)
    windows: int = 0

    @property
    def tokens_per_second(self) -> float:
        return self.total.tokens / self.seconds if self.seconds > 0 else math.nan

    def to_dict(self) -> dict:
        return {"source": self.source, **self.total.to_dict(), "documents": self.num_documents,
                "block_size": self.block_size, "stride": self.stride, "windows": self.windows,
                "seconds": self.seconds, "tokens_per_second": self.tokens_per_second,
                "per_document": [d.to_dict() for d in self.documents]}


# ---- scoring ----


def byte_lengths(tokenizer, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(bytes each id spells, whether it is special) for ids 0..vocab_size-1; ids the tokenizer does not
    have spell nothing. Special tokens are never scored: they are separators, not text."""
    lengths = np.zeros(vocab_size, dtype=np.int64)
    special = np.zeros(vocab_size, dtype=bool)
    if tokenizer is None:
        return lengths, special
    for i in range(min(vocab_size, tokenizer.vocab_size)):
        try:
            lengths[i] = len(tokenizer.token_bytes(i))
        except ValueError:  # a gap in the tokenizer's ids
            pass
    for i in tokenizer.special_tokens.values():
        if i < vocab_size:
            special[i], lengths[i] = True, 0
    return lengths, special


def numbered_windows(tokens, batch_size: int, block_size: int, stride: int, device: str | torch.device = "cpu",
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor, np.ndarray]]:
    """`eval_windows` batches (x, y) with the stream position of each scored target, in the row-major
    order of `y[y != IGNORE_INDEX]`: eval_windows scores targets 1, 2, ..., n-1 in turn, window after
    window, so the positions simply count on (checked at the end)."""
    next_pos = 1
    for x, y in eval_windows(tokens, batch_size, block_size, stride, device=device):
        count = int((y != IGNORE_INDEX).sum())
        yield x, y, np.arange(next_pos, next_pos + count)
        next_pos += count
    if len(tokens) >= 2 and next_pos != len(tokens):
        raise RuntimeError(f"internal error: the windows scored targets up to {next_pos - 1}, not {len(tokens) - 1}")


def score_stream(model, stream: TokenStream, tokenizer=None, *, block_size: int | None = None, stride: int | None = None,
                 batch_size: int = 8, per_document: bool = False, dtype: torch.dtype = torch.float32,
                 progress: bool = True) -> PerplexityResult:
    """Slide the window over the stream and sum each document's negative log-likelihood (see the
    module docstring). `tokenizer` gives the byte counts; without one, no bits per byte."""
    block = model.config.block_size if block_size is None else block_size
    if not 1 <= block <= model.config.block_size:
        raise ValueError(f"block_size must be in [1, {model.config.block_size}] (the model's), got {block}")
    stride = max(1, block // 2) if stride is None else stride
    if not 1 <= stride <= block:
        raise ValueError(f"stride must be in [1, block_size={block}], got {stride}")
    vocab = model.config.vocab_size
    if tokenizer is not None and tokenizer.vocab_size > vocab:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size:,} ids but the model reads only {vocab:,}")
    nbytes, special = byte_lengths(tokenizer, vocab)
    device = next(model.parameters()).device
    starts, ends = stream.starts, stream.starts + stream.lengths
    k = len(starts)
    doc_nll, doc_tokens, doc_bytes = np.zeros(k), np.zeros(k, dtype=np.int64), np.zeros(k, dtype=np.int64)
    windows = 0
    began = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        total_targets = max(len(stream.tokens) - 1, 0)
        with Progress(total_targets, desc=f"score {stream.source}", unit="tok", enabled=progress) as bar:
            for x, y, positions in numbered_windows(stream.tokens, batch_size, block, stride, device):
                logprobs = target_logprobs(model, x, y, dtype)
                scored = y != IGNORE_INDEX
                nll = (-logprobs[scored]).double().cpu().numpy()
                targets = y[scored].cpu().numpy()
                windows += len(x)
                doc = np.searchsorted(starts, positions, side="right") - 1
                keep = (doc >= 0) & (positions < ends[np.maximum(doc, 0)]) & ~special[targets]
                if keep.any():
                    docs, first = np.unique(doc[keep], return_index=True)  # positions ascend, so docs do
                    doc_nll[docs] += np.add.reduceat(nll[keep], first)
                    doc_tokens[docs] += np.add.reduceat(np.ones(int(keep.sum()), dtype=np.int64), first)
                    doc_bytes[docs] += np.add.reduceat(nbytes[targets[keep]], first)
                bar.update(len(targets), bytes=int(nbytes[targets].sum()))
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - began
    has_bytes = tokenizer is not None
    total = Score("total", int(doc_tokens.sum()), float(doc_nll.sum()), int(doc_bytes.sum()) if has_bytes else None)
    documents = []
    if per_document:
        documents = [Score(name, int(t), float(l), int(b) if has_bytes else None)
                     for name, t, l, b in zip(stream.names, doc_tokens, doc_nll, doc_bytes)]
    return PerplexityResult(stream.source, total, documents, k, block, stride, seconds, windows)


def evaluate_perplexity(model, tokenizer, path: str | os.PathLike, config: PerplexityConfig | None = None, *,
                        dtype: torch.dtype = torch.float32, progress: bool = True) -> PerplexityResult:
    """Perplexity and bits per byte of `model` on one input: a token file, a text or JSONL file, or a
    folder of them (see the module docstring)."""
    config = config or PerplexityConfig()
    with tempfile.TemporaryDirectory(prefix="minillm-eval-", dir=config.scratch_dir) as work:
        if is_token_file(path):
            made_with = TokenFile(path).vocab_size
            if made_with > model.config.vocab_size or (tokenizer is not None and made_with != tokenizer.vocab_size):
                ours = f"the model reads {model.config.vocab_size:,}" + (
                    f", its tokenizer has {tokenizer.vocab_size:,}" if tokenizer is not None else "")
                raise ValueError(f"{path} was made with a tokenizer of {made_with:,} ids ({ours}): "
                                 "evaluate it with the model trained on it")
            stream = token_file_stream(path, Path(work), config.max_docs, config.seed)
        else:
            if tokenizer is None:
                raise ValueError(f"{path} is text: scoring it needs a tokenizer (the checkpoint has none; pass --tokenizer)")
            stream = text_stream(path, tokenizer, Path(work), max_docs=config.max_docs, seed=config.seed,
                                 text_field=config.text_field, progress=progress)
        return score_stream(model, stream, tokenizer, block_size=config.block_size, stride=config.stride,
                            batch_size=config.batch_size, per_document=config.per_document, dtype=dtype,
                            progress=progress)
