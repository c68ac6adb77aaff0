"""Perplexity and bits per byte of a model on text: a text file, a JSONL file of documents, a folder
of them, or a token file written by prepare.py; in total and per document; any size.

The stream. Every input becomes one stream of token ids laid out as prepare.py writes token files:
`<|endoftext|>` before every document (`EOT d1 EOT d2 ...`). A token file is used as it is (memory
mapped), with its documents from the `documents.jsonl` beside it when there is one; text is tokenized
first, piece by piece, into a temporary token file, so neither needs to fit in memory. A token may
see the end of the previous document as context, as it does in training.

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

Reading text of any size: a text file is read in pieces of about a megabyte, each cut just before a
space that follows a non-space character. The GPT-2 and cl100k split patterns never join such a pair
into one pre-token, so tokenizing piece by piece gives exactly the ids of tokenizing the whole text
(tested); text without such a place (no spaces) is read whole, and so is every file when the
tokenizer has a split pattern of its own.
"""

from __future__ import annotations

import codecs
import json
import math
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from minillm.progress import Progress
from minillm.scoring import sample_indices, target_logprobs
from minillm.tokenfile import IGNORE_INDEX, MAGIC, TokenFile, TokenWriter, eval_windows
from minillm.tokenizer import PATTERNS

DOCUMENTS_FILE = "documents.jsonl"  # prepare.py's index of the documents in its token files
PIECE_BYTES = 1 << 20  # how much of a text file is read and tokenized at a time


class EvalDataError(ValueError):
    """An input that cannot be evaluated: unreadable, not UTF-8, a bad JSONL line (named)."""


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
        clean = lambda v: None if v is None or (isinstance(v, float) and not math.isfinite(v)) else v  # noqa: E731
        return {"name": self.name, "tokens": self.tokens, "bytes": self.bytes, "nll": self.nll,
                "loss": clean(self.loss), "perplexity": clean(self.perplexity), "bits_per_byte": clean(self.bits_per_byte)}

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


# ---- the stream ----


@dataclass
class TokenStream:
    """Token ids with the documents in them: document i is tokens[starts[i] : starts[i] + lengths[i]]."""

    tokens: np.ndarray
    starts: np.ndarray  # int64, increasing
    lengths: np.ndarray  # int64
    names: list[str]
    source: str


def is_token_file(path: str | os.PathLike) -> bool:
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(len(MAGIC)) == MAGIC


def token_file_stream(path: str | os.PathLike, work_dir: Path, max_docs: int | None = None, seed: int = 0) -> TokenStream:
    """A prepare.py token file, with its documents from documents.jsonl beside it (rows of this split,
    the file's stem) or, without one, the whole file as one document. A --max_docs sample is copied
    (each document with the separator before it) into a token file in `work_dir`."""
    path = Path(path)
    tf = TokenFile(path)
    index = path.parent / DOCUMENTS_FILE
    if not index.is_file():
        if max_docs is not None:
            raise EvalDataError(f"{path}: --max_docs needs the documents of a token file, but there is no {index}")
        return TokenStream(tf.tokens, np.array([0]), np.array([len(tf)]), [path.name], str(path))
    rows = []
    with open(index, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            try:
                row = json.loads(line)
                if row.get("split") == path.stem:
                    rows.append((int(row["offset"]), int(row["length"]), str(row.get("id", len(rows)))))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as err:
                raise EvalDataError(f"{index}:{number}: not a document row with offset and length ({err})") from None
    if not rows:
        raise EvalDataError(f"{index} lists no documents of split {path.stem!r} (the token file's name)")
    for offset, length, name in rows:
        if offset < 1 or offset + length > len(tf):
            raise EvalDataError(f"{index}: document {name} (offset {offset}, length {length}) lies outside {path} "
                                f"({len(tf):,} tokens)")
    keep = sample_indices(len(rows), max_docs, seed)
    if keep is None:
        offsets, lengths, names = zip(*rows)
        return TokenStream(tf.tokens, np.array(offsets, dtype=np.int64), np.array(lengths, dtype=np.int64),
                           list(names), str(path))
    sample = work_dir / f"sample-{path.stem}.bin"
    starts, lengths, names = [], [], []
    with TokenWriter(sample, tf.vocab_size) as writer:
        for i in keep:
            offset, length, name = rows[i]
            writer.write(tf.tokens[offset - 1 : offset + length])  # with the separator before it
            starts.append(writer.num_tokens - length)
            lengths.append(length)
            names.append(name)
    return TokenStream(TokenFile(sample).tokens, np.array(starts, dtype=np.int64), np.array(lengths, dtype=np.int64),
                       names, f"{path} ({len(keep)} of {len(rows)} documents)")


# ---- text inputs ----


def safe_cut(text: str) -> int:
    """The last index i where text[i] is a space after a non-space character (0: none). Tokenizing
    text[:i] and text[i:] apart gives the ids of tokenizing text whole (see the module docstring)."""
    i = text.rfind(" ")
    while i > 0 and text[i - 1].isspace():
        i = text.rfind(" ", 0, i)
    return max(i, 0)


def text_pieces(path: str | os.PathLike, piece_bytes: int | None = PIECE_BYTES) -> Iterator[str]:
    """A UTF-8 text file in pieces of about `piece_bytes`, cut where tokenization does not care
    (None: the whole file at once)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    carry, offset = "", 0
    with open(path, "rb") as f:
        while True:
            raw = f.read(-1 if piece_bytes is None else piece_bytes)
            try:
                carry += decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as err:
                raise EvalDataError(f"{path}: not UTF-8 text (invalid byte near offset {offset + err.start})") from None
            offset += len(raw)
            if not raw:
                break
            cut = safe_cut(carry)
            if cut:
                yield carry[:cut]
                carry = carry[cut:]
    if carry:
        yield carry


@dataclass
class TextSource:
    """One document of a text input: a whole file, or line `line` of a JSONL file."""

    path: Path
    line: int | None = None

    @property
    def name(self) -> str:
        return str(self.path) if self.line is None else f"{self.path}:{self.line}"


def text_files(path: str | os.PathLike) -> list[Path]:
    """A file itself, or every file under a folder (sorted, hidden ones skipped)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise EvalDataError(f"{path}: no such file or folder")
    if (path / DOCUMENTS_FILE).is_file():
        bins = sorted(p.name for p in path.glob("*.bin"))
        raise EvalDataError(f"{path} is a prepared folder: name one of its token files, e.g. {path / (bins[-1] if bins else 'val.bin')}")
    files = sorted(p for p in path.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise EvalDataError(f"{path}: the folder holds no files")
    return files


def text_sources(path: str | os.PathLike) -> list[TextSource]:
    """The documents of a text input: each non-empty line of a .jsonl file, each other file whole."""
    sources = []
    for file in text_files(path):
        if file.suffix == ".jsonl":
            with open(file, "rb") as f:
                sources += [TextSource(file, n) for n, line in enumerate(f, start=1) if line.strip()]
        else:
            sources.append(TextSource(file))
    return sources


def iter_source_texts(sources: Sequence[TextSource], text_field: str, piece_bytes: int | None = PIECE_BYTES,
                      ) -> Iterator[tuple[TextSource, Iterator[str]]]:
    """(source, its text in pieces) in order, reading each JSONL file once from top to bottom."""
    open_jsonl: dict[Path, Iterator[tuple[int, str]]] = {}
    for source in sources:
        if source.line is None:
            yield source, text_pieces(source.path, piece_bytes)
            continue
        lines = open_jsonl.get(source.path)
        if lines is None:
            lines = open_jsonl[source.path] = enumerate(_utf8_lines(source.path), start=1)
        for number, line in lines:
            if number == source.line:
                break
        yield source, iter([_jsonl_text(source, line, text_field)])


def _utf8_lines(path: Path) -> Iterator[str]:
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError:
                raise EvalDataError(f"{path}:{number}: not UTF-8 text") from None


def _jsonl_text(source: TextSource, line: str, text_field: str) -> str:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise EvalDataError(f"{source.name}: not valid JSON ({err.msg})") from None
    text = row.get(text_field) if isinstance(row, dict) else None
    if not isinstance(text, str):
        raise EvalDataError(f"{source.name}: needs a string field {text_field!r} (set --text_field)")
    return text


def text_stream(path: str | os.PathLike, tokenizer, work_dir: Path, *, max_docs: int | None = None, seed: int = 0,
                text_field: str = "text", progress: bool = True) -> TokenStream:
    """Tokenize a text input into a token file in `work_dir`: EOT before every document (when the
    tokenizer has one), the documents' positions recorded."""
    sources = text_sources(path)
    keep = sample_indices(len(sources), max_docs, seed)
    chosen = sources if keep is None else [sources[i] for i in keep]
    eot = tokenizer.eot_id
    # the cuts between pieces are proven safe for the built-in split patterns only: others read whole files
    piece_bytes = PIECE_BYTES if tokenizer.pattern in PATTERNS.values() else None
    out = work_dir / "text.bin"
    starts, lengths, names = [], [], []
    with TokenWriter(out, tokenizer.vocab_size) as writer, \
            Progress(len(chosen), desc=f"tokenize {path}", unit="docs", enabled=progress) as bar:
        for source, pieces in iter_source_texts(chosen, text_field, piece_bytes):
            if eot is not None:
                writer.write([eot])
            start, size = writer.num_tokens, 0
            for piece in pieces:
                writer.write(np.asarray(tokenizer.encode_ordinary(piece), dtype=np.int64))
                size += len(piece.encode("utf-8"))
            starts.append(start)
            lengths.append(writer.num_tokens - start)
            names.append(source.name)
            bar.update(1, bytes=size)
    what = str(path) if keep is None else f"{path} ({len(chosen)} of {len(sources)} documents)"
    return TokenStream(TokenFile(out).tokens, np.array(starts, dtype=np.int64), np.array(lengths, dtype=np.int64),
                       names, what)


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
