"""The tokenizer's command line: train one, see how text splits into tokens, compare compression.

    python -m minillm.tokenizer train --files=../shared/data/tinyshakespeare.txt --vocab_size=4096 --out=runs/tok/tokenizer.bpe
    python -m minillm.tokenizer encode --tokenizer=runs/tok/tokenizer.bpe --text="To be, or not to be"
    python -m minillm.tokenizer decode --tokenizer=runs/tok/tokenizer.bpe --ids=1026,338
    python -m minillm.tokenizer stats --tokenizer=runs/tok/tokenizer.bpe --files=../shared/data/the-verdict.txt
    python -m minillm.tokenizer vocab --tokenizer=runs/tok/tokenizer.bpe | head -300 | tail
    python -m minillm.tokenizer export --tokenizer=runs/tok/tokenizer.bpe --format=gpt2 --out=runs/tok/hf

`--tokenizer` takes any tokenizer file or folder minillm reads: our tokenizer.bpe, a checkpoint
folder, GPT-2's encoder.json + vocab.bpe folder (`--tokenizer=../shared/data`), Hugging Face's
vocab.json + merges.txt or tokenizer.json, or a tiktoken file (with `--pattern`).
`python -m minillm.tokenizer COMMAND --help` lists a command's options.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from minillm.cli import format_config, parse_args
from minillm.tokenizer.bpe import render
from minillm.tokenizer.core import EOT, Tokenizer
from minillm.tokenizer.bpe_file import TokenizerFileError
from minillm.tokenizer.formats import open_tokenizer, save_tiktoken
from minillm.tokenizer.pretokenize import Splitter


@dataclass
class TrainConfig:
    files: tuple[str, ...] = ()  # text files to train on (comma-separated); each file is one document
    vocab_size: int = 4096  # ids in all: 256 bytes + merges + special tokens
    pattern: str = "gpt2"  # split pattern: gpt2, cl100k or a regex
    special_tokens: tuple[str, ...] = (EOT,)  # special token strings, given the last ids
    out: str = "tokenizer.bpe"  # where to write the trained tokenizer
    num_workers: int | None = None  # processes for pre-splitting (none: all CPUs)


@dataclass
class EncodeConfig:
    tokenizer: str = ""  # tokenizer file or folder
    text: str = ""  # the text to encode (or --file)
    file: str = ""  # a file to encode instead of --text
    allowed_special: str = "none"  # none, all, or comma-separated special tokens to encode as such
    pattern: str | None = None  # split pattern, only needed for tiktoken files


@dataclass
class DecodeConfig:
    tokenizer: str = ""  # tokenizer file or folder
    ids: tuple[int, ...] = ()  # comma-separated token ids
    errors: str = "replace"  # replace: invalid UTF-8 becomes U+FFFD; strict: fail on it
    pattern: str | None = None  # split pattern, only needed for tiktoken files


@dataclass
class StatsConfig:
    tokenizer: str = ""  # tokenizer file or folder
    files: tuple[str, ...] = ()  # text files to measure compression on
    gpt2: str = "auto"  # folder with GPT-2's encoder.json + vocab.bpe to compare with (auto: ../shared/data; none: skip)
    pattern: str | None = None  # split pattern, only needed for tiktoken files


@dataclass
class VocabConfig:
    tokenizer: str = ""  # tokenizer file or folder
    pattern: str | None = None  # split pattern, only needed for tiktoken files


@dataclass
class ExportConfig:
    tokenizer: str = ""  # tokenizer file or folder
    format: str = "gpt2"  # gpt2 (vocab.json + merges.txt in --out), tiktoken (a rank file), or bpe (ours)
    out: str = ""  # folder (gpt2) or file (tiktoken, bpe) to write
    pattern: str | None = None  # split pattern, only needed for tiktoken files

    def __post_init__(self):
        if self.format not in ("gpt2", "tiktoken", "bpe"):
            raise ValueError(f"--format must be gpt2, tiktoken or bpe, got {self.format!r}")


def train(config: TrainConfig) -> None:
    """Train a byte-level BPE tokenizer on text files and save it."""
    if not config.files:
        raise ValueError("--files: give at least one text file to train on")
    print(format_config(config))
    texts = (read_text_file(name) for name in config.files)  # read lazily, one at a time
    tokenizer = Tokenizer.train(
        texts, config.vocab_size, pattern=config.pattern, special_tokens=config.special_tokens,
        verbose=True, num_workers=config.num_workers,
    )
    tokenizer.save(config.out)
    print(f"wrote {config.out}: {tokenizer!r}")
    longest = sorted(tokenizer.merges[-2000:], key=lambda m: -len(tokenizer.token_bytes(m[2])))[:8]
    print("some long tokens:", "  ".join(render(tokenizer.token_bytes(new)) for _, _, new in longest))


def encode(config: EncodeConfig) -> None:
    """Show the ids and tokens a text encodes to."""
    tokenizer = _open(config.tokenizer, config.pattern)
    text = read_text_file(config.file) if config.file else config.text
    allowed = config.allowed_special if config.allowed_special in ("none", "all") else set(config.allowed_special.split(","))
    ids = tokenizer.encode(text, allowed_special=allowed)
    size = len(text.encode("utf-8"))
    print(f"{size:,} bytes -> {len(ids):,} tokens ({size / max(len(ids), 1):.2f} bytes/token)")
    print("ids:", ",".join(map(str, ids)))
    print("tokens:", " ".join(render(tokenizer.token_bytes(i)) for i in ids[:500]) + (" ..." if len(ids) > 500 else ""))
    print("chunks (the pattern's split, before BPE):", len(Splitter(tokenizer.pattern).split(text)))


def decode(config: DecodeConfig) -> None:
    """Print the text that token ids stand for."""
    tokenizer = _open(config.tokenizer, config.pattern)
    print(tokenizer.decode(list(config.ids), errors=config.errors))


def stats(config: StatsConfig) -> None:
    """Compression (bytes per token) on text files, next to GPT-2's."""
    tokenizer = _open(config.tokenizer, config.pattern)
    reference = _gpt2(config.gpt2)
    head = f"{'file':<32} {'bytes':>12} {'tokens':>11} {'bytes/token':>12}"
    print(f"tokenizer: {tokenizer!r}")
    print(head + (f" {'GPT-2 tokens':>13} {'GPT-2 b/t':>10}" if reference else ""))
    for name in config.files:
        text = read_text_file(name)
        size = len(text.encode("utf-8"))  # the file's size: nothing was translated
        n = len(tokenizer.encode_ordinary(text))
        line = f"{Path(name).name:<32} {size:>12,} {n:>11,} {size / max(n, 1):>12.2f}"
        if reference:
            m = len(reference.encode_ordinary(text))
            line += f" {m:>13,} {size / max(m, 1):>10.2f}"
        print(line)


def vocab(config: VocabConfig) -> None:
    """Print every token: id, bytes as text, and the merge that made it."""
    sys.stdout.write(_open(config.tokenizer, config.pattern).vocab_dump())


def export(config: ExportConfig) -> None:
    """Write the tokenizer as GPT-2/Hugging Face files, a tiktoken rank file, or our own format."""
    tokenizer = _open(config.tokenizer, config.pattern)
    if not config.out:
        raise ValueError("--out: say where to write")
    if config.format == "gpt2":
        tokenizer.save_gpt2_files(config.out)
        print(f"wrote {Path(config.out) / 'vocab.json'} and {Path(config.out) / 'merges.txt'}")
    elif config.format == "tiktoken":
        save_tiktoken(tokenizer, config.out)
        print(f"wrote {config.out} (tiktoken ranks; pattern {tokenizer.pattern_name!r} and special tokens "
              f"{tokenizer.special_tokens} are not stored in this format)")
    else:
        tokenizer.save(config.out)
        print(f"wrote {config.out}")


def read_text_file(name: str) -> str:
    """A file's text exactly as stored: decoded from its bytes, so CRLF line ends stay CRLF (read_text
    would make them LF, and the byte counts and the training text would not be the file's); an
    error names the file when it is not UTF-8."""
    data = Path(name).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ValueError(f"{name}:{line}: not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start:,})") from None


def _open(path: str, pattern: str | None) -> Tokenizer:
    if not path:
        raise ValueError("--tokenizer: give a tokenizer file or folder")
    folder = Path(path)
    if folder.is_dir() and (folder / "minillm.json").is_file() and not (folder / "tokenizer.bpe").is_file():
        raise FileNotFoundError(f"{folder}: this checkpoint has no tokenizer.bpe")
    return open_tokenizer(path, pattern=pattern)


def _gpt2(where: str) -> Tokenizer | None:
    if where == "none":
        return None
    if where == "auto":
        env = os.environ.get("MINILLM_SHARED_DATA")
        folder = Path(env) if env else Path(__file__).resolve().parents[3] / "shared" / "data"
        if not (folder / "encoder.json").is_file():
            print(f"(no GPT-2 comparison: encoder.json not found in {folder}; pass --gpt2=FOLDER)")
            return None
        where = str(folder)
    return Tokenizer.from_gpt2_files(Path(where) / "encoder.json", Path(where) / "vocab.bpe")


COMMANDS = {
    "train": (TrainConfig, train),
    "encode": (EncodeConfig, encode),
    "decode": (DecodeConfig, decode),
    "stats": (StatsConfig, stats),
    "vocab": (VocabConfig, vocab),
    "export": (ExportConfig, export),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    prog = "python -m minillm.tokenizer"
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"{prog}: error: unknown command {argv[0]!r}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    config_class, command = COMMANDS[argv[0]]
    config = parse_args(argv[1:], config_class(), prog=f"{prog} {argv[0]}", description=command.__doc__ or "")
    try:
        command(config)
    except (OSError, ValueError, TokenizerFileError) as err:
        print(f"{prog} {argv[0]}: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
