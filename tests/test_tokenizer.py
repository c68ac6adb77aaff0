"""The tokenizer's algorithms: training against the textbook, encoding paths against each other,
round trips, special tokens, streaming decode."""

import pytest
import regex
from hypothesis import given
from hypothesis import strategies as st

import bpe_reference as ref
from minillm.tokenizer import EOT, PATTERNS, Tokenizer
from minillm.tokenizer import bpe, pretokenize, train

SAMPLE = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
    "It's 1,234.5 degrees!  Don't   you think?\t\tNaïve café, 日本語, emoji 👍🏽 and e\u0301.\r\n"
)
# text that exercises every part of the patterns: contractions, numbers, runs of spaces, non-ASCII
TEXT = st.text(alphabet=st.sampled_from(list("ab cd'sxyzT1 2\n\t.,!éß日👍\u0301\u00a0")), max_size=80)


@pytest.fixture(scope="module")
def trained():
    return Tokenizer.train([SAMPLE * 3, "the cat sat on the mat; the end"], 256 + 2 + 100, special_tokens=(EOT, "<|pad|>"))


def test_worked_example_aaabdaaabac():
    """The classic example (Wikipedia's "Byte pair encoding"), with ids: a=97, b=98, c=99, d=100.

    a a a b d a a a b a c   pairs: aa x4, ab x2, bd, da, ba, ac x1
    1. (97, 97) "aa" -> 256, applied left to right: "aaa" becomes [aa, a]
       256 97 98 100 256 97 98 97 99      pairs: (256,97) x2, (97,98) x2, the rest x1
    2. a tie at 2: the smaller pair (97, 98) "ab" wins -> 257
       256 257 100 256 257 97 99          pairs: (256,257) x2, the rest x1
    3. (256, 257) "aaab" -> 258
       258 100 258 97 99                  four pairs, each x1: the smallest is (97, 99)
    4. (97, 99) "ac" -> 259               258 100 258 259
    5. (100, 258) "daaab" -> 260          (100,258) < (258,100) < (258,259)
    6. (258, 260) "aaabdaaab" -> 261      258 260 259 -> 261 259
    7. (261, 259) the whole text -> 262
    """
    tok = Tokenizer.train("aaabdaaabac", 256 + 3, special_tokens=())
    assert [m[:2] for m in tok.merges] == [(97, 97), (97, 98), (256, 257)]
    assert tok.encode("aaabdaaabac") == [258, 100, 258, 97, 99]
    tok = Tokenizer.train("aaabdaaabac", 256 + 7, special_tokens=())
    assert tok.merges == ((97, 97, 256), (97, 98, 257), (256, 257, 258), (97, 99, 259),
                          (100, 258, 260), (258, 260, 261), (261, 259, 262))
    assert tok.encode("aaabdaaabac") == [262]
    assert tok.token_bytes(261) == b"aaabdaaab"
    with pytest.warns(UserWarning, match="stopped after 7 of 20 merges"):  # nothing left to merge
        assert Tokenizer.train("aaabdaaabac", 256 + 20, special_tokens=()).vocab_size == 263


@given(docs=st.lists(TEXT, min_size=1, max_size=6), num_merges=st.integers(1, 60))
def test_fast_training_agrees_with_textbook(docs, num_merges):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # small corpora run out of pairs; both must stop at the same merge
        tok = Tokenizer.train(docs, 256 + num_merges, special_tokens=(), num_workers=1)
    expected = ref.train(ref.split(docs), num_merges)
    assert [m[:2] for m in tok.merges] == expected
    # and the tokenizer encodes text exactly as applying the merges one after another does
    for doc in docs:
        want = [i for chunk in ref.split([doc]) for i in ref.encode_chunk(chunk.encode(), expected)]
        assert tok.encode(doc) == want


def test_training_on_shared_text_agrees_with_textbook(shared_data):
    text = (shared_data / "the-verdict.txt").read_text(encoding="utf-8")
    tok = Tokenizer.train(text, 256 + 60, special_tokens=())
    assert [m[:2] for m in tok.merges] == ref.train(ref.split([text]), 60)


def test_parallel_pre_split_counts_exactly(monkeypatch):
    """Cutting one long text into pieces for worker processes must not change a single chunk."""
    text = SAMPLE * 40 + "  trailing   spaces   \n\n\n" + SAMPLE
    monkeypatch.setattr(train, "PIECE_CHARS", 50)  # many pieces, cut everywhere the rule allows
    monkeypatch.setattr(train, "BATCH_CHARS", 200)
    for pattern in ("gpt2", "cl100k"):
        serial = train.count_chunks(text, pattern, num_workers=1)
        assert serial == train.count_chunks(text, pattern, num_workers=2)
        assert sum(serial.values()) == len(regex.findall(PATTERNS[pattern], text))
        assert Tokenizer.train(text, 360, pattern=pattern, num_workers=2) == Tokenizer.train(text, 360, pattern=pattern, num_workers=1)


def test_special_tokens_are_document_boundaries_in_training():
    tok = Tokenizer.train(["ab<|endoftext|>ab" * 50], 256 + 3, special_tokens=(EOT,))
    learned = {tok.token_bytes(new) for _, _, new in tok.merges}
    assert learned == {b"ab", b"abab"}  # "<|", "endoftext" and "|>" are never learned as text
    assert tok.special_tokens == {EOT: tok.vocab_size - 1} and tok.eot_id == tok.vocab_size - 1


@given(text=st.text())
def test_round_trip_any_text(trained, text):
    assert trained.decode(trained.encode_ordinary(text)) == text


@given(data=st.binary())
def test_round_trip_any_bytes(trained, data):
    ids = trained.encode_bytes(data)
    assert trained.decode_bytes(ids) == data
    try:
        assert ids == trained.encode_ordinary(data.decode("utf-8"))  # the same thing on valid UTF-8
    except UnicodeDecodeError:
        pass


def test_lone_surrogates_are_replaced_like_tiktoken(trained):
    assert trained.decode(trained.encode("a\ud800b")) == "a\ufffdb"


@given(text=TEXT, pattern=st.sampled_from(["gpt2", "cl100k"]))
def test_ascii_fast_path_and_mixed_text_split_exactly(text, pattern):
    splitter = pretokenize.Splitter(pattern, min_ascii_run=3)  # switch between re and regex often
    expected = regex.findall(PATTERNS[pattern], text)
    assert splitter.split(text) == expected
    ascii_text = text.encode("ascii", "ignore").decode()
    assert splitter.ascii_regex.findall(ascii_text) == regex.findall(PATTERNS[pattern], ascii_text)
    pieces = list(splitter.safe_pieces(text, 5))
    assert "".join(pieces) == text
    assert [c for p in pieces for c in regex.findall(PATTERNS[pattern], p)] == expected


def test_gpt2_pattern_matches_the_original():
    text = SAMPLE + " 's 't 're 've 'm 'll 'd 'x '' 12ab  \n \u3000x"
    assert regex.findall(pretokenize.GPT2_PATTERN, text) == regex.findall(ref.GPT2_ORIGINAL_PATTERN, text)


def test_custom_pattern():
    tok = Tokenizer.train("one two three " * 20, 256 + 8, pattern=r"\w+|\W+", special_tokens=())
    assert tok.pattern == r"\w+|\W+" and tok.decode(tok.encode("two one")) == "two one"
    grouped = pretokenize.Splitter(r"(\w)+|(\W)+")  # capturing groups: chunks are still whole matches
    assert grouped.split("ab, cd") == ["ab", ", ", "cd"]
    with pytest.raises(ValueError, match="matches nothing at character 2"):
        pretokenize.Splitter(r"[a-z]+").split("ab cd")
    with pytest.raises(ValueError, match="not a valid regex"):
        Tokenizer.train("x", 300, pattern="(unclosed")


@given(ids=st.lists(st.sampled_from(b"the cat sat on mat;"), max_size=600))
def test_long_chunk_and_batch_paths_agree_with_short_path(trained, ids):
    ranks, results = trained._ranks, trained._results
    expected = bpe.encode_chunk(list(ids[: bpe.LONG_CHUNK]), ranks, results)
    assert bpe.encode_long_chunk(list(ids[: bpe.LONG_CHUNK]), ranks, results) == expected
    table = bpe.PairTable.build(ranks, results, trained.byte_ids)
    pieces = [bytes(ids[i:i + 13]) for i in range(0, len(ids), 13)] + [b"", b"a"]
    assert bpe.encode_chunks_batch(pieces, table) == [bpe.encode_chunk(list(p), ranks, results) for p in pieces]


def test_batch_path_is_used_for_big_new_texts(trained):
    text = " ".join(f"w{i}x{i * 7 % 13}" for i in range(6000))  # thousands of chunks the cache lacks
    fresh = Tokenizer(trained.pattern, trained.byte_ids, trained.merges, trained.special_tokens)
    ids = fresh.encode(text)
    assert fresh._pair_table is not None  # the numpy batch ran
    assert ids == [i for chunk in regex.findall(PATTERNS["gpt2"], text) for i in trained.encode(chunk)]


def test_threads_can_share_a_tokenizer(trained):
    """Each call collects its new chunks privately; the shared cache only ever gets finished entries."""
    from concurrent.futures import ThreadPoolExecutor

    texts = [" ".join(f"w{i * k}x{k}" for i in range(800)) + SAMPLE for k in range(1, 9)]
    expected = [trained.encode(t) for t in texts]
    fresh = Tokenizer(trained.pattern, trained.byte_ids, trained.merges, trained.special_tokens)
    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(fresh.encode, texts * 3)) == expected * 3


def test_special_tokens_are_refused_unless_allowed(trained):
    text = f"hello {EOT} world <|pad|>"
    with pytest.raises(ValueError, match=r"special token '<\|endoftext\|>' at character 6"):
        trained.encode(text)
    with pytest.raises(ValueError, match="<|pad|>"):
        trained.encode(text, allowed_special={EOT})
    eot, pad = trained.special_tokens[EOT], trained.special_tokens["<|pad|>"]
    ids = trained.encode(text, allowed_special="all")
    assert ids.count(eot) == 1 and ids.count(pad) == 1 and trained.decode(ids) == text
    ordinary = trained.encode_ordinary(text)
    assert eot not in ordinary and pad not in ordinary and trained.decode(ordinary) == text
    with pytest.raises(ValueError, match="not special tokens"):
        trained.encode("x", allowed_special={"<|nope|>"})
    with pytest.raises(ValueError, match="write"):
        trained.encode("x", allowed_special=EOT)  # a bare string, not a set


@given(parts=st.lists(st.one_of(TEXT, st.sampled_from([EOT, "<|pad|>", "<|", "|>", "<|endoftext"])), max_size=8))
def test_special_tokens_never_come_from_plain_text(trained, parts):
    text = "".join(parts)
    specials = set(trained.special_tokens.values())
    assert not specials & set(trained.encode_ordinary(text))
    contains = any(token in text for token in trained.special_tokens)
    if contains:
        with pytest.raises(ValueError):
            trained.encode(text)
    else:
        assert trained.encode(text) == trained.encode_ordinary(text)
    ids = trained.encode(text, allowed_special="all")
    assert trained.decode(ids) == text
    assert sum(i in specials for i in ids) == sum(text.count(t) for t in trained.special_tokens)


def test_decode_options_and_bad_ids(trained):
    import numpy as np

    ids = trained.encode("héllo")
    assert trained.decode(np.array(ids)) == "héllo"
    assert trained.decode_bytes(ids) == "héllo".encode()
    e_acute = trained.encode_bytes("é".encode())  # two byte tokens at most
    broken = e_acute[:1] if len(e_acute) == 2 else trained.encode_bytes(b"\xc3")
    assert trained.decode(broken) == "\ufffd"
    with pytest.raises(UnicodeDecodeError):
        trained.decode(broken, errors="strict")
    for bad in (-1, trained.vocab_size, 10**9):
        with pytest.raises(ValueError, match=f"token id {bad} at position 1"):
            trained.decode([ids[0], bad])


@given(text=st.text(alphabet=st.sampled_from(list("ab é日👍🏽\u0301")), max_size=40), cuts=st.lists(st.integers(0, 60), max_size=6))
def test_incremental_decoder_matches_one_shot(trained, text, cuts):
    ids = trained.encode(text)
    decoder = trained.incremental_decoder()
    pieces, start = [], 0
    for cut in sorted(cuts) + [len(ids)]:
        pieces.append(decoder.push(ids[start:cut]))
        start = max(start, cut)
    pieces.append(decoder.flush())
    assert "".join(pieces) == text == trained.decode(ids)
    assert all("\ufffd" not in piece for piece in pieces)  # never half a character


@given(ids=st.lists(st.integers(0, 255), max_size=30))
def test_incremental_decoder_on_arbitrary_bytes(trained, ids):
    decoder = trained.incremental_decoder()
    streamed = "".join(decoder.push(i) for i in ids) + decoder.flush()  # one id at a time
    assert streamed == trained.decode(ids)


def test_encode_batch_in_processes(trained):
    texts = [SAMPLE[i:] * 3 for i in range(40)] + ["", EOT]
    expected = [trained.encode_ordinary(t) for t in texts]
    assert trained.encode_batch(texts, num_workers=2) == expected
    assert trained.encode_batch(texts, num_workers=1) == expected
    assert trained.encode_batch(texts) == expected
    with pytest.raises(TypeError, match="item 1"):
        trained.encode_batch(["a", b"b"])
    with pytest.raises(ValueError, match="num_workers"):
        trained.encode_batch(["a"], num_workers=0)


def test_encoding_workers_serve_batch_after_batch(trained):
    batches = [[SAMPLE[i:] * 2 for i in range(start, start + 15)] + [""] for start in (0, 40, 80)]
    with trained.encoding_workers(3) as pool:
        children = [child for child, _ in pool.children]
        assert len(children) == 2 and all(child.is_alive() for child in children)
        for texts in batches:  # the same workers answer every batch
            assert pool.encode(texts) == [trained.encode_ordinary(t) for t in texts]
        assert pool.encode([]) == []
    assert not any(child.is_alive() for child in children)  # closing stops them


def test_a_dead_worker_process_is_reported(trained):
    with trained.encoding_workers(2) as pool:
        child = pool.children[0][0]
        child.kill()
        child.join()
        with pytest.raises(RuntimeError, match=f"worker process {child.pid} died"):
            pool.encode(["some text", "and more text"] * 4)


def test_a_failing_worker_process_is_reported(trained, monkeypatch):
    import os

    parent = os.getpid()
    original = Tokenizer._encode_many

    def fail_in_child(self, texts):
        if os.getpid() != parent:
            raise RuntimeError("boom in the child")
        return original(self, texts)

    monkeypatch.setattr(Tokenizer, "_encode_many", fail_in_child)
    with pytest.raises(RuntimeError, match="(?s)worker process .* failed.*boom in the child"):
        trained.encode_batch(["some text"] * 4, num_workers=2)


def test_training_reports_progress(capsys):
    Tokenizer.train(SAMPLE * 20, 300, verbose=True)
    err = capsys.readouterr().err
    assert "pre-split |" in err and "merges | 43/43 merges (100%)" in err and "trained Tokenizer(vocab_size=300" in err


def test_constructor_rejects_inconsistent_vocabularies():
    with pytest.raises(ValueError, match="256 bytes"):
        Tokenizer("gpt2", range(255), [])
    with pytest.raises(ValueError, match="no earlier byte or merge made"):
        Tokenizer("gpt2", range(256), [(300, 1, 256)])
    with pytest.raises(ValueError, match="already"):
        Tokenizer("gpt2", range(256), [(1, 2, 256)], {"<|x|>": 256})
    with pytest.raises(ValueError, match="already token 256"):
        Tokenizer("gpt2", range(256), [(97, 98, 256), (97, 98, 257)])
    with pytest.raises(ValueError, match="vocab_size"):
        Tokenizer.train("abc", 256, special_tokens=(EOT,))
