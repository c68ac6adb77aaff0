"""Reading documents from wherever they are: files, folders, gzip archives, URLs, or Python's docs.

`read_documents(config)` streams `Document`s (text, label, split, where it came from) one at a
time from every `--input`, so memory stays flat however large the input is. An input is:
- a file, read by its format: `text` (a whole file is one document, or `--doc_sep` cuts it: "blank"
  on blank lines, "line" one per line, or any literal separator such as "<|endoftext|>"), `jsonl`
  (one JSON object per line), `json` (an array of objects, parsed incrementally), `csv` (RFC 4180
  quoting) or `tsv` (tab-separated, no quoting: a quote is just a character, which is how files
  such as SMSSpamCollection are written). `auto` picks by extension, `.gz` is decompressed on the
  fly. Records name their text with `--text_field`, and may carry a label and a split
  (`--label_field`, `--split_field`); a CSV/TSV file without a header names its `--columns`.
- a folder: every file under it matching `--glob` (recursive by default), in sorted order.
- an http(s) URL: downloaded once into the cache folder, then read from there.
- `SPLIT=PATH` (e.g. `train=imdb_train.csv`) gives every document of that input its split.
With no input, `default_corpus()` supplies English text that ships with every Python: the pydoc
documentation topics and the docstrings of the standard library, about 2 MB.

Bad input (a malformed JSON line, a CSV row with the wrong number of fields, a missing field, bytes
that are not UTF-8) raises `DataError` naming the file, the line and the field (and, for a missing
field, the fields that do exist). With `on_bad="skip"` the record is yielded as a `BadRecord`
instead, so the pipeline can count it and report where it was.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import hashlib
import http.client
import json
import os
import re
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from minillm.progress import Progress

SPLITS = ("train", "val", "test")
SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
               "dev": "val", "test": "test", "testing": "test"}
FORMATS = ("auto", "text", "jsonl", "json", "csv", "tsv")
_EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv", ".tab": "tsv"}
_MAX_JSON_RECORD = 64 << 20  # a JSON array element larger than this is taken for malformed JSON
_JSON_SPACE = re.compile(r"[ \t\r\n\ufeff]*")
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")  # a byte that was not UTF-8, as surrogateescape keeps it
# a quoted CSV field from its opening quote: text and doubled quotes, then the closing quote if there is one
_QUOTED_FIELD = re.compile(r'"[^"]*(?:""[^"]*)*("?)')
_READ_ERRORS = (OSError, EOFError, zlib.error)  # gzip.BadGzipFile is an OSError; EOFError: a cut-off .gz


class DataError(ValueError):
    """Input that cannot be read as asked; the message names the file, line and field."""


@dataclass
class SourceConfig:
    """Where documents come from and how their records are laid out."""

    input: list[str] = field(default_factory=list)  # files, folders, http(s) URLs, SPLIT=PATH; repeatable
    format: str = "auto"  # auto (by extension), text, jsonl, json, csv or tsv
    text_field: str = "text"  # JSON key or CSV/TSV column that holds the text
    label_field: str = ""  # key or column with a label (e.g. sentiment); empty: no labels
    split_field: str = ""  # key or column with the split (train/val/test); empty: none
    columns: tuple[str, ...] = ()  # column names of a CSV/TSV file that has no header line
    doc_sep: str = ""  # text files: empty = one document per file; blank, line, or a literal separator
    glob: str = "**/*"  # files of a folder input to read
    on_bad: str = "error"  # a bad record: error (stop and say where) or skip (count it in the report)
    cache_dir: Path | None = None  # where URLs are downloaded; default $MINILLM_CACHE or ~/.cache/minillm
    limit: int = 0  # stop after this many records (0: read everything)

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"SourceConfig.format must be one of {', '.join(FORMATS)}; got {self.format!r}")
        if self.on_bad not in ("error", "skip"):
            raise ValueError(f"SourceConfig.on_bad must be error or skip; got {self.on_bad!r}")
        if not self.text_field:
            raise ValueError("SourceConfig.text_field must not be empty")
        if self.limit < 0:
            raise ValueError(f"SourceConfig.limit must be >= 0, got {self.limit}")


@dataclass
class Document:
    text: str
    source: str  # where it came from: "path:line", "path", "https://...:line"; always valid UTF-8 (`readable`)
    label: str | None = None
    split: str | None = None  # train, val, test, or None (the pipeline assigns one by hash)


@dataclass
class BadRecord:
    source: str
    message: str  # the full message, location included
    split: str | None = None


def parse_input(spec: str) -> tuple[str | None, str]:
    """"train=data/x.csv" -> ("train", "data/x.csv"); a plain path or URL -> (None, spec)."""
    head, sep, rest = spec.partition("=")
    if sep and head.lower() in SPLIT_NAMES:
        return SPLIT_NAMES[head.lower()], rest
    return None, spec


def read_documents(config: SourceConfig, *, progress: bool = True) -> Iterator[Document | BadRecord]:
    """Every record of every input in order (the default corpus when there is none), up to `limit`."""
    inputs = [parse_input(spec) for spec in config.input]
    stream = (item for split, location in inputs for item in read_input(location, split, config, progress))
    if not inputs:
        from minillm.default_corpus import default_corpus  # imported here: that module imports this one

        stream = default_corpus()
    for count, item in enumerate(stream, start=1):
        yield item
        if count == config.limit:
            return


def readable(name: str) -> str:
    """A file name as text that can be written anywhere: the bytes of a name that is not UTF-8, which
    Python keeps as lone surrogates (os.fsdecode), become escapes such as "caf\\xe9.txt"."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def read_input(location: str, split: str | None, config: SourceConfig,
               progress: bool = True) -> Iterator[Document | BadRecord]:
    if re.match(r"https?://", location):
        yield from read_file(fetch(location, config.cache_dir, progress=progress), location, split, config)
        return
    path = Path(location).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.glob(config.glob)
                       if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise DataError(f"{readable(location)}: no files match --glob {config.glob!r} in this folder")
        for file in files:
            yield from read_file(file, readable(str(file)), split, config)
    elif path.exists():
        yield from read_file(path, readable(location), split, config)
    else:
        raise DataError(f"{readable(location)}: no such file or folder")


def detect_format(name: str) -> str:
    """The format a file name implies; a URL's comes from its path, so ".../x.jsonl?download=1" is jsonl."""
    if re.match(r"https?://", name):
        name = urllib.parse.urlsplit(name).path
    base = name.lower().removesuffix(".gz")
    return next((fmt for ext, fmt in _EXTENSIONS.items() if base.endswith(ext)), "text")


def read_file(path: Path, name: str, split: str | None, config: SourceConfig) -> Iterator[Document | BadRecord]:
    """One file's records; `name` is what messages call it (the URL for a download)."""
    fmt = detect_format(name) if config.format == "auto" else config.format
    if fmt == "json" and _first_char(path, name) != "[":
        fmt = "jsonl"  # a .json file of one object per line
    reader = {"text": _read_text, "jsonl": _read_jsonl, "json": _read_json_array}.get(fmt)
    if reader is not None:
        yield from reader(path, name, split, config)
    else:
        yield from _read_table(path, name, split, config, delimiter="\t" if fmt == "tsv" else ",")


# ---------------------------------------------------------------------------------------------
# bytes -> lines, with locations for every error


def _open(path: Path):
    with open(path, "rb") as probe:
        gzipped = probe.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gzipped else open(path, "rb")


def _first_char(path: Path, name: str) -> str:
    try:
        with _open(path) as f:
            head = f.read(4096).decode("utf-8", errors="replace").lstrip("\ufeff \t\r\n")
    except _READ_ERRORS as err:
        raise _unreadable(name, err) from None
    return head[:1]


def _unreadable(name: str, err: Exception, after_line: int | None = None) -> DataError:
    """The error for a file that cannot be read (or decompressed) to its end."""
    where = f" after line {after_line}" if after_line is not None else ""
    hint = " (a truncated or damaged gzip file?)" if isinstance(err, (EOFError, zlib.error, gzip.BadGzipFile)) else ""
    return DataError(f"{name}: cannot read{where}: {err}{hint}")


class _Lines:
    """A file's lines decoded one by one, so a bad byte is reported with its line number.

    In skip mode an undecodable line is left out and listed in `bad` for the reader to turn into a
    record; with `keep_bad` it is yielded instead, its bad bytes as lone surrogates (surrogateescape),
    and its problem is kept in `bad_lines` by line number: a text reader needs every line in place
    to cut documents and number them right, and drops the document that holds the bad line.
    With `keep_record` the lines of each record (CSV) are kept until the next `take_start`.
    """

    def __init__(self, path: Path, name: str, on_bad: str, keep_bad: bool = False, keep_record: bool = False):
        self.path, self.name, self.on_bad = path, name, on_bad
        self.keep_bad, self.keep_record = keep_bad, keep_record
        self.lineno = 0  # the line last read
        self.eof = False  # the whole file has been read
        self.record_start: int | None = None  # first line of the record being read (CSV)
        self.record_lines: list[str] = []  # with keep_record: the lines of the record being read
        self.last_record: list[str] = []  # ... and of the one before `take_start`: for error messages
        self.bad: list[tuple[str, str]] = []  # (where, problem) of undecodable lines not yet reported
        self.bad_lines: dict[int, str] = {}  # with keep_bad: line number -> problem, in line order

    def __iter__(self) -> Iterator[str]:
        try:
            with _open(self.path) as f:
                for raw in f:
                    self.lineno += 1
                    try:
                        line = raw.decode("utf-8")
                    except UnicodeDecodeError as err:
                        where = f"{self.name}:{self.lineno}"
                        problem = f"bytes are not UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1})"
                        if self.on_bad == "error":
                            raise DataError(f"{where}: {problem}") from None
                        if not self.keep_bad:
                            self.bad.append((where, problem))
                            continue
                        self.bad_lines[self.lineno] = problem
                        line = raw.decode("utf-8", errors="surrogateescape")
                    if self.lineno == 1:
                        line = line.removeprefix("\ufeff")
                    if self.record_start is None:
                        self.record_start = self.lineno
                    if self.keep_record:
                        self.record_lines.append(line)
                    yield line
            self.eof = True
        except _READ_ERRORS as err:
            raise _unreadable(self.name, err, self.lineno) from None

    def take_start(self) -> int:
        """The first line of the record just read; starts the next record."""
        start, self.record_start = self.record_start, None
        self.last_record, self.record_lines = self.record_lines, []
        return start if start is not None else self.lineno

    def drain(self, split: str | None, config: SourceConfig) -> Iterator[BadRecord]:
        """The undecodable lines met since the last call, as bad records."""
        yield from (_bad(where, problem, split, config) for where, problem in self.bad)
        self.bad.clear()


def _bad(where: str, problem: str, split: str | None, config: SourceConfig) -> BadRecord:
    """A bad record at `where` (file:line): raised as a DataError, or returned with on_bad=skip."""
    if config.on_bad == "error":
        raise DataError(f"{where}: {problem}")
    return BadRecord(where, f"{where}: {problem}", split)


def _record_document(record, where: str, split: str | None, config: SourceConfig) -> Document | BadRecord:
    """A JSON object or CSV row (as a dict) -> Document, checking the configured fields."""
    if not isinstance(record, dict):
        return _bad(where, f"expected a JSON object, got {type(record).__name__}", split, config)
    for key in (config.text_field, config.label_field, config.split_field):
        if key and key not in record:
            fields = ", ".join(map(str, record)) or "(none)"
            return _bad(where, f"field {key!r} is missing; the record has fields: {fields}", split, config)
    text = record[config.text_field]
    if text is None:
        text = ""  # a null text is an empty document (reported as such), not a malformed record
    if not isinstance(text, str):
        return _bad(where, f"field {config.text_field!r} holds a {type(text).__name__}, expected a string",
                    split, config)
    label = record[config.label_field] if config.label_field else None
    label = None if label is None or label == "" else str(label)
    value = str(record[config.split_field] or "").strip() if config.split_field else ""
    if value and value.lower() not in SPLIT_NAMES:
        return _bad(where, f"field {config.split_field!r}: split {value!r} is not one of train, val, test",
                    split, config)
    return Document(text, where, label, SPLIT_NAMES[value.lower()] if value else split)


# ---------------------------------------------------------------------------------------------
# formats


def _read_table(path: Path, name: str, split: str | None, config: SourceConfig,
                delimiter: str) -> Iterator[Document | BadRecord]:
    # subtle: csv's field size limit (128 KiB) is process-wide; raising it only ever accepts more
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))
    lines = _Lines(path, name, config.on_bad, keep_record=delimiter != "\t")
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.reader(lines, delimiter=delimiter, quoting=quoting)
    header = list(config.columns) or None
    if header is not None:
        _check_columns(header, f"{name}: --columns", config)
    while True:
        try:
            row = next(reader)
            error = None
        except StopIteration:
            break
        except csv.Error as err:
            row, error = None, str(err)
        yield from lines.drain(split, config)
        start = lines.take_start()
        where = f"{name}:{start}"
        if error is not None:
            yield _bad(where, error, split, config)
        elif not row:
            continue  # a blank line is not a record
        elif header is None:
            header = row
            _check_columns(header, f"{where}: the header", config)
        else:
            # a quote left open swallows the lines after it up to the next quote, or to the end of
            # the file; the csv module says nothing, so look for one where the row looks wrong
            quote = _quote_over_lines(lines.last_record, start, delimiter) \
                if len(row) != len(header) or lines.eof else None
            if len(row) == len(header) and (quote is None or quote[1] is not None):
                yield _record_document(dict(zip(header, row)), where, split, config)
                continue
            problems = [f"expected {len(header)} fields ({', '.join(header)}), got {len(row)}"] \
                if len(row) != len(header) else []
            if quote is not None:
                opened, closed = quote
                problems.append(f"the quoted field opened at line {opened} never closes: it runs to the end of the "
                                f"file (line {lines.lineno})" if closed is None else
                                f"the quoted field opened at line {opened} runs on to line {closed}: is a closing "
                                f"quote missing?")
            yield _bad(where, "; ".join(problems), split, config)
    yield from lines.drain(split, config)  # undecodable lines at the very end


def _quote_over_lines(record: list[str], first_line: int, delimiter: str) -> tuple[int, int | None] | None:
    """(the line it opens on, the line it closes on or None: never) of the first quoted field of a
    CSV record that is left open or runs over a line end; None when there is none. Scans the
    record's lines as the csv module reads them (outside quotes a quote is a plain character)."""
    text = "".join(record)
    plain = re.compile(f"[^{re.escape(delimiter)}\r\n]*")  # the rest of a field: to a delimiter or line end
    pos = 0
    while pos < len(text):
        if text[pos] == '"':
            quoted = _QUOTED_FIELD.match(text, pos)
            opened = first_line + text.count("\n", 0, pos)
            if not quoted.group(1):
                return opened, None
            spans = text.count("\n", pos, quoted.end())
            if spans:
                return opened, opened + spans
            pos = quoted.end()
        pos = plain.match(text, pos).end()
        if pos >= len(text) or text[pos] != delimiter:
            return None  # the end of the record's first line, and no quoted field ran over it
        pos += 1
    return None


def _check_columns(header: list[str], where: str, config: SourceConfig) -> None:
    """A configured column missing from the header is wrong for every row: always an error."""
    for option in ("text_field", "label_field", "split_field"):
        column = getattr(config, option)
        if column and column not in header:
            raise DataError(f"{where} has no column {column!r} (--{option}); the columns are: {', '.join(header)}")


def _read_jsonl(path: Path, name: str, split: str | None, config: SourceConfig) -> Iterator[Document | BadRecord]:
    lines = _Lines(path, name, config.on_bad)
    for line in lines:
        yield from lines.drain(split, config)
        if not line.strip():
            continue
        where = f"{name}:{lines.lineno}"
        try:
            record = json.loads(line.rstrip("\r\n"))
        except json.JSONDecodeError as err:  # its messages end in " at": "Unterminated string starting at"
            yield _bad(where, f"malformed JSON ({err.msg.removesuffix(' at')} at column {err.colno})", split, config)
            continue
        yield _record_document(record, where, split, config)
    yield from lines.drain(split, config)


def _read_json_array(path: Path, name: str, split: str | None,
                     config: SourceConfig) -> Iterator[Document | BadRecord]:
    """A JSON array of records, decoded one element at a time from 1 MB chunks (flat memory).

    A malformed element is always an error, also with on_bad=skip: inside an array there is no
    line structure to resynchronise on.
    """
    decoder, utf8 = json.JSONDecoder(), codecs.getincrementaldecoder("utf-8")()
    buf, pos, line, eof = "", 0, 1, False
    with _open(path) as f:

        def refill() -> None:
            nonlocal buf, pos, eof
            try:
                chunk = f.read(1 << 20)
            except _READ_ERRORS as err:  # a damaged .gz: the bytes so far decoded, then this
                raise _unreadable(name, err, line + buf.count("\n", pos)) from None
            eof = not chunk
            try:
                text = utf8.decode(chunk, final=eof)
            except UnicodeDecodeError as err:
                bad_line = line + buf.count("\n", pos) + chunk.count(b"\n", 0, max(err.start, 0))
                raise DataError(f"{name}:{bad_line}: bytes are not UTF-8") from None
            buf = buf[pos:] + text
            pos = 0

        def skip_space() -> str:
            nonlocal pos, line
            while True:
                match = _JSON_SPACE.match(buf, pos)
                line += buf.count("\n", pos, match.end())
                pos = match.end()
                if pos < len(buf) or eof:
                    return buf[pos : pos + 1]
                refill()

        if skip_space() != "[":
            raise DataError(f"{name}:{line}: expected a JSON array of records")
        pos += 1
        need_comma = after_comma = False
        while True:
            ch = skip_space()
            if ch == "]" and not after_comma:
                break
            if need_comma:
                if ch != ",":
                    raise DataError(f"{name}:{line}: malformed JSON array: expected ',' or ']', "
                                    f"got {ch or 'the end of the file'!r}")
                pos, need_comma, after_comma = pos + 1, False, True
                continue
            try:
                record, end = decoder.raw_decode(buf, pos)
                complete = end < len(buf) or eof  # a number cut at the chunk's end could be longer
            except json.JSONDecodeError as err:
                record, end, complete = err, pos, False
            if not complete:  # perhaps the element goes on in the next chunk
                if eof or len(buf) - pos > _MAX_JSON_RECORD:
                    where = line + buf.count("\n", pos, record.pos if isinstance(record, Exception) else pos)
                    raise DataError(f"{name}:{where}: malformed JSON ({getattr(record, 'msg', 'cut short')})")
                refill()
                continue
            yield _record_document(record, f"{name}:{line}", split, config)
            line += buf.count("\n", pos, end)
            pos, need_comma, after_comma = end, True, False


def _read_text(path: Path, name: str, split: str | None, config: SourceConfig) -> Iterator[Document | BadRecord]:
    sep = config.doc_sep
    if not sep:
        try:
            with _open(path) as f:
                data = f.read()
        except _READ_ERRORS as err:
            raise _unreadable(name, err) from None
        try:
            yield Document(data.decode("utf-8").removeprefix("\ufeff"), name, None, split)
        except UnicodeDecodeError as err:
            lineno = data.count(b"\n", 0, err.start) + 1
            yield _bad(f"{name}:{lineno}", f"bytes are not UTF-8 (byte 0x{data[err.start]:02x})", split, config)
        return
    # subtle: with on_bad=skip an undecodable line stays in the text (as surrogates), so separators
    # are found and lines numbered as in the file; the document holding it is then one bad record
    lines = _Lines(path, name, config.on_bad, keep_bad=True)

    def document(text: str, start: int) -> Document | BadRecord:
        bad = lines.bad_lines
        while bad and next(iter(bad)) < start:  # lines before this document: no later one holds them
            del bad[next(iter(bad))]
        escaped = _ESCAPED_BYTE.search(text) if bad else None
        if escaped is None:
            return Document(text, f"{name}:{start}", None, split)
        lineno = start + text.count("\n", 0, escaped.start())
        within = f" (the document from line {start} is left out)" if lineno != start else ""
        return _bad(f"{name}:{lineno}", bad[lineno] + within, split, config)

    if sep == "line":
        for line in lines:
            if line.strip():
                yield document(line.removesuffix("\n"), lines.lineno)
    elif sep == "blank":  # paragraphs: runs of non-blank lines
        paragraph, start = [], 1
        for line in lines:
            if line.strip():
                if not paragraph:
                    start = lines.lineno
                paragraph.append(line)
            elif paragraph:
                yield document("".join(paragraph), start)
                paragraph = []
        if paragraph:
            yield document("".join(paragraph), start)
    else:
        literal = sep.replace("\\n", "\n").replace("\\t", "\t")
        buffer, start = "", 1
        for line in lines:
            search_from = max(0, len(buffer) - len(literal) + 1)  # never rescan what was searched
            buffer += line
            while (cut := buffer.find(literal, search_from)) >= 0:
                piece, buffer, search_from = buffer[:cut], buffer[cut + len(literal) :], 0
                if piece.strip():
                    yield document(piece, start)
                start += piece.count("\n") + literal.count("\n")  # every line is in the text: exact
        if buffer.strip():
            yield document(buffer, start)


# ---------------------------------------------------------------------------------------------
# URLs


def cache_folder(cache_dir: Path | None) -> Path:
    return Path(cache_dir or os.environ.get("MINILLM_CACHE") or "~/.cache/minillm").expanduser()


def fetch(url: str, cache_dir: Path | None = None, *, progress: bool = True) -> Path:
    """The local copy of `url`, downloading it first if the cache does not have it yet.

    The cache file is named by a hash of the URL plus its base name; it is written under a
    temporary name and renamed when complete, so an interrupted download is never taken for a
    finished one. Delete the file to download it again.
    """
    base = re.sub(r"[^\w.-]", "_", Path(urllib.parse.urlsplit(url).path).name) or "index"
    target = cache_folder(cache_dir) / "downloads" / f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{base}"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{os.getpid()}.part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as out:
            announced, received = response.length, 0  # Content-Length; None when the server gives none
            with Progress(total=announced, desc=f"download {base}", unit="bytes", enabled=progress) as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
        # subtle: http.client ends a read quietly when the connection drops before Content-Length
        # bytes came, so a cut-off download looks finished unless the count is checked here
        if announced is not None and received != announced:
            raise DataError(f"{url}: download cut short: received {received:,} of the {announced:,} bytes the "
                            f"server announced (Content-Length); run again to retry")
        os.replace(partial, target)
    except urllib.error.HTTPError as err:
        raise DataError(f"{url}: download failed: HTTP {err.code} {err.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as err:  # IncompleteRead: a cut chunk
        raise DataError(f"{url}: download failed: {getattr(err, 'reason', err)}") from None
    finally:
        partial.unlink(missing_ok=True)
    return target
