"""Other people's tokenizer files (GPT-2's, tiktoken's, Hugging Face's), a vocabulary dump, and
`open_tokenizer` for whatever file or folder a user points at. Our own format is in bpe_file.py.

Imports and exports, all lossless (tests round-trip each):
- GPT-2's `encoder.json` + `vocab.bpe` (= Hugging Face's `vocab.json` + `merges.txt`): tokens are
  written as strings through GPT-2's byte -> printable character map; ids not made by a byte or a
  merge are special tokens.
- tiktoken rank files (one `base64(token bytes) rank` per line): the rank is the id, and the merges
  are recovered by running BPE on each token's bytes with the lower-ranked merges; the file stores
  neither the split pattern nor special tokens, so both are arguments.
- Hugging Face `tokenizer.json` (import): a BPE model with a ByteLevel pre-tokenizer, merges as
  "a b" strings or as [a, b] pairs; added tokens become special tokens.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

from minillm.tokenizer.bpe import encode_chunk, render
from minillm.tokenizer.bpe_file import MAGIC, TokenizerFileError, load_bpe, read_lines, write_atomic
from minillm.tokenizer.core import TOKENIZER_FILE, Tokenizer
from minillm.tokenizer.pretokenize import GPT2_PATTERN

# ----- GPT-2 / Hugging Face vocab.json + merges.txt -----------------------------------------------


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to a printable character, so that tokens can be JSON keys and
    merges can be space-separated: printable Latin-1 bytes stand for themselves; the other 68 (control
    characters, space, ...) take the characters from U+0100 up, in byte order (space -> 'Ġ')."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {}, 0
    for byte in range(256):
        if byte in keep:
            mapping[byte] = chr(byte)
        else:
            mapping[byte] = chr(256 + extra)
            extra += 1
    return mapping


def to_gpt2_string(data: bytes, table: dict[int, str] | None = None) -> str:
    table = table or bytes_to_unicode()
    return "".join(table[b] for b in data)


def load_gpt2_files(encoder_json, vocab_bpe, *, pattern: str = "gpt2") -> Tokenizer:
    encoder = _read_json(Path(encoder_json))
    if not isinstance(encoder, dict) or not all(isinstance(v, int) for v in encoder.values()):
        raise TokenizerFileError(f"{encoder_json}: expected a JSON object mapping token strings to integer ids")
    byte_ids = _byte_ids(encoder, encoder_json)
    merges = []
    for number, line in enumerate(read_lines(Path(vocab_bpe)), start=1):
        if not line.strip() or (number == 1 and line.startswith("#version")):
            continue
        merges.append(_merge(encoder, line.rstrip("\r\n").split(" "), f"{vocab_bpe}:{number}"))
    made = set(byte_ids) | {new for _, _, new in merges}
    specials = {token: i for token, i in encoder.items() if i not in made}
    return _build(pattern, byte_ids, merges, specials, f"{encoder_json} + {vocab_bpe}")


def save_gpt2_files(tokenizer: Tokenizer, folder) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    table = bytes_to_unicode()
    vocab = {}
    for i, data in enumerate(tokenizer._vocab):
        if data is not None and i not in tokenizer.special_tokens.values():
            vocab[to_gpt2_string(data, table)] = i
    for token, i in tokenizer.special_tokens.items():
        if token in vocab:
            raise ValueError(f"special token {token!r} reads like ordinary token {vocab[token]} in GPT-2's byte encoding")
        vocab[token] = i
    vocab = dict(sorted(vocab.items(), key=lambda item: item[1]))
    write_atomic(folder / "vocab.json", json.dumps(vocab, ensure_ascii=False, indent=0) + "\n")
    strings = {i: s for s, i in vocab.items()}
    merges = [f"{strings[a]} {strings[b]}" for a, b, _ in tokenizer.merges]
    write_atomic(folder / "merges.txt", "\n".join(["#version: 0.2", *merges]) + "\n")


# ----- tiktoken -----------------------------------------------------------------------------------


def save_tiktoken(tokenizer: Tokenizer, path) -> None:
    """Write tiktoken's rank file: each ordinary token's bytes (base64) and its id as the rank.

    tiktoken merges by rank, so a merge must make a higher id than every merge before it (true for
    trained, GPT-2 and tiktoken vocabularies); special tokens and the pattern are not stored.
    """
    results = [new for _, _, new in tokenizer.merges]
    for rank in range(1, len(results)):
        if results[rank] < results[rank - 1]:
            raise ValueError(
                f"cannot write a tiktoken file: merge {rank} makes id {results[rank]}, lower than the id "
                f"{results[rank - 1]} of the merge before it, and tiktoken's ranks must follow merge order"
            )
    specials = set(tokenizer.special_tokens.values())
    lines = [
        f"{base64.b64encode(data).decode('ascii')} {i}"
        for i, data in enumerate(tokenizer._vocab)
        if data is not None and i not in specials
    ]
    write_atomic(Path(path), "\n".join(lines) + "\n")


def load_tiktoken(path, *, pattern: str, special_tokens: dict[str, int] | None = None) -> Tokenizer:
    path = Path(path)
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(read_lines(path), start=1):
        if not line.strip():
            continue
        fields = line.split()
        try:
            if len(fields) != 2:
                raise ValueError
            token, rank = base64.b64decode(fields[0], validate=True), int(fields[1])
        except ValueError:
            raise TokenizerFileError(f"{path}:{number}: expected 'BASE64-TOKEN RANK', found {line.strip()[:60]!r}") from None
        if token in ranks:
            raise TokenizerFileError(f"{path}:{number}: token {render(token)} appears twice")
        ranks[token] = rank
    byte_ids = _byte_ids({bytes([b]): ranks.get(bytes([b])) for b in range(256)}, path, key=lambda b: bytes([b]))
    pair_ranks: dict[tuple[int, int], int] = {}
    results: list[int] = []
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) < 2:
            continue
        parts = encode_chunk([byte_ids[b] for b in token], pair_ranks, results)
        if len(parts) != 2:
            raise TokenizerFileError(
                f"{path}: token {render(token)} (rank {rank}) cannot be made by merging two tokens of lower rank"
            )
        pair_ranks[(parts[0], parts[1])] = len(results)
        results.append(rank)
        merges.append((parts[0], parts[1], rank))
    return _build(pattern, byte_ids, merges, special_tokens or {}, str(path))


# ----- Hugging Face tokenizer.json ----------------------------------------------------------------


def load_hf_tokenizer_json(path, *, pattern: str | None = None) -> Tokenizer:
    """A Hugging Face `tokenizer.json` with a byte-level BPE model; `pattern` overrides the one read
    from its pre-tokenizer."""
    path = Path(path)
    data = _read_json(path)
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE":
        raise TokenizerFileError(f"{path}: model.type must be 'BPE', found {model.get('type') if isinstance(model, dict) else model!r}")
    for field, harmless in (("continuing_subword_prefix", (None, "")), ("end_of_word_suffix", (None, "")),
                            ("dropout", (None, 0, 0.0)), ("byte_fallback", (None, False)), ("ignore_merges", (None, False))):
        if model.get(field) not in harmless:
            raise TokenizerFileError(f"{path}: model.{field} = {model[field]!r} is not supported by a plain byte-level BPE")
    normalizer = data.get("normalizer")
    if normalizer not in (None, {"type": "Sequence", "normalizers": []}):
        kind = normalizer.get("type") if isinstance(normalizer, dict) else normalizer
        raise TokenizerFileError(f"{path}: normalizer {kind!r} is not supported (text must reach BPE unchanged)")
    if pattern is None:
        pattern = _hf_pattern(data.get("pre_tokenizer"), path)
    vocab = model.get("vocab")
    if not isinstance(vocab, dict):
        raise TokenizerFileError(f"{path}: model.vocab must be an object mapping token strings to ids")
    byte_ids = _byte_ids(vocab, path)
    merges = []
    for i, merge in enumerate(model.get("merges") or []):
        parts = merge.split(" ") if isinstance(merge, str) else merge
        merges.append(_merge(vocab, parts, f"{path}: model.merges[{i}]"))
    made = set(byte_ids) | {new for _, _, new in merges}
    specials = {}
    for i, token in enumerate(data.get("added_tokens") or []):
        if not isinstance(token, dict) or not isinstance(token.get("content"), str) or not isinstance(token.get("id"), int):
            raise TokenizerFileError(f"{path}: added_tokens[{i}] needs a string 'content' and an integer 'id'")
        specials[token["content"]] = token["id"]
    stray = [token for token, i in vocab.items() if i not in made and token not in specials]
    if stray:
        raise TokenizerFileError(f"{path}: {len(stray)} vocabulary entries are neither bytes, merges nor added tokens, e.g. {stray[:3]}")
    return _build(pattern, byte_ids, merges, specials, str(path))


def _hf_pattern(pre_tokenizer, path: Path) -> str:
    is_sequence = isinstance(pre_tokenizer, dict) and pre_tokenizer.get("type") == "Sequence"
    steps = pre_tokenizer.get("pretokenizers", []) if is_sequence else [pre_tokenizer]
    kinds = [step.get("type") if isinstance(step, dict) else None for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True) and not steps[0].get("add_prefix_space"):
        return GPT2_PATTERN
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex") and not steps[1].get("add_prefix_space"):
        split = steps[0]
        if "Regex" in split.get("pattern", {}) and split.get("behavior") == "Isolated" and not split.get("invert"):
            return split["pattern"]["Regex"]
    raise TokenizerFileError(
        f"{path}: pre_tokenizer {kinds} is not supported: expected ByteLevel (GPT-2's split, no prefix space) "
        "or Split(regex, Isolated) then ByteLevel(use_regex=false); pass pattern= to choose one"
    )


# ----- a vocabulary dump for people ---------------------------------------------------------------


def vocab_dump(tokenizer: Tokenizer) -> str:
    """One line per id: the token's bytes as text and where it came from (a byte, a merge, special)."""
    vocab = tokenizer._vocab
    origin = {i: f"byte {b:#04x}" for b, i in enumerate(tokenizer.byte_ids)}
    for rank, (a, b, new) in enumerate(tokenizer.merges):
        origin[new] = f"merge {rank}: {render(vocab[a])} + {render(vocab[b])}"
    for token, i in tokenizer.special_tokens.items():
        origin[i] = "special token"
    lines = [f"# {tokenizer!r}", f"# {'id':>6}  {'token':<24} origin"]
    for i, data in enumerate(vocab):
        if data is not None:
            lines.append(f"{i:>8}  {render(data):<24} {origin[i]}")
    return "\n".join(lines) + "\n"


# ----- opening whatever the user points at --------------------------------------------------------


def open_tokenizer(path, *, pattern: str | None = None) -> Tokenizer:
    """Load a tokenizer from any supported file, or a folder holding one (tokenizer.bpe, tokenizer.json,
    vocab.json + merges.txt, encoder.json + vocab.bpe); `pattern` is needed for tiktoken files."""
    path = Path(path)
    if path.is_dir() and not (path / TOKENIZER_FILE).is_file():
        # a training run's folder: the tokenizer saved in its newest checkpoint (ckpt-00000600/ ...;
        # the zero-padded step numbers sort as numbers)
        saved = sorted(path.glob(f"ckpt-*/{TOKENIZER_FILE}"))
        if saved:
            return load_bpe(saved[-1])
    if path.is_dir():
        for names in ((TOKENIZER_FILE,), ("tokenizer.json",), ("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe")):
            if all((path / name).is_file() for name in names):
                files = [path / name for name in names]
                if names == (TOKENIZER_FILE,):
                    return load_bpe(files[0])
                if names == ("tokenizer.json",):
                    return load_hf_tokenizer_json(files[0], pattern=pattern)
                return load_gpt2_files(*files, pattern=pattern or "gpt2")
        raise FileNotFoundError(
            f"{path}: no tokenizer here (looked for {TOKENIZER_FILE}, tokenizer.json, vocab.json + merges.txt, "
            "encoder.json + vocab.bpe)"
        )
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such tokenizer file or folder")
    with open(path, "rb") as f:
        head = f.read(len(MAGIC))
    if head == MAGIC.encode():
        return load_bpe(path)
    if path.suffix == ".json":
        return load_hf_tokenizer_json(path, pattern=pattern)
    if pattern is None:
        raise ValueError(
            f"{path}: looks like a tiktoken rank file, which does not store its split pattern; "
            "give one (gpt2, cl100k or a regex)"
        )
    return load_tiktoken(path, pattern=pattern)


# ----- helpers ------------------------------------------------------------------------------------


def _byte_ids(vocab: dict, source, key=None) -> list[int]:
    """The id of each byte in a vocabulary keyed by GPT-2 strings (or by `key(byte)`)."""
    table = bytes_to_unicode()
    key = key or table.__getitem__
    ids = []
    for byte in range(256):
        token_id = vocab.get(key(byte))
        if token_id is None:
            raise TokenizerFileError(f"{source}: no token for byte {byte:#04x}: not a complete byte-level BPE vocabulary")
        ids.append(token_id)
    return ids


def _merge(vocab: dict, parts, where: str) -> tuple[int, int, int]:
    if not isinstance(parts, (list, tuple)) or len(parts) != 2 or not all(isinstance(p, str) and p for p in parts):
        raise TokenizerFileError(f"{where}: a merge must be two tokens ('a b' or [a, b]), found {parts!r}")
    for token in (parts[0], parts[1], parts[0] + parts[1]):
        if token not in vocab:
            raise TokenizerFileError(f"{where}: merge {parts[0]!r} + {parts[1]!r} needs token {token!r}, which is not in the vocabulary")
    return vocab[parts[0]], vocab[parts[1]], vocab[parts[0] + parts[1]]


def _build(pattern, byte_ids, merges, specials, source) -> Tokenizer:
    try:
        return Tokenizer(pattern, byte_ids, merges, specials)
    except ValueError as err:
        raise TokenizerFileError(f"{source}: not a valid tokenizer: {err}") from None


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise TokenizerFileError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    except UnicodeDecodeError as err:
        raise TokenizerFileError(f"{path}: not UTF-8 text (byte {err.start})") from None
