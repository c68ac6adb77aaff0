"""Multiple-choice benchmarks scored by log-likelihood, reported as EleutherAI's lm-evaluation-harness
reports `acc` and `acc_norm`, from a generic JSONL format or the public HellaSwag, ARC and PIQA files.

The method (the harness's "multiple_choice" output type): for each question, each choice is scored
as the continuation `delimiter + choice` of the context, by the sum of the log-probabilities of its
tokens given the context and the tokens before them. Then

    acc       1 if the choice with the highest log-likelihood is the answer, else 0
    acc_norm  the same with each log-likelihood divided by the length of its choice in characters
              (the harness's `len(choice)`, delimiter excluded; equal to the byte length for ASCII)

averaged over the questions, each with its standard error (sample standard deviation / sqrt(n)).
The harness does not count tokens for acc_norm, so the score does not depend on how a tokenizer
splits the endings. Ties go to the first choice, as numpy's argmax does.

Tokens: the context and the continuation are encoded separately, after trailing whitespace of the
context moves to the front of the continuation (as the harness does); with byte-level BPE and the
GPT-2 or cl100k patterns this gives the ids of encoding the whole text, since a space following a
non-space always starts a new pre-token. An empty context is replaced by `<|endoftext|>`. When context
plus continuation outgrow the block size, the context is cut from the left.

File layouts (JSON Lines, one question a line; `format="auto"` tells them apart by their fields):

    generic    {"context": "...", "choices": ["...", ...], "label": 0}   optional "id", "delimiter"
    hellaswag  {"activity_label", "ctx_a", "ctx_b", "endings": [4], "label"} (rowanz/hellaswag and the
               Hugging Face copy); the harness's cleanup: "[title]" becomes ". ", other [tags] go
    arc        {"question": "...", "choices": {"text": [...], "label": ["A", ...]}, "answerKey": "A"}
               (Hugging Face) or {"question": {"stem", "choices": [{"text", "label"}]}, "answerKey"} (AI2)
    piqa       {"goal", "sol1", "sol2", "label"} (Hugging Face), or the original files: the labels
               one per line in `<name>-labels.lst` beside `<name>.jsonl`

ARC and PIQA prompts are the harness's: "Question: <question>\\nAnswer:"; HellaSwag's is
"<activity label>: <ctx_a> <Ctx_b>". A question without an answer (HellaSwag's test split) is an
error naming the file and line, not a silent zero.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from minillm.model import IGNORE_INDEX
from minillm.progress import Progress
from minillm.scoring import sample_indices, target_logprobs


class BenchmarkError(ValueError):
    """A benchmark file that cannot be read: the message names the file and line."""


@dataclass
class MultipleChoiceConfig:
    """What `eval.py mc` scores, and how."""

    data: tuple[str, ...] = ()  # benchmark JSONL files (comma separated); one result each
    format: str = "auto"  # generic, hellaswag, arc, piqa, or auto (told apart by the first line's fields)
    batch_size: int = 16  # (context, choice) sequences per forward pass
    max_docs: int | None = None  # score a random sample of this many questions of each file; None = all
    seed: int = 0  # which random sample --max_docs takes
    predictions: str | None = None  # write each question's log-likelihoods and predictions here (JSONL)

    def __post_init__(self) -> None:
        self.data = tuple(self.data)
        if self.format not in ("auto", *READERS):
            raise ValueError(f"MultipleChoiceConfig.format must be auto or one of {', '.join(READERS)}, got {self.format!r}")
        if self.batch_size < 1:
            raise ValueError(f"MultipleChoiceConfig.batch_size must be positive, got {self.batch_size!r}")
        if self.max_docs is not None and self.max_docs < 1:
            raise ValueError(f"MultipleChoiceConfig.max_docs must be a positive integer or None, got {self.max_docs!r}")


@dataclass
class Question:
    context: str
    choices: list[str]
    label: int  # index of the right choice
    id: str = ""
    delimiter: str = " "  # put between the context and each choice


# ---- readers: one JSON object -> one Question ----


def _generic(row: dict) -> Question:
    return Question(row["context"], list(row["choices"]), int(row["label"]), str(row.get("id", "")),
                    row.get("delimiter", " "))


def _hellaswag_clean(text: str) -> str:
    """The harness's cleanup of WikiHow-sourced HellaSwag text."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(row: dict) -> Question:
    if row.get("label") in (None, ""):
        raise KeyError("label (HellaSwag's test split has no answers: use the validation file)")
    context = _hellaswag_clean(f"{row['activity_label']}: {row['ctx_a']} {row['ctx_b'].capitalize()}")
    return Question(context, [_hellaswag_clean(e) for e in row["endings"]], int(row["label"]), str(row.get("ind", "")))


def _arc(row: dict) -> Question:
    question = row["question"]
    if isinstance(question, dict):  # AI2's own layout
        texts = [c["text"] for c in question["choices"]]
        labels = [c["label"] for c in question["choices"]]
        question = question["stem"]
    else:
        texts, labels = list(row["choices"]["text"]), list(row["choices"]["label"])
    answer = row["answerKey"]
    if answer not in labels:
        raise KeyError(f"answerKey {answer!r} is not one of the choice labels {labels}")
    return Question(f"Question: {question}\nAnswer:", texts, labels.index(answer), str(row.get("id", "")))


def _piqa(row: dict) -> Question:
    return Question(f"Question: {row['goal']}\nAnswer:", [row["sol1"], row["sol2"]], int(row["label"]), str(row.get("id", "")))


READERS: dict[str, Callable[[dict], Question]] = {"generic": _generic, "hellaswag": _hellaswag, "arc": _arc, "piqa": _piqa}


def detect_format(row: dict) -> str | None:
    if "context" in row and "choices" in row:
        return "generic"
    if "ctx_a" in row and "endings" in row:
        return "hellaswag"
    if "answerKey" in row and "question" in row:
        return "arc"
    if "goal" in row and "sol1" in row:
        return "piqa"
    return None


def read_questions(path: str | os.PathLike, format: str = "auto") -> tuple[list[Question], str]:
    """The questions of a benchmark file and the format they were read in."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise BenchmarkError(f"{path}: cannot read it ({err})") from None
    rows = []
    for number, line in enumerate(lines, start=1):
        if line.strip():
            try:
                rows.append((number, json.loads(line)))
            except json.JSONDecodeError as err:
                raise BenchmarkError(f"{path}:{number}: not valid JSON ({err.msg})") from None
    if not rows:
        raise BenchmarkError(f"{path}: no questions in it")
    if format == "auto":
        format = detect_format(rows[0][1]) if isinstance(rows[0][1], dict) else None
        if format is None:
            raise BenchmarkError(f"{path}:{rows[0][0]}: cannot tell the format from its fields; expected "
                                 "context/choices/label, or HellaSwag, ARC or PIQA fields (or set --format)")
    if format == "piqa" and "label" not in rows[0][1]:
        rows = _attach_piqa_labels(path, rows)
    questions = []
    for number, row in rows:
        try:
            q = READERS[format](row)
            if not q.choices or not all(isinstance(c, str) for c in q.choices) or not isinstance(q.context, str):
                raise TypeError("the context and every choice must be strings, and there must be choices")
            if not 0 <= q.label < len(q.choices):
                raise ValueError(f"label {q.label} is not the index of one of its {len(q.choices)} choices")
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            what = f"missing field {err}" if isinstance(err, KeyError) else str(err)
            raise BenchmarkError(f"{path}:{number}: not a {format} question: {what}") from None
        q.id = q.id or f"{path.name}:{number}"
        questions.append(q)
    return questions, format


def _attach_piqa_labels(path: Path, rows: list) -> list:
    labels_path = path.with_name(f"{path.stem}-labels.lst")
    if not labels_path.is_file():
        raise BenchmarkError(f"{path}: PIQA rows without a label field need their labels in {labels_path}")
    labels = labels_path.read_text().split()
    if len(labels) != len(rows):
        raise BenchmarkError(f"{labels_path} has {len(labels)} labels for the {len(rows)} questions of {path}")
    return [(number, {**row, "label": int(label)}) for (number, row), label in zip(rows, labels)]


# ---- scoring ----


def encode_request(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as the harness splits them (see the module docstring)."""
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    context_ids = tokenizer.encode_ordinary(stripped) if stripped else []
    if not context_ids:
        if tokenizer.eot_id is None:
            raise ValueError("an empty context needs <|endoftext|> to start from, and this tokenizer has none")
        context_ids = [tokenizer.eot_id]
    return context_ids, tokenizer.encode_ordinary(continuation)


def continuation_logprobs(model, requests: Sequence[tuple[list[int], list[int]]], *, batch_size: int = 16,
                          dtype: torch.dtype = torch.float32, progress: Progress | None = None) -> list[float]:
    """Sum of log p(continuation tokens | context) for each (context ids, continuation ids), batched:
    the longest sequences first, right-padded, only the continuation's targets scored."""
    block = model.config.block_size
    device = next(model.parameters()).device
    results = [0.0] * len(requests)
    order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][0]) + len(requests[i][1])))
    for begin in range(0, len(order), batch_size):
        chunk = order[begin : begin + batch_size]
        seqs, cont_lengths = [], []
        for i in chunk:
            context, continuation = requests[i]
            if not continuation:
                raise ValueError(f"request {i}: the continuation has no tokens")
            if len(continuation) > block:
                raise ValueError(f"request {i}: a continuation of {len(continuation)} tokens does not fit the block size {block}")
            seqs.append((list(context) + list(continuation))[-(block + 1):])  # cut the context from the left
            cont_lengths.append(len(continuation))
        width = max(len(s) for s in seqs) - 1
        x = torch.zeros((len(seqs), width), dtype=torch.long)
        y = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long)
        for row, (seq, n) in enumerate(zip(seqs, cont_lengths)):
            x[row, : len(seq) - 1] = torch.tensor(seq[:-1])
            y[row, len(seq) - 1 - n : len(seq) - 1] = torch.tensor(seq[-n:])  # the continuation's targets
        logprobs = target_logprobs(model, x.to(device), y.to(device), dtype).double().sum(dim=1).tolist()
        for i, value in zip(chunk, logprobs):
            results[i] = value
        if progress is not None:
            progress.update(len(chunk), tokens=sum(len(s) - 1 for s in seqs))
    return results


@dataclass
class MultipleChoiceResult:
    source: str
    format: str
    acc: float
    acc_norm: float
    acc_stderr: float
    acc_norm_stderr: float
    questions: int
    seconds: float
    tokens: int  # tokens read by the model (context and continuations)
    per_question: list[dict] = field(default_factory=list)

    def line(self) -> str:
        def err(value: float) -> str:  # one question has no spread to estimate
            return "n/a" if math.isnan(value) else f"{value:.4f}"

        return (f"acc {self.acc:.4f} ± {err(self.acc_stderr)} | acc_norm {self.acc_norm:.4f} ± {err(self.acc_norm_stderr)} | "
                f"{self.questions:,} questions | {self.tokens / max(self.seconds, 1e-9):,.0f} tok/s")

    def to_dict(self) -> dict:
        """The summary for JSON: an undefined standard error (one question) is null, not NaN."""
        values = {k: getattr(self, k) for k in ("source", "format", "acc", "acc_stderr", "acc_norm", "acc_norm_stderr",
                                                 "questions", "seconds", "tokens")}
        return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in values.items()}


def mean_stderr(values: Sequence[float]) -> float:
    """Standard error of the mean: sample standard deviation / sqrt(n) (the harness's)."""
    n = len(values)
    return float(np.std(values, ddof=1) / math.sqrt(n)) if n > 1 else math.nan


def score_questions(model, tokenizer, questions: Sequence[Question], *, batch_size: int = 16,
                    dtype: torch.dtype = torch.float32, source: str = "", format: str = "",
                    progress: bool = True) -> MultipleChoiceResult:
    """acc and acc_norm of `model` on `questions` (see the module docstring)."""
    requests, owners = [], []
    for q_index, q in enumerate(questions):
        for choice in q.choices:
            requests.append(encode_request(tokenizer, q.context, q.delimiter + choice))
            owners.append(q_index)
    began = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        with Progress(len(requests), desc=f"mc {source}", unit="choices", enabled=progress) as bar:
            lls = continuation_logprobs(model, requests, batch_size=batch_size, dtype=dtype, progress=bar)
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - began
    per_question, hits, hits_norm, at = [], [], [], 0
    for q in questions:
        ll = np.array(lls[at : at + len(q.choices)])
        at += len(q.choices)
        lengths = np.array([max(len(c), 1) for c in q.choices], dtype=np.float64)
        pred, pred_norm = int(np.argmax(ll)), int(np.argmax(ll / lengths))
        hits.append(float(pred == q.label))
        hits_norm.append(float(pred_norm == q.label))
        per_question.append({"id": q.id, "label": q.label, "pred": pred, "pred_norm": pred_norm,
                             "logprobs": ll.tolist(), "choice_chars": lengths.astype(int).tolist()})
    tokens = sum(len(c) + len(t) for c, t in requests)
    return MultipleChoiceResult(source, format, float(np.mean(hits)), float(np.mean(hits_norm)), mean_stderr(hits),
                                mean_stderr(hits_norm), len(questions), seconds, tokens, per_question)


def evaluate_multiple_choice(model, tokenizer, path: str | os.PathLike, config: MultipleChoiceConfig | None = None, *,
                             dtype: torch.dtype = torch.float32, progress: bool = True) -> MultipleChoiceResult:
    """Read a benchmark file (a --max_docs sample of it, if asked) and score it."""
    config = config or MultipleChoiceConfig()
    if tokenizer is None:
        raise ValueError("multiple-choice scoring needs a tokenizer (the checkpoint has none; pass --tokenizer)")
    questions, format = read_questions(path, config.format)
    total = len(questions)
    source = str(path)
    keep = sample_indices(total, config.max_docs, config.seed)
    if keep is not None:
        questions = [questions[i] for i in keep]
        source = f"{path} ({len(questions)} of {total} questions)"
    return score_questions(model, tokenizer, questions, batch_size=config.batch_size, dtype=dtype, source=source,
                           format=format, progress=progress)
