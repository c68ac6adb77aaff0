"""Scores of predictions against references: ROUGE-L and corpus BLEU for generated text, and the
classification metrics (accuracy, per-class and macro precision/recall/F1, confusion matrix).

Pure Python, no torch: finetuning, `eval.py gen` and the report card all import these, and each
function can be checked by hand.

ROUGE-L (Lin 2004), as Google's `rouge-score` computes it with its defaults: both texts are
lowercased, every run of characters other than a-z and 0-9 becomes a space, and the words are split
on spaces (so non-ASCII letters are dropped: this metric is English-only, like its reference; no
stemming, as `use_stemmer=False`). With L the length of the longest common subsequence of words,
precision = L / len(prediction), recall = L / len(reference), F = 2PR / (P + R). Worked example:
prediction "the cat sat on the mat", reference "the cat lay on a mat": the LCS is "the cat on mat",
L = 4, P = 4/6, R = 4/6, F = 2/3. A corpus score is the mean of the per-example values.

BLEU (Papineni et al. 2002), corpus-level, as `sacrebleu.corpus_bleu` computes it with its defaults:
each text is tokenized the mteval-v13a way (punctuation split off, except periods and commas inside
numbers), n-gram counts (n = 1..4) of each hypothesis are clipped by the most any one of its
references holds, and summed over the corpus. p_n = matched / total n-grams; an order with no match
gets the "exp" smoothing of mteval (its precision is 1 / (2^k * total), k counting such orders).
BLEU = 100 * BP * exp(mean log p_n), with the brevity penalty BP = exp(1 - r / c) when the
hypotheses' total length c is below r, the sum over sentences of the reference length closest to
each hypothesis (the shorter on a tie), else 1. Worked example: hypothesis "the cat sat", reference
"the cat sat on the mat": p_1 = p_2 = p_3 = 1, no 4-gram exists so p_4 = 0 and BLEU = 0, as in
sacrebleu; the brevity penalty alone would have been exp(1 - 6/3) = 0.368.

Classification: labels may be any hashable values (ints, strings). Precision of a class that was
never predicted (or recall of one that never occurs) is 0, as scikit-learn reports it. Macro
averages weigh every class equally, including classes absent from y_true but listed in `labels`.
Worked example: y_true = [a, a, b, b], y_pred = [a, b, b, b]: accuracy 3/4; class a: P = 1/1,
R = 1/2, F1 = 2/3; class b: P = 2/3, R = 2/2, F1 = 4/5; macro F1 = (2/3 + 4/5) / 2 = 11/15.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

# ---- ROUGE-L ----

_NOT_ALNUM = re.compile(r"[^a-z0-9]+")


def rouge_tokenize(text: str) -> list[str]:
    """Words as rouge-score sees them: lowercase ASCII letters and digits, split at anything else."""
    return _NOT_ALNUM.sub(" ", text.lower()).split()


def lcs_length(a: Sequence[Hashable], b: Sequence[Hashable]) -> int:
    """Length of the longest common subsequence of a and b: the classic dynamic programme, kept to
    one row (O(len(a) * len(b)) time, O(len(b)) memory)."""
    if len(b) > len(a):
        a, b = b, a
    row = [0] * (len(b) + 1)  # row[j] = LCS of the a-prefix so far and b[:j]
    for x in a:
        diagonal = 0  # the previous row's row[j-1]
        for j, y in enumerate(b, start=1):
            above = row[j]
            row[j] = diagonal + 1 if x == y else max(above, row[j - 1])
            diagonal = above
    return row[-1]


@dataclass(frozen=True)
class RougeScore:
    precision: float
    recall: float
    fmeasure: float


def f_measure(precision: float, recall: float) -> float:
    """The harmonic mean of precision and recall (0 when both are 0)."""
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def rouge_l(prediction: str, reference: str, tokenize: Callable[[str], list[str]] = rouge_tokenize) -> RougeScore:
    """ROUGE-L of one prediction against one reference (see the module docstring)."""
    pred, ref = tokenize(prediction), tokenize(reference)
    if not pred or not ref:
        return RougeScore(0.0, 0.0, 0.0)
    common = lcs_length(pred, ref)
    precision, recall = common / len(pred), common / len(ref)
    return RougeScore(precision, recall, f_measure(precision, recall))


def corpus_rouge_l(predictions: Sequence[str], references: Sequence[str],
                   tokenize: Callable[[str], list[str]] = rouge_tokenize) -> RougeScore:
    """Mean ROUGE-L precision, recall and F over pairs (prediction i, reference i)."""
    _check_pairs(predictions, references)
    scores = [rouge_l(p, r, tokenize) for p, r in zip(predictions, references)]
    n = len(scores)
    return RougeScore(*(sum(getattr(s, k) for s in scores) / n for k in ("precision", "recall", "fmeasure")))


# ---- BLEU ----

# mteval-v13a's rules (its Perl substitutions), applied in order: ASCII symbols become separate
# tokens (all but the apostrophe, the dash, the period and the comma); a period or comma is split off
# unless digits sit on both sides (3.14, 1,000); a dash after a digit is split off. Subtle: each rule
# consumes the character it looks at, so "a.." splits only its first period in the second rule.
_13A_SYMBOLS = " !\"#$%&()*+/:;<=>?@[\\]^_`{|}~"
_13A_RULES = [
    (re.compile("([" + re.escape(_13A_SYMBOLS) + "])"), r" \1 "),
    (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),  # period/comma after a non-digit
    (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),  # period/comma before a non-digit
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),  # dash after a digit
]


def tokenize_13a(text: str) -> list[str]:
    """mteval-v13a tokenization, the default of sacrebleu and WMT (see the rules above)."""
    text = text.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    for escaped, plain in (("&quot;", '"'), ("&amp;", "&"), ("&lt;", "<"), ("&gt;", ">")):
        text = text.replace(escaped, plain)
    text = f" {text} "
    for pattern, replacement in _13A_RULES:
        text = pattern.sub(replacement, text)
    return text.split()


BLEU_TOKENIZERS: dict[str, Callable[[str], list[str]]] = {"13a": tokenize_13a, "none": str.split}


@dataclass(frozen=True)
class BleuScore:
    score: float  # 0..100
    precisions: tuple[float, ...]  # p_1 .. p_N in percent, after smoothing
    brevity_penalty: float
    hyp_len: int  # tokens in all hypotheses
    ref_len: int  # tokens in the closest reference of each, summed
    matches: tuple[int, ...]  # clipped n-gram matches per order
    totals: tuple[int, ...]  # hypothesis n-grams per order

    def __str__(self) -> str:
        precisions = "/".join(f"{p:.1f}" for p in self.precisions)
        return (f"BLEU = {self.score:.2f} {precisions} (BP = {self.brevity_penalty:.3f} "
                f"ratio = {self.hyp_len / max(self.ref_len, 1):.3f} hyp_len = {self.hyp_len} ref_len = {self.ref_len})")


def ngram_counts(tokens: Sequence[str], max_order: int) -> Counter:
    """Every n-gram of tokens, n = 1..max_order, as tuples, with its count."""
    return Counter(tuple(tokens[i : i + n]) for n in range(1, max_order + 1) for i in range(len(tokens) - n + 1))


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]], *,
                max_order: int = 4, smooth: str = "exp", tokenize: str = "13a", lowercase: bool = False) -> BleuScore:
    """Corpus BLEU of hypotheses[i] against references[i] (a string, or a list of alternatives).

    smooth: "exp" (mteval's, sacrebleu's default) or "none"; tokenize: "13a" or "none" (whitespace).
    """
    if smooth not in ("exp", "none"):
        raise ValueError(f"smooth must be 'exp' or 'none', got {smooth!r}")
    if tokenize not in BLEU_TOKENIZERS:
        raise ValueError(f"tokenize must be one of {', '.join(BLEU_TOKENIZERS)}, got {tokenize!r}")
    _check_pairs(hypotheses, references)
    split = BLEU_TOKENIZERS[tokenize]

    def words(text: str) -> list[str]:
        return split((text.lower() if lowercase else text).rstrip())

    matches, totals = [0] * max_order, [0] * max_order
    hyp_len = ref_len = 0
    for hypothesis, refs in zip(hypotheses, references):
        refs = [refs] if isinstance(refs, str) else list(refs)
        if not refs:
            raise ValueError("every hypothesis needs at least one reference")
        hyp = words(hypothesis)
        ref_words = [words(r) for r in refs]
        hyp_len += len(hyp)
        # the closest reference length; on a tie the shorter one
        ref_len += min((abs(len(r) - len(hyp)), len(r)) for r in ref_words)[1]
        most = Counter()  # each n-gram's largest count in any one reference: the clip
        for r in ref_words:
            most |= ngram_counts(r, max_order)
        for gram, count in ngram_counts(hyp, max_order).items():
            totals[len(gram) - 1] += count
            matches[len(gram) - 1] += min(count, most[gram])
    bp = 1.0 if hyp_len >= ref_len else (math.exp(1 - ref_len / hyp_len) if hyp_len else 0.0)
    precisions = [0.0] * max_order
    halvings = 0
    for n in range(max_order):
        if totals[n] == 0:
            break  # no n-grams of this order at all: its precision stays 0, and so does BLEU
        if matches[n]:
            precisions[n] = 100.0 * matches[n] / totals[n]
        elif smooth == "exp":
            halvings += 1
            precisions[n] = 100.0 / (2**halvings * totals[n])
    if not any(matches) or min(precisions) == 0.0:
        score = 0.0
    else:
        score = bp * math.exp(sum(math.log(p) for p in precisions) / max_order)
    return BleuScore(score, tuple(precisions), bp, hyp_len, ref_len, tuple(matches), tuple(totals))


# ---- classification ----


@dataclass(frozen=True)
class ClassScores:
    label: Any
    precision: float
    recall: float
    f1: float
    support: int  # how often the class occurs in y_true


@dataclass
class ClassificationReport:
    """Accuracy, per-class and macro precision/recall/F1, and the confusion matrix (rows: true
    class, columns: predicted class, both in `labels` order)."""

    labels: list[Any]
    confusion: list[list[int]]
    accuracy: float
    classes: list[ClassScores] = field(default_factory=list)
    macro_precision: float = 0.0
    macro_recall: float = 0.0
    macro_f1: float = 0.0

    @property
    def total(self) -> int:
        return sum(map(sum, self.confusion))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: labels as given (a JSON writer turns non-string labels into their str())."""
        return {
            "accuracy": self.accuracy, "macro_precision": self.macro_precision, "macro_recall": self.macro_recall,
            "macro_f1": self.macro_f1, "total": self.total, "labels": list(self.labels),
            "classes": {str(c.label): {"precision": c.precision, "recall": c.recall, "f1": c.f1, "support": c.support}
                        for c in self.classes},
            "confusion": [list(row) for row in self.confusion],
        }

    def table(self) -> str:
        """Per-class scores and the confusion matrix as aligned plain-text tables."""
        names = [str(label) for label in self.labels]
        width = max([len(n) for n in names] + [len("macro avg"), 5])
        lines = [f"{'':<{width}}  precision  recall     f1  support"]
        for c, name in zip(self.classes, names):
            lines.append(f"{name:<{width}}  {c.precision:>9.4f}  {c.recall:>6.4f}  {c.f1:.4f}  {c.support:>7}")
        lines.append(f"{'macro avg':<{width}}  {self.macro_precision:>9.4f}  {self.macro_recall:>6.4f}  "
                     f"{self.macro_f1:.4f}  {self.total:>7}")
        lines.append(f"{'accuracy':<{width}}  {'':>9}  {'':>6}  {self.accuracy:.4f}  {self.total:>7}")
        lines.append("")
        lines.append("confusion matrix (rows: true, columns: predicted)")
        cell = max([len(n) for n in names] + [len(str(v)) for row in self.confusion for v in row])
        lines.append(f"{'':<{width}}  " + " ".join(f"{n:>{cell}}" for n in names))
        for name, row in zip(names, self.confusion):
            lines.append(f"{name:<{width}}  " + " ".join(f"{v:>{cell}}" for v in row))
        return "\n".join(lines)


def confusion_matrix(y_true: Sequence[Hashable], y_pred: Sequence[Hashable], labels: Sequence[Hashable]) -> list[list[int]]:
    """counts[i][j]: examples of class labels[i] predicted as labels[j]."""
    _check_pairs(y_true, y_pred, what="y_true and y_pred")
    index = {label: i for i, label in enumerate(labels)}
    counts = [[0] * len(labels) for _ in labels]
    for position, (t, p) in enumerate(zip(y_true, y_pred)):
        for value in (t, p):
            if value not in index:
                raise ValueError(f"label {value!r} (example {position}) is not among the labels {list(labels)!r}")
        counts[index[t]][index[p]] += 1
    return counts


def classification_report(y_true: Sequence[Hashable], y_pred: Sequence[Hashable],
                          labels: Sequence[Hashable] | None = None) -> ClassificationReport:
    """Score predicted labels against true ones. `labels` fixes the classes and their order;
    by default, every label seen in either list, sorted."""
    if labels is None:
        labels = sorted(set(y_true) | set(y_pred), key=lambda v: (type(v).__name__, v))
    labels = list(labels)
    if len(set(labels)) != len(labels):
        raise ValueError(f"labels must be distinct, got {labels!r}")
    confusion = confusion_matrix(y_true, y_pred, labels)
    total = sum(map(sum, confusion))
    classes = []
    for i, label in enumerate(labels):
        hits = confusion[i][i]
        predicted = sum(row[i] for row in confusion)
        support = sum(confusion[i])
        precision = hits / predicted if predicted else 0.0
        recall = hits / support if support else 0.0
        classes.append(ClassScores(label, precision, recall, f_measure(precision, recall), support))
    k = len(classes)
    return ClassificationReport(
        labels=labels, confusion=confusion, accuracy=sum(confusion[i][i] for i in range(k)) / total,
        classes=classes, macro_precision=sum(c.precision for c in classes) / k,
        macro_recall=sum(c.recall for c in classes) / k, macro_f1=sum(c.f1 for c in classes) / k,
    )


def _check_pairs(a: Sequence, b: Sequence, what: str = "predictions and references") -> None:
    if len(a) != len(b):
        raise ValueError(f"{what} must have the same length, got {len(a)} and {len(b)}")
    if len(a) == 0:
        raise ValueError(f"{what} are empty: nothing to score")
