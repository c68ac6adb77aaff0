"""Any evaluation input as one stream of token ids with its documents: a token file written by
prepare.py, a text file, a JSONL file of documents, or a folder of text and JSONL files.

The layout is prepare.py's: `<|endoftext|>` before every document (`EOT d1 EOT d2 ...`), and the
position and length of every document recorded, so perplexity can be summed per document and the
separators left out. A token file is used as it is (memory-mapped), with its documents from the
`documents.jsonl` beside it (the rows of its split, the file's stem) when there is one. Text is
tokenized first into a temporary token file, so neither kind of input needs to fit in memory:

    text file     one document, the whole file (UTF-8; a bad byte is an error naming its offset)
    .jsonl file   one document per non-empty line, the string in field `text_field`
    folder        every file under it, sorted, hidden ones skipped, each read as above

`max_docs` keeps a seeded random sample of the documents, in their original order (a sample of a
token file's documents is copied, each with the separator before it, into a temporary token file).

Reading text of any size: a text file is read in pieces of about a megabyte, each cut just before a
space that follows a non-space character. The GPT-2 and cl100k split patterns never join such a pair
into one pre-token, so tokenizing piece by piece gives exactly the ids of tokenizing the whole text
(tested); text without such a place (no spaces) is read whole, and so is every file when the
tokenizer has a split pattern of its own.
"""

from __future__ import annotations

import codecs
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from minillm.progress import Progress
from minillm.scoring import sample_indices
from minillm.tokenfile import MAGIC, TokenFile, TokenWriter
from minillm.tokenizer import PATTERNS

DOCUMENTS_FILE = "documents.jsonl"  # prepare.py's index of the documents in its token files
PIECE_BYTES = 1 << 20  # how much of a text file is read and tokenized at a time


class EvalDataError(ValueError):
    """An input that cannot be evaluated: unreadable, not UTF-8, a bad JSONL line (named)."""


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
