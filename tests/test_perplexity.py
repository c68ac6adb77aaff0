"""Perplexity and bits per byte: a uniform model scores the vocabulary size; the sliding window scores
every token exactly once with the context it promises; the totals match direct computations with the
model; text read in pieces tokenizes like text read whole; every byte and document is accounted for."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from eval_fixtures import CORPUS, bpe_tokenizer, make_prepared, tiny_gpt

from minillm import scoring
from minillm.model import IGNORE_INDEX
from minillm.tokenizer import Tokenizer
from minillm.perplexity import PerplexityConfig, evaluate_perplexity, numbered_windows
from minillm.token_stream import EvalDataError, safe_cut, text_pieces



@pytest.fixture(scope="module")
def tokenizer():
    return bpe_tokenizer(320)


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_gpt(tokenizer.vocab_size)


def quiet(**overrides):
    return PerplexityConfig(**overrides)


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_uniform_logits_give_the_vocabulary_size(tmp_path, tokenizer):
    """lm_head = 0 makes every logit 0: p = 1/V for every token, so perplexity = V exactly and
    bits per byte = N log2(V) / B."""
    model = tiny_gpt(tokenizer.vocab_size + 13, tie=False)  # a vocabulary padded past the tokenizer's
    with torch.no_grad():
        model.lm_head.weight.zero_()
    V = model.config.vocab_size
    path = write(tmp_path / "a.txt", CORPUS[:700])
    result = evaluate_perplexity(model, tokenizer, path, quiet(stride=7, scratch_dir=str(tmp_path)), progress=False)
    total = result.total
    assert total.perplexity == pytest.approx(V, rel=1e-6) and total.loss == pytest.approx(math.log(V), rel=1e-6)
    assert total.tokens == len(tokenizer.encode_ordinary(CORPUS[:700]))
    assert total.bytes == len(CORPUS[:700].encode("utf-8"))
    assert total.bits_per_byte == pytest.approx(total.tokens * math.log2(V) / total.bytes, rel=1e-6)


@given(n=st.integers(0, 90), block=st.integers(1, 17), data=st.data(), batch=st.integers(1, 4))
def test_sliding_window_scores_every_token_once_with_its_context(n, block, data, batch):
    stride = data.draw(st.integers(1, block))
    tokens = np.random.default_rng(n * 31 + block).integers(0, 50, size=n)
    seen = []
    for x, y, positions in numbered_windows(tokens, batch, block, stride):
        rows, cols = torch.nonzero(y != IGNORE_INDEX, as_tuple=True)  # row-major, as the positions
        assert len(rows) == len(positions)
        for r, c, p in zip(rows.tolist(), cols.tolist(), positions.tolist()):
            assert y[r, c] == tokens[p]  # the target is the token at its position
            assert torch.equal(x[r, : c + 1], torch.as_tensor(tokens[p - c - 1 : p]))  # its context precedes it
            assert c + 1 >= min(p, block - stride + 1)  # at least block - stride tokens of context
        seen += positions.tolist()
    assert seen == list(range(1, max(n, 1)))  # every token after the first, once, in order


def full_context_loss(model, ids):
    """The straightforward way: one forward pass over the whole sequence."""
    x = torch.tensor(ids[:-1])[None]
    logits, _ = model(x)
    return F.cross_entropy(logits[0].double(), torch.tensor(ids[1:]), reduction="sum").item()


@pytest.mark.parametrize("stride", [1, 5, 32])
def test_matches_full_context_when_the_text_fits(tmp_path, tokenizer, model, stride):
    text = "The quick brown fox jumps over the lazy dog. Ça va?"
    ids = [tokenizer.eot_id] + tokenizer.encode_ordinary(text)
    assert len(ids) <= model.config.block_size + 1
    result = evaluate_perplexity(model, tokenizer, write(tmp_path / "t.txt", text),
                                 quiet(stride=stride, scratch_dir=str(tmp_path)), progress=False)
    nll = full_context_loss(model, ids)
    assert result.total.tokens == len(ids) - 1
    assert result.total.nll == pytest.approx(nll, rel=1e-5)
    assert result.total.perplexity == pytest.approx(math.exp(nll / (len(ids) - 1)), rel=1e-5)


def test_stride_one_gives_every_token_the_full_block(tmp_path, tokenizer, monkeypatch):
    """Past the block, each token's log-probability equals a direct pass over the block before it
    (the output head takes 5 positions at a time here, so its slicing is checked too)."""
    monkeypatch.setattr(scoring, "HEAD_ROWS", 5)
    model = tiny_gpt(tokenizer.vocab_size, block_size=12, seed=1)
    text = CORPUS[:160]
    ids = [tokenizer.eot_id] + tokenizer.encode_ordinary(text)
    assert len(ids) > 3 * 12
    result = evaluate_perplexity(model, tokenizer, write(tmp_path / "t.txt", text),
                                 quiet(stride=1, batch_size=48, scratch_dir=str(tmp_path)), progress=False)
    ids_t = torch.tensor(ids)
    # tokens 1..12: one pass over the first block; each later token p: a pass over ids[p-12 : p]
    first = torch.log_softmax(model(ids_t[None, :12])[0][0].double(), -1)  # (12, V)
    direct = -first[torch.arange(12), ids_t[1:13]].sum().item()
    contexts = torch.stack([ids_t[p - 12 : p] for p in range(13, len(ids))])  # (n - 13, 12)
    last = torch.log_softmax(model(contexts)[0][:, -1].double(), -1)
    direct -= last[torch.arange(len(contexts)), ids_t[13:]].sum().item()
    assert result.total.nll == pytest.approx(direct, rel=1e-5)
    assert result.windows == len(ids) - 12  # one window per token past the first block


def test_documents_and_bytes_are_all_accounted_for(tmp_path, tokenizer, model):
    folder = tmp_path / "texts"
    folder.mkdir()
    docs = {"a.txt": CORPUS[:300], "b.txt": "Très bien, merci. 東京", "sub/c.txt": "x"}
    for name, text in docs.items():
        (folder / name).parent.mkdir(exist_ok=True)
        write(folder / name, text)
    rows = [{"text": "first json document"}, {"text": ""}, {"text": "third: 3.14"}]
    (folder / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    (folder / ".hidden").write_text("not read")
    result = evaluate_perplexity(model, tokenizer, folder, quiet(per_document=True, stride=9, scratch_dir=str(tmp_path)),
                                 progress=False)
    names = [d.name for d in result.documents]
    assert names == [str(folder / "a.txt"), str(folder / "b.txt"), *(f"{folder / 'd.jsonl'}:{i}" for i in (1, 2, 3)),
                     str(folder / "sub/c.txt")]
    texts = [docs["a.txt"], docs["b.txt"], *(r["text"] for r in rows), docs["sub/c.txt"]]
    for doc, text in zip(result.documents, texts):
        assert doc.bytes == len(text.encode("utf-8")) and doc.tokens == len(tokenizer.encode_ordinary(text))
    assert result.total.tokens == sum(d.tokens for d in result.documents)
    assert result.total.nll == pytest.approx(sum(d.nll for d in result.documents))
    assert math.isnan(result.documents[3].loss) and result.documents[3].to_dict()["perplexity"] is None  # the empty one


def test_a_token_file_scores_like_the_same_documents_as_text(tmp_path, tokenizer, model):
    """prepare.py's layout (EOT before each document, documents.jsonl with offsets) gives the same
    stream as the texts, so the same numbers; --max_docs takes a seeded sample of documents."""
    texts = [CORPUS[i * 50 : i * 50 + 40 + 7 * i] for i in range(6)]
    folder = make_prepared(tmp_path / "prepared", tokenizer, {"train": ["other text"], "val": texts})
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    config = quiet(per_document=True, stride=11, scratch_dir=str(tmp_path))
    from_tokens = evaluate_perplexity(model, tokenizer, folder / "val.bin", config, progress=False)
    from_text = evaluate_perplexity(model, tokenizer, tmp_path / "docs.jsonl", config, progress=False)
    assert from_tokens.total.nll == pytest.approx(from_text.total.nll, rel=1e-6)
    assert (from_tokens.total.tokens, from_tokens.total.bytes) == (from_text.total.tokens, from_text.total.bytes)
    assert [d.name for d in from_tokens.documents] == [f"val-{i}" for i in range(6)]
    assert [d.nll for d in from_tokens.documents] == pytest.approx([d.nll for d in from_text.documents], rel=1e-6)

    sample = evaluate_perplexity(model, tokenizer, folder / "val.bin", quiet(max_docs=3, seed=4, per_document=True,
                                                                              scratch_dir=str(tmp_path)), progress=False)
    names = [d.name for d in sample.documents]
    assert len(names) == 3 and names == sorted(names)  # a sample, in the original order
    assert sample.total.tokens == sum(len(tokenizer.encode_ordinary(texts[int(n[4:])])) for n in names)
    again = evaluate_perplexity(model, tokenizer, folder / "val.bin", quiet(max_docs=3, seed=4, scratch_dir=str(tmp_path)),
                                progress=False)
    assert again.total.nll == sample.total.nll and "3 of 6 documents" in sample.source


PIECE_ALPHABET = st.sampled_from(list("ab Z9.,'!\n\n\r\t  ") + ["\u00a0", "\u3000", "é", "東", "'s", "  ", " \n"])


@pytest.fixture(scope="module")
def pattern_tokenizers():
    return {pattern: bpe_tokenizer(300, pattern) for pattern in ("gpt2", "cl100k")}


@pytest.mark.parametrize("pattern", ["gpt2", "cl100k"])
@given(parts=st.lists(PIECE_ALPHABET, max_size=60), piece_bytes=st.integers(1, 12))
def test_text_read_in_pieces_tokenizes_like_the_whole(tmp_path_factory, pattern_tokenizers, pattern, parts, piece_bytes):
    text = "".join(parts)
    tok = pattern_tokenizers[pattern]
    path = tmp_path_factory.mktemp("pieces") / "t.txt"
    path.write_bytes(text.encode("utf-8"))
    pieces = list(text_pieces(path, piece_bytes))
    assert "".join(pieces) == text
    assert [i for p in pieces for i in tok.encode_ordinary(p)] == tok.encode_ordinary(text)


def test_safe_cut_examples():
    assert safe_cut("ab cd") == 2 and safe_cut("ab  cd") == 2 and safe_cut("ab\n cd") == 0 and safe_cut("abc") == 0
    assert safe_cut(" ab") == 0  # a space with nothing before it is not a cut


def test_bad_inputs_are_named(tmp_path, tokenizer, model):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"good text \xff\xfe more")
    with pytest.raises(EvalDataError, match=r"bad\.txt: not UTF-8 text \(invalid byte near offset 10\)"):
        evaluate_perplexity(model, tokenizer, bad, quiet(scratch_dir=str(tmp_path)), progress=False)
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(EvalDataError, match=r"docs\.jsonl:2: needs a string field 'text'"):
        evaluate_perplexity(model, tokenizer, jsonl, quiet(scratch_dir=str(tmp_path)), progress=False)
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    (prepared / "documents.jsonl").write_text("")
    with pytest.raises(EvalDataError, match="prepared folder: name one of its token files"):
        evaluate_perplexity(model, tokenizer, prepared, quiet(scratch_dir=str(tmp_path)), progress=False)
    with pytest.raises(EvalDataError, match="no such file or folder"):
        evaluate_perplexity(model, tokenizer, tmp_path / "missing.txt", quiet(scratch_dir=str(tmp_path)), progress=False)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        evaluate_perplexity(model, None, jsonl, quiet(scratch_dir=str(tmp_path)), progress=False)
    with pytest.raises(ValueError, match="stride must be in"):
        evaluate_perplexity(model, tokenizer, write(tmp_path / "ok.txt", "ok"), quiet(stride=33, scratch_dir=str(tmp_path)),
                            progress=False)
    with pytest.raises(ValueError, match="PerplexityConfig.max_docs"):
        PerplexityConfig(max_docs=0)


def test_gpt2_tokenizer_on_shared_text_accounts_for_every_byte(tmp_path, shared_data):
    """Real text and GPT-2's real tokenizer (whose parity with tiktoken the tokenizer tests check): the
    bytes scored are the file's bytes, the tokens those of encoding it whole, and a uniform model's
    bits per byte is tokens x log2(V) / bytes."""
    tok = Tokenizer.from_gpt2_files(shared_data / "encoder.json", shared_data / "vocab.bpe")
    path = shared_data / "the-verdict.txt"
    model = tiny_gpt(tok.vocab_size, block_size=64, tie=False)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    result = evaluate_perplexity(model, tok, path, quiet(stride=64, batch_size=32, scratch_dir=str(tmp_path)), progress=False)
    text = path.read_text(encoding="utf-8")
    assert result.total.bytes == path.stat().st_size
    assert result.total.tokens == len(tok.encode_ordinary(text))
    assert result.total.bits_per_byte == pytest.approx(result.total.tokens * math.log2(50257) / result.total.bytes, rel=1e-6)
