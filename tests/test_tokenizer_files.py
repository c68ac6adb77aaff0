"""Tokenizer files: our format, GPT-2's, tiktoken's and Hugging Face's round-trip losslessly; damaged
files fail with the file and line named; checkpoints carry their tokenizer; the command line works."""

import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import given
from hypothesis import strategies as st

from minillm.tokenizer import EOT, TOKENIZER_FILE, Tokenizer, TokenizerFileError, open_tokenizer
from minillm.tokenizer.__main__ import main

REPO_ROOT = Path(__file__).resolve().parent.parent
CORPUS = [
    "It was a bright cold day in April, and the clocks were striking thirteen. " * 3,
    "Naïve café owners don't sell 12,345 crème brûlées — 日本語 👍🏽\n\n\tTabs\r\n",
    "the quick brown fox jumps over the lazy dog " * 4,
]
TEXT = st.text(alphabet=st.sampled_from(list("ab cd'sxyzT1 2\n\t.,!éß日👍\u0301\u00a0")), max_size=80)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(CORPUS, 256 + 2 + 120, special_tokens=(EOT, "<|im_start|>"))


@pytest.fixture(scope="module", autouse=True)
def no_tiktoken_cache():
    """tiktoken copies every file it reads, local ones too, into a cache under /tmp; "" turns that off."""
    with mock.patch.dict(os.environ, {"TIKTOKEN_CACHE_DIR": ""}):
        yield


def sample_texts():
    return CORPUS + ["", "<|endoftext|> typed as text", "zzz qqq 999 \x00\x1f"]


# ----- our own format -----------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", ["gpt2", "cl100k", r"\w+|\W+"])
def test_save_load_round_trip(tmp_path, pattern):
    tok = Tokenizer.train(CORPUS, 256 + 1 + 80, pattern=pattern)
    tok.save(tmp_path / "sub" / TOKENIZER_FILE)
    loaded = Tokenizer.load(tmp_path / "sub" / TOKENIZER_FILE)
    assert loaded == tok and loaded.pattern == tok.pattern and loaded.special_tokens == tok.special_tokens
    for text in sample_texts():
        assert loaded.encode_ordinary(text) == tok.encode_ordinary(text)


def test_file_is_readable(tok, tmp_path):
    tok.save(tmp_path / "t.bpe")
    text = (tmp_path / "t.bpe").read_text(encoding="utf-8")
    assert text.startswith("minillm-bpe 1\n")
    [the] = tok.encode(" the")
    line = next(line for line in text.splitlines() if line.startswith(f"{the} = "))
    assert '# " the" = "' in line  # the comment shows the token and the two it was made from
    assert f'{tok.eot_id} "<|endoftext|>"' in text


def damage(lines):
    """name -> (how to damage the file's lines, the line number the error must name, message)."""
    merge_line = next(i for i, line in enumerate(lines) if line.startswith("merges ")) + 2
    byte_line = next(i for i, line in enumerate(lines) if line.startswith("bytes ")) + 2  # byte 0x00's
    special_line = next(i for i, line in enumerate(lines) if line.startswith("special ")) + 2
    first_new = lines[merge_line - 1].split()[0]  # the id the first merge makes
    at_id = lines[byte_line - 1 + 0x40].split()[1]  # the id of byte 0x40
    special = lines[special_line - 1].split(" ", 1)[1]  # the first special token, as JSON

    def replace(index, line):
        return lambda ls: [*ls[:index], line, *ls[index + 1:]]

    # lines that parse but define tokens that cannot be: the error names the line all the same
    consistency = {
        "undefined_merge": (replace(merge_line - 1, f"{first_new} = 99999 + 1"), merge_line, "uses token 99999"),
        "redefined": (replace(merge_line, f"{first_new} = " + lines[merge_line].split(" = ", 1)[1]), merge_line + 1,
                      f"token id {first_new} is already"),
        "byte": (replace(byte_line - 1 + 0x41, f"0x41 {at_id}"), byte_line + 0x41, f"token id {at_id} is already"),
        "special": (replace(special_line - 1, f"{at_id} {special}"), special_line, f"token id {at_id} is already"),
    }
    return consistency | {
        "magic": (lambda ls: ["gpt2-bpe 1", *ls[1:]], 1, "not a minillm tokenizer file"),
        "version": (lambda ls: ["minillm-bpe 2", *ls[1:]], 1, "version '2' is not supported"),
        "merge": (lambda ls: [*ls[:merge_line - 1], "290 = x + 3", *ls[merge_line:]], merge_line, "must be an integer"),
        "shape": (lambda ls: [*ls[:merge_line - 1], "290 291 292", *ls[merge_line:]], merge_line, "NEW = LEFT + RIGHT"),
        "pattern": (lambda ls: [ls[0], ls[1], ls[2], 'pattern "unterminated', *ls[4:]], 4, "JSON string"),
        "extra": (lambda ls: [*ls, "1 = 2 + 3"], len(lines) + 1, "unexpected line"),
    }


def test_damaged_files_name_file_and_line(tok, tmp_path):
    tok.save(tmp_path / "good.bpe")
    lines = (tmp_path / "good.bpe").read_text(encoding="utf-8").splitlines()
    for name, (change, line, message) in damage(lines).items():
        path = tmp_path / f"{name}.bpe"
        path.write_text("\n".join(change(lines)) + "\n", encoding="utf-8")
        with pytest.raises(TokenizerFileError) as err:
            Tokenizer.load(path)
        assert f"{path}:{line}:" in str(err.value) and message in str(err.value), (name, str(err.value))
    truncated = tmp_path / "truncated.bpe"
    truncated.write_text("\n".join(lines[:-5]) + "\n", encoding="utf-8")
    with pytest.raises(TokenizerFileError, match="ends where merge .* should be"):
        Tokenizer.load(truncated)
    undefined = tmp_path / "undefined.bpe"
    undefined.write_text("\n".join(lines[:-1] + [f"{tok.vocab_size - 3} = 99999 + 1"]) + "\n", encoding="utf-8")
    with pytest.raises(TokenizerFileError, match="uses token 99999, which no earlier byte or merge made"):
        Tokenizer.load(undefined)
    binary = tmp_path / "binary.bpe"
    binary.write_bytes(b"minillm-bpe 1\n\xff\xfe")
    with pytest.raises(TokenizerFileError, match="not UTF-8"):
        Tokenizer.load(binary)
    with pytest.raises(FileNotFoundError):
        Tokenizer.load(tmp_path / "missing.bpe")


# ----- GPT-2 files, tiktoken, Hugging Face ---------------------------------------------------------


def test_gpt2_files_round_trip(tok, tmp_path):
    tok.save_gpt2_files(tmp_path)
    vocab = json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))
    assert vocab[EOT] == tok.eot_id and vocab["Ġ"] == 32  # GPT-2's printable stand-in for a space
    assert (tmp_path / "merges.txt").read_text(encoding="utf-8").startswith("#version: 0.2\n")
    assert Tokenizer.from_gpt2_files(tmp_path / "vocab.json", tmp_path / "merges.txt") == tok
    lines = (tmp_path / "merges.txt").read_text(encoding="utf-8").splitlines()
    (tmp_path / "merges.txt").write_text("\n".join(lines[:3] + ["Ġ Ġthe Ġx"] + lines[4:]) + "\n", encoding="utf-8")
    with pytest.raises(TokenizerFileError, match=r"merges.txt:4: a merge must be two tokens"):
        Tokenizer.from_gpt2_files(tmp_path / "vocab.json", tmp_path / "merges.txt")
    (tmp_path / "vocab.json").write_text('{"a": 1,\n "b": }', encoding="utf-8")
    with pytest.raises(TokenizerFileError, match=r"vocab.json:2: not valid JSON"):
        Tokenizer.from_gpt2_files(tmp_path / "vocab.json", tmp_path / "merges.txt")


def test_tiktoken_file_round_trip(tok, tmp_path):
    tok.save_tiktoken_file(tmp_path / "t.tiktoken")
    assert Tokenizer.from_tiktoken_file(tmp_path / "t.tiktoken", pattern="gpt2", special_tokens=tok.special_tokens) == tok
    lines = (tmp_path / "t.tiktoken").read_text().splitlines()
    (tmp_path / "bad.tiktoken").write_text("\n".join(lines[:9] + ["!!notbase64 9"] + lines[10:]) + "\n")
    with pytest.raises(TokenizerFileError, match=r"bad.tiktoken:10: expected 'BASE64-TOKEN RANK'"):
        Tokenizer.from_tiktoken_file(tmp_path / "bad.tiktoken", pattern="gpt2")
    (tmp_path / "short.tiktoken").write_text("\n".join(lines[1:]) + "\n")  # byte 0x00 missing
    with pytest.raises(TokenizerFileError, match="no token for byte 0x00"):
        Tokenizer.from_tiktoken_file(tmp_path / "short.tiktoken", pattern="gpt2")


@given(docs=st.lists(TEXT, min_size=1, max_size=5), num_merges=st.integers(1, 60), probe=TEXT)
def test_tiktoken_encodes_our_exports_like_we_do(tmp_path_factory, docs, num_merges, probe):
    """tiktoken merges by the rank of the concatenated bytes, not by a merge list; on a vocabulary we
    trained (where no two merges make the same bytes) the two agree."""
    tiktoken = pytest.importorskip("tiktoken")
    from tiktoken.load import load_tiktoken_bpe

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tok = Tokenizer.train(docs, 256 + num_merges, special_tokens=(), num_workers=1)
    path = tmp_path_factory.mktemp("tiktoken") / "t.tiktoken"
    tok.save_tiktoken_file(path)
    enc = tiktoken.Encoding("ours", pat_str=tok.pattern, mergeable_ranks=load_tiktoken_bpe(str(path)), special_tokens={})
    for text in [*docs, probe]:
        assert enc.encode_ordinary(text) == tok.encode_ordinary(text)
    assert Tokenizer.from_tiktoken_file(path, pattern="gpt2") == tok


def hf_tokenizer_from_gpt2_files(folder):
    tokenizers = pytest.importorskip("tokenizers", reason="Hugging Face tokenizers (a test dependency) is not installed")
    hf = tokenizers.Tokenizer(tokenizers.models.BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt")))
    hf.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = tokenizers.decoders.ByteLevel()
    hf.add_special_tokens([EOT, "<|im_start|>"])
    return hf


def test_hf_tokenizer_json_import(tok, tmp_path):
    tok.save_gpt2_files(tmp_path)
    hf = hf_tokenizer_from_gpt2_files(tmp_path)
    hf.save(str(tmp_path / "tokenizer.json"))
    assert Tokenizer.from_hf_tokenizer_json(tmp_path / "tokenizer.json") == tok
    for text in sample_texts():  # Hugging Face's own encoder reads our exported files the same way
        # (Hugging Face always matches added tokens in text: our allowed_special="all")
        assert hf.encode(text, add_special_tokens=False).ids == tok.encode(text, allowed_special="all")
    data = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    as_pairs = [m.split(" ") if isinstance(m, str) else m for m in data["model"]["merges"]]
    for merges in (as_pairs, [" ".join(m) for m in as_pairs]):  # both ways tokenizer.json stores merges
        data["model"]["merges"] = merges
        (tmp_path / "variant.json").write_text(json.dumps(data), encoding="utf-8")
        assert Tokenizer.from_hf_tokenizer_json(tmp_path / "variant.json") == tok
    data["pre_tokenizer"] = {"type": "Whitespace"}
    (tmp_path / "whitespace.json").write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(TokenizerFileError, match=r"pre_tokenizer \['Whitespace'\] is not supported"):
        Tokenizer.from_hf_tokenizer_json(tmp_path / "whitespace.json")


def test_hf_trained_tokenizer_imports_and_encodes_the_same(tmp_path):
    """A tokenizer trained by Hugging Face itself: special tokens first, bytes in its own order, and
    GPT-4's split pattern through a Split pre-tokenizer."""
    tokenizers = pytest.importorskip("tokenizers", reason="Hugging Face tokenizers (a test dependency) is not installed")
    from minillm.tokenizer import CL100K_PATTERN

    hf = tokenizers.Tokenizer(tokenizers.models.BPE())
    hf.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([
        tokenizers.pre_tokenizers.Split(tokenizers.Regex(CL100K_PATTERN), behavior="isolated"),
        tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=400, special_tokens=[EOT], show_progress=False,
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(CORPUS, trainer=trainer)
    hf.save(str(tmp_path / "tokenizer.json"))
    ours = open_tokenizer(tmp_path / "tokenizer.json")
    assert ours.pattern == CL100K_PATTERN and ours.special_tokens == {EOT: 0} and ours.byte_ids != tuple(range(256))
    for text in sample_texts()[:-1]:
        assert hf.encode(text, add_special_tokens=False).ids == ours.encode(text, allowed_special="all"), text


def test_vocab_dump_and_open_tokenizer(tok, tmp_path):
    dump = tok.vocab_dump()
    assert '    32  " "' in dump and "merge 0: " in dump and f"{tok.eot_id}  \"<|endoftext|>\"" in dump
    tok.save(tmp_path / TOKENIZER_FILE)
    tok.save_gpt2_files(tmp_path / "hf")
    tok.save_tiktoken_file(tmp_path / "t.tiktoken")
    assert open_tokenizer(tmp_path) == open_tokenizer(tmp_path / TOKENIZER_FILE) == tok
    assert open_tokenizer(tmp_path / "hf") == tok
    assert open_tokenizer(tmp_path / "t.tiktoken", pattern="gpt2").merges == tok.merges
    with pytest.raises(ValueError, match="does not store its split pattern"):
        open_tokenizer(tmp_path / "t.tiktoken")
    for step in (9, 10):  # a training run's folder: its newest checkpoint's tokenizer (step 10 sorts last)
        (tmp_path / "run" / f"ckpt-{step:08d}").mkdir(parents=True)
    Tokenizer.train("other text " * 50, vocab_size=260).save(tmp_path / "run" / "ckpt-00000009" / TOKENIZER_FILE)
    tok.save(tmp_path / "run" / "ckpt-00000010" / TOKENIZER_FILE)
    assert open_tokenizer(tmp_path / "run") == tok
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no tokenizer here"):
        open_tokenizer(tmp_path / "empty")


def test_checkpoint_carries_its_tokenizer(tok, tmp_path):
    from minillm.checkpoint import load_checkpoint, save_checkpoint
    from minillm.config import GPTConfig
    from minillm.model import GPT

    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=8, n_layer=1, n_head=1, n_embd=8))
    save_checkpoint(tmp_path / "with", 1, model, writers={TOKENIZER_FILE: tok.save})
    assert load_checkpoint(tmp_path / "with").tokenizer() == tok
    save_checkpoint(tmp_path / "without", 1, model)
    assert load_checkpoint(tmp_path / "without").tokenizer() is None


# ----- the command line ---------------------------------------------------------------------------


def test_command_line(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS * 5), encoding="utf-8")
    out = tmp_path / "tok" / TOKENIZER_FILE
    assert main(["train", f"--files={corpus}", "--vocab_size=320", f"--out={out}", "--num_workers=1"]) == 0
    assert "wrote" in capsys.readouterr().out and Tokenizer.load(out).vocab_size == 320
    assert main(["encode", f"--tokenizer={out}", "--text=the clocks were striking"]) == 0
    printed = capsys.readouterr().out
    assert "24 bytes -> " in printed and 'tokens: "th' in printed
    ids = printed.split("ids: ")[1].splitlines()[0]
    assert main(["decode", f"--tokenizer={out}", f"--ids={ids}"]) == 0
    assert capsys.readouterr().out == "the clocks were striking\n"
    assert main(["stats", f"--tokenizer={out}", f"--files={corpus}", "--gpt2=none"]) == 0
    assert "bytes/token" in capsys.readouterr().out
    assert main(["export", f"--tokenizer={out}", "--format=gpt2", f"--out={tmp_path / 'hf'}"]) == 0
    assert Tokenizer.from_gpt2_files(tmp_path / "hf" / "vocab.json", tmp_path / "hf" / "merges.txt") == Tokenizer.load(out)
    assert main(["encode", f"--tokenizer={out}", f"--text=a {EOT}"]) == 1
    assert "special token" in capsys.readouterr().err
    assert main(["encode", f"--tokenizer={tmp_path / 'nope.bpe'}", "--text=x"]) == 1
    assert "nope.bpe" in capsys.readouterr().err
    assert main(["frobnicate"]) == 2


def test_command_line_reads_files_as_stored(tok, tmp_path, capsys):
    """Text files are decoded from their bytes: CRLF stays CRLF, so byte counts are the file's and
    training sees the \r; a file that is not UTF-8 is an error that names it."""
    crlf = tmp_path / "crlf.txt"
    crlf.write_bytes(b"one line\r\nanother line\r\n" * 50)
    tok.save(tmp_path / "tok.bpe")
    assert main(["stats", f"--tokenizer={tmp_path / 'tok.bpe'}", f"--files={crlf}", "--gpt2=none"]) == 0
    assert f" {crlf.stat().st_size:,} " in capsys.readouterr().out  # 1,200 bytes, not 1,100
    assert main(["encode", f"--tokenizer={tmp_path / 'tok.bpe'}", f"--file={crlf}"]) == 0
    assert capsys.readouterr().out.startswith(f"{crlf.stat().st_size:,} bytes -> ")
    out = tmp_path / "crlf.bpe"
    assert main(["train", f"--files={crlf}", "--vocab_size=269", f"--out={out}", "--num_workers=1"]) == 0
    trained = Tokenizer.load(out)
    assert b"\r\n" in {trained.token_bytes(new) for *_, new in trained.merges}
    latin = tmp_path / "latin1.txt"
    latin.write_bytes(b"plain\ncaf\xe9\n")
    for command in (["train", f"--files={latin}", f"--out={out}"],
                    ["stats", f"--tokenizer={out}", f"--files={latin}", "--gpt2=none"],
                    ["encode", f"--tokenizer={out}", f"--file={latin}"]):
        assert main(command) == 1
        assert f"{latin}:2: not UTF-8 text (byte 0xe9 at offset 9)" in capsys.readouterr().err, command[0]


def test_module_entry_point(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run([sys.executable, "-m", "minillm.tokenizer", "encode", "--help"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--allowed_special" in result.stdout
