"""GPT-2 parity: our encoder, loaded from GPT-2's own files, gives tiktoken's ids.

tiktoken is built offline from the same ../shared/data/encoder.json + vocab.bpe (never downloaded),
with tiktoken's own copy of GPT-2's pattern. Where tiktoken is not installed, a table of ids derived
with tiktoken 0.14.0 from the same files keeps the test biting.
"""

import csv
import json
import os
from unittest import mock

import pytest
from hypothesis import given
from hypothesis import strategies as st

from minillm.tokenizer import EOT, Tokenizer

# derived with: tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=data_gym_to_mergeable_bpe_ranks(
#   vocab.bpe, encoder.json), special_tokens={EOT: 50256}).encode_ordinary(text)
EXPECTED = {
    "Hello, world!": [15496, 11, 995, 0],
    "It's 2024; we'll see—don't   panic.\n\n": [1026, 338, 48609, 26, 356, 1183, 766, 960, 9099, 470, 220, 220, 13619, 13, 628],
    "日本語のテキスト 👍🏽 café naïve e\u0301": [33768, 98, 17312, 105, 45739, 252, 5641, 24336, 25084, 43302, 50169, 235, 8582, 237,
                                        121, 40304, 41492, 304, 136, 223],
    "   leading\tand\u00a0odd\u3000spaces \r\n": [220, 220, 3756, 197, 392, 1849, 5088, 5099, 222, 2777, 2114, 220, 201, 198],
    "1234567 3.14159 -42 ٣٤٥": [10163, 2231, 3134, 513, 13, 1415, 19707, 532, 3682, 18923, 96, 149, 97, 149, 98],
    "<|endoftext|> as plain text": [27, 91, 437, 1659, 5239, 91, 29, 355, 8631, 2420],
    "I'M SHOUTING 'S 'LL": [40, 6, 44, 6006, 12425, 2751, 705, 50, 705, 3069],
}

FRAGMENTS = [
    "👍", "👍🏽", "👨‍👩‍👧", "🇺🇸", "日本語", "中文字", "한국어", "e\u0301", "n\u0303", "Z\u0351\u0337\u0334", "ñ", "İ", "ß",
    "0", "7", "12345", "3.14", "1,000", "٣٤٥", "½", "²", "Ⅻ",
    " ", "  ", "\t", "\n", "\r\n", "\n\n\n", "\u00a0", "\u2009", "\u3000", "\x0b", "\x0c", "\x85", "\u2028", "\x1c", " \n ",
    "'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'LL", "’s", "don't", "I'm", "we'd", "''", "'",
    "Hello", " world", "the", "!!", "...", "—", "$", "#", "<|", "|>", "endoftext",
]
TEXT = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=6)), max_size=12).map("".join)


@pytest.fixture(scope="module")
def gpt2(shared_data_module):
    return Tokenizer.from_gpt2_files(shared_data_module / "encoder.json", shared_data_module / "vocab.bpe")


@pytest.fixture(scope="module")
def shared_data_module():
    from conftest import shared_data_dir

    path = shared_data_dir()
    if not (path / "encoder.json").is_file():
        pytest.skip(f"GPT-2's encoder.json not found: looked in {path} (set MINILLM_SHARED_DATA)")
    return path


@pytest.fixture(scope="module", autouse=True)
def no_tiktoken_cache():
    """tiktoken copies every file it reads, local ones too, into a cache under /tmp; "" turns that off."""
    with mock.patch.dict(os.environ, {"TIKTOKEN_CACHE_DIR": ""}):
        yield


@pytest.fixture(scope="module")
def tiktoken_gpt2(shared_data_module):
    tiktoken = pytest.importorskip("tiktoken", reason="tiktoken (a test dependency) is not installed")
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str

    ranks = data_gym_to_mergeable_bpe_ranks(str(shared_data_module / "vocab.bpe"), str(shared_data_module / "encoder.json"))
    return tiktoken.Encoding("gpt2-offline", pat_str=r50k_pat_str, mergeable_ranks=ranks, special_tokens={EOT: 50256})


def test_fixed_table_without_tiktoken(gpt2):
    for text, ids in EXPECTED.items():
        assert gpt2.encode_ordinary(text) == ids, text
        assert gpt2.decode(ids) == text
    assert gpt2.vocab_size == 50257 and gpt2.eot_id == 50256 and len(gpt2.merges) == 50000


def test_fixed_table_matches_tiktoken(tiktoken_gpt2):
    for text, ids in EXPECTED.items():
        assert tiktoken_gpt2.encode_ordinary(text) == ids


def shared_texts(folder):
    yield "the-verdict.txt", (folder / "the-verdict.txt").read_text(encoding="utf-8")
    yield "tinyshakespeare.txt", (folder / "tinyshakespeare.txt").read_text(encoding="utf-8")
    yield "SMSSpamCollection", (folder / "SMSSpamCollection").read_text(encoding="utf-8")
    yield "instruction-data.json", (folder / "instruction-data.json").read_text(encoding="utf-8")
    with open(folder / "imdb_test.csv", encoding="utf-8", newline="") as f:
        rows = [row[0] for _, row in zip(range(1500), csv.reader(f))]
    yield "imdb_test.csv[:1500]", "\n".join(rows)


def test_parity_on_shared_texts(gpt2, tiktoken_gpt2, shared_data_module):
    for name, text in shared_texts(shared_data_module):
        ours = gpt2.encode_ordinary(text)
        theirs = tiktoken_gpt2.encode_ordinary(text)
        if ours != theirs:
            at = next(i for i, (a, b) in enumerate(zip(ours + [None], theirs + [None])) if a != b)
            pytest.fail(f"{name}: first difference at token {at}: ours {ours[at:at + 5]}, tiktoken {theirs[at:at + 5]}")
        assert gpt2.decode(ours) == text


@given(text=TEXT)
def test_parity_on_generated_text(gpt2, tiktoken_gpt2, text):
    assert gpt2.encode_ordinary(text) == tiktoken_gpt2.encode_ordinary(text)
    assert gpt2.encode(text + EOT, allowed_special="all") == tiktoken_gpt2.encode(text + EOT, allowed_special="all")


@given(ids=st.lists(st.integers(0, 50256), max_size=20))
def test_decode_parity_on_any_ids(gpt2, tiktoken_gpt2, ids):
    assert gpt2.decode_bytes(ids) == tiktoken_gpt2.decode_bytes(ids)
    assert gpt2.decode(ids) == tiktoken_gpt2.decode(ids)


def test_special_token_refused_like_tiktoken(gpt2, tiktoken_gpt2):
    text = f"a document that mentions {EOT} in its text"
    with pytest.raises(ValueError):
        tiktoken_gpt2.encode(text)
    with pytest.raises(ValueError, match="encode_ordinary"):
        gpt2.encode(text)
    assert gpt2.encode(text, allowed_special={EOT}) == tiktoken_gpt2.encode(text, allowed_special={EOT})
    assert 50256 not in gpt2.encode_ordinary(text)


def test_gpt2_exports_round_trip(gpt2, tiktoken_gpt2, tmp_path):
    gpt2.save_gpt2_files(tmp_path / "hf")
    assert Tokenizer.from_gpt2_files(tmp_path / "hf" / "vocab.json", tmp_path / "hf" / "merges.txt") == gpt2
    original = json.loads((tmp_path / "hf" / "vocab.json").read_text(encoding="utf-8"))
    assert original["Ġthe"] == 262 and original[EOT] == 50256
    gpt2.save_tiktoken_file(tmp_path / "gpt2.tiktoken")
    from tiktoken.load import load_tiktoken_bpe

    written = load_tiktoken_bpe(str(tmp_path / "gpt2.tiktoken"))
    assert written == {tiktoken_gpt2.decode_single_token_bytes(i): i for i in range(50256)}
    # recovering the merges from ranks alone gives back GPT-2's merge list exactly
    assert Tokenizer.from_tiktoken_file(tmp_path / "gpt2.tiktoken", pattern="gpt2", special_tokens={EOT: 50256}) == gpt2
