"""Our own tokenizer file format (`tokenizer.bpe`): versioned, plain text, readable by people.

UTF-8 text, one record per line, `#` starting a comment:

    minillm-bpe 1                          magic and format version
    pattern "'(?:[sdmt]|ll|ve|re)| ?..."   the split regex, as a JSON string
    vocab_size 50257                       max id + 1, a consistency check
    special 1                              the number of special tokens, then one per line:
    50256 "<|endoftext|>"                    id and string (JSON)
    bytes 256                              the id of each byte value, in byte order:
    0x21 0    # "!"
    merges 50000                           the merges in rank order, as new = left + right:
    256 = 220 + 83    # " t" = " " + "t"

The comments show each token's bytes, so a learner can read the merges top to bottom and watch words
being built; the loader ignores them. Every count is checked, so a truncated file is an error, and
every error names the file and the line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from minillm.tokenizer.bpe import render
from minillm.tokenizer.core import InvalidTokenError, Tokenizer

MAGIC, VERSION = "minillm-bpe", 1


class TokenizerFileError(ValueError):
    """A tokenizer file that cannot be read; the message names the file and, where known, the line."""


def save_bpe(tokenizer: Tokenizer, path) -> None:
    vocab = tokenizer._vocab
    lines = [
        f"{MAGIC} {VERSION}",
        "# A byte-level BPE tokenizer (minillm). Merges are 'new = left + right' in rank order;",
        "# comments show token bytes as text and are ignored when loading.",
        f"pattern {json.dumps(tokenizer.pattern)}",
        f"vocab_size {tokenizer.vocab_size}",
        f"special {len(tokenizer.special_tokens)}",
        *(f"{i} {json.dumps(token)}" for token, i in tokenizer.special_tokens.items()),
        "bytes 256",
        *(f"{byte:#04x} {i}    # {render(bytes([byte]))}" for byte, i in enumerate(tokenizer.byte_ids)),
        f"merges {len(tokenizer.merges)}",
        *(f"{c} = {a} + {b}    # {render(vocab[c])} = {render(vocab[a])} + {render(vocab[b])}" for a, b, c in tokenizer.merges),
    ]
    write_atomic(Path(path), "\n".join(lines) + "\n")


def load_bpe(path) -> Tokenizer:
    path = Path(path)
    lines = read_lines(path)
    pos = 0

    def fail(message: str, at: int | None = None):
        line = (at if at is not None else pos) + 1
        return TokenizerFileError(f"{path}:{line}: {message}")

    def next_line(what: str) -> str:
        nonlocal pos
        while pos < len(lines):
            text = lines[pos].strip()
            pos += 1
            if text and not text.startswith("#"):
                return text
        raise TokenizerFileError(f"{path}: the file ends where {what} should be (truncated?)")

    def record(keyword: str) -> str:
        text = next_line(f"the '{keyword}' line")
        name, _, value = text.partition(" ")
        if name != keyword:
            raise fail(f"expected a '{keyword} ...' line, found {text[:60]!r}", pos - 1)
        return value.strip()

    def integer(text: str, what: str) -> int:
        try:
            return int(text, 0)
        except ValueError:
            raise fail(f"{what} must be an integer, found {text!r}", pos - 1) from None

    def json_string(text: str, what: str) -> str:
        try:
            value, end = json.JSONDecoder().raw_decode(text)
        except json.JSONDecodeError as err:
            raise fail(f"{what} must be a JSON string: {err.msg}", pos - 1) from None
        if not isinstance(value, str) or text[end:].strip() and not text[end:].strip().startswith("#"):
            raise fail(f"{what} must be one JSON string, found {text[:60]!r}", pos - 1)
        return value

    header = lines[0].strip() if lines else ""
    magic, _, version = header.partition(" ")
    if magic != MAGIC:
        raise TokenizerFileError(f"{path}:1: not a minillm tokenizer file (expected '{MAGIC} {VERSION}', found {header[:40]!r})")
    if version.strip() != str(VERSION):
        raise TokenizerFileError(
            f"{path}:1: tokenizer format version {version.strip()!r} is not supported (this minillm reads version {VERSION})"
        )
    pos = 1
    pattern = json_string(record("pattern"), "the pattern")
    vocab_size = integer(record("vocab_size"), "vocab_size")
    # the line (0-based) each token is defined on, so an inconsistent one is reported where it is
    defined_at: dict[str, dict] = {"byte": {}, "merge": {}, "special": {}}
    specials = {}
    for _ in range(integer(record("special"), "the special-token count")):
        id_text, _, token = next_line("a special token").partition(" ")
        token = json_string(token.strip(), "a special token")
        specials[token] = integer(id_text, "a special token's id")
        defined_at["special"][token] = pos - 1
    if integer(record("bytes"), "the byte count") != 256:
        raise fail("there must be exactly 256 byte lines", pos - 1)
    byte_ids = []
    for byte in range(256):
        fields = next_line(f"byte {byte:#04x}").split("#", 1)[0].split()
        if len(fields) != 2 or integer(fields[0], "a byte value") != byte:
            raise fail(f"expected '{byte:#04x} ID' (byte {byte:#04x} and its id), found {lines[pos - 1].strip()[:60]!r}", pos - 1)
        byte_ids.append(integer(fields[1], "a byte's id"))
        defined_at["byte"][byte] = pos - 1
    merges = []
    count = integer(record("merges"), "the merge count")
    for rank in range(count):
        fields = next_line(f"merge {rank} of {count}").split("#", 1)[0].split()
        if len(fields) != 5 or fields[1] != "=" or fields[3] != "+":
            raise fail(f"expected a merge 'NEW = LEFT + RIGHT', found {lines[pos - 1].strip()[:60]!r}", pos - 1)
        merges.append((integer(fields[2], "a token id"), integer(fields[4], "a token id"), integer(fields[0], "a token id")))
        defined_at["merge"][rank] = pos - 1
    for extra in range(pos, len(lines)):
        if lines[extra].strip() and not lines[extra].strip().startswith("#"):
            raise fail(f"unexpected line after the last merge: {lines[extra].strip()[:60]!r}", extra)
    try:
        tokenizer = Tokenizer(pattern, byte_ids, merges, specials)
    except InvalidTokenError as err:
        kind, key = err.where or (None, None)
        line = defined_at.get(kind, {}).get(key)
        if line is None:
            raise TokenizerFileError(f"{path}: not a valid tokenizer: {err}") from None
        raise fail(f"not a valid tokenizer: {err}", line) from None
    except ValueError as err:
        raise TokenizerFileError(f"{path}: not a valid tokenizer: {err}") from None
    if tokenizer.vocab_size != vocab_size:
        raise TokenizerFileError(f"{path}: vocab_size says {vocab_size}, but the tokens defined make {tokenizer.vocab_size}")
    return tokenizer


def read_lines(path: Path) -> list[str]:
    try:
        with open(path, encoding="utf-8", newline="") as f:  # split on \n only: not on \x85, \u2028, ...
            return [line.rstrip("\r") for line in f.read().split("\n")]
    except UnicodeDecodeError as err:
        raise TokenizerFileError(f"{path}: not UTF-8 text (byte {err.start})") from None


def write_atomic(path: Path, text: str) -> None:
    """Write to a temporary file beside `path`, then rename: a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
