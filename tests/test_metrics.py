"""ROUGE-L, BLEU and the classification metrics: hand-derived examples, properties, and agreement
with the reference packages (rouge-score, sacrebleu) on the same inputs when they are installed."""

import itertools
import math
from functools import lru_cache

import pytest
from hypothesis import given
from hypothesis import strategies as st

from minillm.metrics import (
    classification_report,
    confusion_matrix,
    corpus_bleu,
    corpus_rouge_l,
    lcs_length,
    rouge_l,
    tokenize_13a,
)

# words, punctuation and numbers that exercise both tokenizers (13a's digit rules, rouge's a-z0-9 filter)
WORDS = ["the", "cat", "sat", "on", "mat", "The", "dog", "a", "3.14", "1,000", "7-8", "x", "(b)", "U.S.",
         "it's", "naïve", "&amp;", "well-known", "end.", "yes,", "\"quoted\"", "?", "!", "-", "über"]
texts = st.lists(st.sampled_from(WORDS), min_size=0, max_size=14).map(" ".join)
nonempty_texts = st.lists(st.sampled_from(WORDS), min_size=1, max_size=14).map(" ".join)


# ---- ROUGE-L ----


def test_rouge_l_worked_example():
    """From the module docstring: LCS "the cat on mat" of 6 and 6 words."""
    score = rouge_l("the cat sat on the mat", "the cat lay on a mat")
    assert score.precision == pytest.approx(4 / 6) and score.recall == pytest.approx(4 / 6)
    assert score.fmeasure == pytest.approx(2 / 3)
    assert rouge_l("", "the cat").fmeasure == 0.0


def lcs_brute(a, b):
    """The textbook recursion, memoised: an independent formulation of the LCS length."""
    @lru_cache(maxsize=None)
    def go(i, j):
        if i == len(a) or j == len(b):
            return 0
        if a[i] == b[j]:
            return 1 + go(i + 1, j + 1)
        return max(go(i + 1, j), go(i, j + 1))
    return go(0, 0)


@given(st.lists(st.integers(0, 3), max_size=9), st.lists(st.integers(0, 3), max_size=9))
def test_lcs_length_matches_the_recursion(a, b):
    assert lcs_length(a, b) == lcs_brute(tuple(a), tuple(b)) == lcs_length(b, a)


@pytest.fixture(scope="module")
def rouge_scorer():
    rouge = pytest.importorskip("rouge_score.rouge_scorer", reason="rouge-score is not installed (pip install rouge-score)")
    return rouge.RougeScorer(["rougeL"], use_stemmer=False)


@given(prediction=texts, reference=texts)
def test_rouge_l_agrees_with_rouge_score(rouge_scorer, prediction, reference):
    theirs = rouge_scorer.score(reference, prediction)["rougeL"]
    ours = rouge_l(prediction, reference)
    assert ours.precision == pytest.approx(theirs.precision, abs=1e-12)
    assert ours.recall == pytest.approx(theirs.recall, abs=1e-12)
    assert ours.fmeasure == pytest.approx(theirs.fmeasure, abs=1e-12)


def test_corpus_rouge_l_is_the_mean(rouge_scorer):
    preds = ["the cat sat on the mat", "a dog", "Hello, World!"]
    refs = ["the cat lay on a mat", "the dog barked", "hello world"]
    expected = sum(rouge_scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(preds, refs)) / 3
    assert corpus_rouge_l(preds, refs).fmeasure == pytest.approx(expected)
    with pytest.raises(ValueError, match="same length"):
        corpus_rouge_l(preds, refs[:2])


# ---- BLEU ----


def test_bleu_worked_examples():
    """Docstring example (no 4-gram: BLEU 0), and a perfect match scoring 100."""
    short = corpus_bleu(["the cat sat"], ["the cat sat on the mat"])
    assert short.score == 0.0 and short.brevity_penalty == pytest.approx(math.exp(1 - 6 / 3))
    assert short.matches == (3, 2, 1, 0) and short.totals == (3, 2, 1, 0)
    assert corpus_bleu(["the cat sat on the mat"], ["the cat sat on the mat"]).score == pytest.approx(100.0)
    # one of 5 unigrams wrong: p = 4/5, 2/4, 1/3, 0/2 smoothed to 1/(2*2); BP = 1 (same length)
    s = corpus_bleu(["the cat sat on mat"], ["the cat sat in mat"])
    expected = 100 * math.exp((math.log(4 / 5) + math.log(2 / 4) + math.log(1 / 3) + math.log(1 / 4)) / 4)
    assert s.score == pytest.approx(expected)


def test_bleu_clips_by_the_best_reference_and_picks_the_closest_length():
    s = corpus_bleu(["the the the the"], [["the cat", "the the mat"]], max_order=1, smooth="none")
    assert s.matches == (2,) and s.totals == (4,)  # "the" clipped at 2, the most one reference holds
    assert s.ref_len == 3  # |4-3| < |4-2|
    tie = corpus_bleu(["a b c"], [["a b", "a b c d"]], max_order=1)
    assert tie.ref_len == 2  # equally close: the shorter


def test_13a_tokenization_examples():
    assert tokenize_13a("Hello, world! Pi is 3.14, not 1,000-2.") == \
        ["Hello", ",", "world", "!", "Pi", "is", "3.14", ",", "not", "1,000", "-", "2", "."]
    assert tokenize_13a("&quot;x&quot; it's a-b") == ['"', "x", '"', "it's", "a-b"]


@pytest.fixture(scope="module")
def sacrebleu():
    return pytest.importorskip("sacrebleu", reason="sacrebleu is not installed (pip install sacrebleu)")


@given(text=texts)
def test_13a_agrees_with_sacrebleu(sacrebleu, text):
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    assert tokenize_13a(text) == Tokenizer13a()(text).split()


@given(data=st.data(), n=st.integers(1, 6), refs_per=st.integers(1, 3), lowercase=st.booleans(),
       tokenize=st.sampled_from(["13a", "none"]), smooth=st.sampled_from(["exp", "none"]))
def test_corpus_bleu_agrees_with_sacrebleu(sacrebleu, data, n, refs_per, lowercase, tokenize, smooth):
    hyps = data.draw(st.lists(texts, min_size=n, max_size=n))
    streams = [data.draw(st.lists(nonempty_texts, min_size=n, max_size=n)) for _ in range(refs_per)]
    theirs = sacrebleu.corpus_bleu(hyps, streams, lowercase=lowercase, tokenize=tokenize, smooth_method=smooth)
    ours = corpus_bleu(hyps, [list(refs) for refs in zip(*streams)], lowercase=lowercase, tokenize=tokenize, smooth=smooth)
    assert (ours.hyp_len, ours.ref_len) == (theirs.sys_len, theirs.ref_len)
    assert list(ours.matches) == list(theirs.counts) and list(ours.totals) == list(theirs.totals)
    assert ours.brevity_penalty == pytest.approx(theirs.bp)
    assert ours.score == pytest.approx(theirs.score, abs=1e-9)


def test_bleu_agrees_with_sacrebleu_on_sentences(sacrebleu):
    hyps = ["The quick brown fox jumps over the lazy dog.", "It costs $3.50, or 1,000 yen!", "Short."]
    refs = ["The quick brown fox jumped over the lazy dog.", "It costs $3.50 (1,000 yen).", "A short one."]
    theirs = sacrebleu.corpus_bleu(hyps, [refs])
    ours = corpus_bleu(hyps, refs)
    assert ours.score == pytest.approx(theirs.score, abs=1e-9)
    assert str(ours).startswith(f"BLEU = {theirs.score:.2f}")


def test_bleu_rejects_bad_arguments():
    with pytest.raises(ValueError, match="smooth"):
        corpus_bleu(["a"], ["a"], smooth="floor")
    with pytest.raises(ValueError, match="empty"):
        corpus_bleu([], [])
    with pytest.raises(ValueError, match="at least one reference"):
        corpus_bleu(["a"], [[]])


# ---- classification ----


def test_classification_worked_example():
    report = classification_report(["a", "a", "b", "b"], ["a", "b", "b", "b"])
    assert report.labels == ["a", "b"] and report.confusion == [[1, 1], [0, 2]]
    assert report.accuracy == pytest.approx(3 / 4)
    a, b = report.classes
    assert (a.precision, a.recall, a.f1, a.support) == pytest.approx((1.0, 0.5, 2 / 3, 2))
    assert (b.precision, b.recall, b.f1, b.support) == pytest.approx((2 / 3, 1.0, 4 / 5, 2))
    assert report.macro_f1 == pytest.approx(11 / 15)
    table = report.table()
    assert "macro avg" in table and "confusion matrix" in table and "0.7333" in table
    d = report.to_dict()
    assert d["classes"]["a"]["recall"] == 0.5 and d["confusion"] == [[1, 1], [0, 2]] and d["total"] == 4


@given(pairs=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3)), min_size=1, max_size=40))
def test_classification_metrics_match_direct_counting(pairs):
    y_true, y_pred = [t for t, _ in pairs], [p for _, p in pairs]
    labels = [0, 1, 2, 3]
    report = classification_report(y_true, y_pred, labels=labels)
    assert report.accuracy == pytest.approx(sum(t == p for t, p in pairs) / len(pairs))
    assert report.total == len(pairs)
    for c in report.classes:
        tp = sum(t == c.label and p == c.label for t, p in pairs)
        fp = sum(t != c.label and p == c.label for t, p in pairs)
        fn = sum(t == c.label and p != c.label for t, p in pairs)
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        assert (c.precision, c.recall) == pytest.approx((precision, recall))
        assert c.f1 == pytest.approx(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
        assert c.support == tp + fn
    assert report.macro_f1 == pytest.approx(sum(c.f1 for c in report.classes) / 4)


def test_confusion_matrix_orders_by_labels_and_names_unknown_labels():
    assert confusion_matrix([1, 0, 1], [1, 1, 0], labels=[1, 0]) == [[1, 1], [1, 0]]
    with pytest.raises(ValueError, match=r"label 'c' \(example 1\)"):
        classification_report(["a", "c"], ["a", "a"], labels=["a", "b"])
    with pytest.raises(ValueError, match="same length"):
        classification_report([0, 1], [0])
    assert list(itertools.chain(*confusion_matrix(["x"], ["x"], labels=["x", "y"]))) == [1, 0, 0, 0]
