"""Generation metrics: the model writes an answer to each prompt (through `minillm.generate`, the one
generation function) and the answers are scored against references with corpus BLEU and ROUGE-L
(`minillm.metrics`).

Input: a JSONL file, or a JSON file holding an array, of examples in either layout:

    {"prompt": "Translate to French: cheese", "reference": "fromage"}     reference: a string or a list
    {"instruction": "...", "input": "...", "output": "..."}              Alpaca / instruction-data.json

Instruction examples are rendered with the model's prompt template (the one an instruction-finetuned
checkpoint stored, else Alpaca's, `minillm.prompts`), and generation stops at the template's next
header. Decoding is greedy by default (temperature 0), so the scores describe the model rather than
one roll of the dice; the generated text is stripped of surrounding whitespace before scoring.

Scores: corpus BLEU (sacrebleu's defaults: 13a tokens, exp smoothing, brevity penalty) over all
answers, and the mean ROUGE-L precision/recall/F over the examples (with several references, an
example's best F counts). `predictions=` writes each prompt, reference and answer to a JSONL file.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from minillm.generate import SamplingConfig, generate
from minillm.metrics import RougeScore, corpus_bleu, rouge_l
from minillm.progress import Progress
from minillm.prompts import PromptTemplate
from minillm.scoring import sample_indices


class GenerationDataError(ValueError):
    """An example file that cannot be read: the message names the file and example."""


@dataclass
class GenerationEvalConfig:
    """What `eval.py gen` asks the model, and how it decodes."""

    data: tuple[str, ...] = ()  # JSONL or JSON-array files of prompt/reference or instruction/input/output examples (comma separated)
    max_new_tokens: int = 128  # longest answer generated
    temperature: float = 0.0  # 0 = greedy; above 0 samples (with --top_k and --seed)
    top_k: int | None = 50  # when sampling: only the k most likely tokens
    seed: int = 0  # sampling seed, and which random sample --max_docs takes
    batch_size: int = 8  # prompts generated together
    max_docs: int | None = None  # score a random sample of this many examples of each file; None = all
    predictions: str | None = None  # write every prompt, reference and answer here (JSONL)

    def __post_init__(self) -> None:
        self.data = tuple(self.data)
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError("GenerationEvalConfig.batch_size and max_new_tokens must be positive")
        if self.max_docs is not None and self.max_docs < 1:
            raise ValueError(f"GenerationEvalConfig.max_docs must be a positive integer or None, got {self.max_docs!r}")


@dataclass
class Example:
    prompt: str
    references: list[str]
    id: str


def read_examples(path: str | os.PathLike, template: PromptTemplate | None = None) -> list[Example]:
    """The examples of a JSONL or JSON-array file (see the module docstring)."""
    path = Path(path)
    template = template or PromptTemplate()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise GenerationDataError(f"{path}: cannot read it ({err})") from None
    if text.lstrip().startswith("["):
        try:
            rows = [(f"{path}[{i}]", row) for i, row in enumerate(json.loads(text))]
        except json.JSONDecodeError as err:
            raise GenerationDataError(f"{path}: not valid JSON (line {err.lineno}: {err.msg})") from None
    else:
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append((f"{path}:{number}", json.loads(line)))
                except json.JSONDecodeError as err:
                    raise GenerationDataError(f"{path}:{number}: not valid JSON ({err.msg})") from None
    examples = []
    for where, row in rows:
        if isinstance(row, dict) and "prompt" in row and "reference" in row:
            prompt, refs = row["prompt"], row["reference"]
        elif isinstance(row, dict) and "instruction" in row and "output" in row:
            prompt, refs = template.render(row["instruction"], row.get("input") or ""), row["output"]
        else:
            raise GenerationDataError(f"{where}: needs prompt and reference, or instruction (input) and output")
        refs = [refs] if isinstance(refs, str) else refs
        if not isinstance(prompt, str) or not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
            raise GenerationDataError(f"{where}: the prompt must be a string and the reference a string or a list of them")
        examples.append(Example(prompt, refs, where))
    if not examples:
        raise GenerationDataError(f"{path}: no examples in it")
    return examples


@dataclass
class GenerationResult:
    source: str
    bleu: float
    bleu_detail: str  # sacrebleu-style summary: precisions, brevity penalty, lengths
    rouge_l: RougeScore
    examples: int
    generated_tokens: int
    seconds: float
    outputs: list[dict] = field(default_factory=list)  # id, prompt, references, prediction

    def line(self) -> str:
        r = self.rouge_l
        return (f"BLEU {self.bleu:.2f} | ROUGE-L F {r.fmeasure:.4f} (P {r.precision:.4f}, R {r.recall:.4f}) | "
                f"{self.examples:,} examples | {self.generated_tokens / max(self.seconds, 1e-9):,.1f} generated tok/s")

    def to_dict(self) -> dict:
        return {"source": self.source, "bleu": self.bleu, "bleu_detail": self.bleu_detail,
                "rouge_l": vars(self.rouge_l), "examples": self.examples,
                "generated_tokens": self.generated_tokens, "seconds": self.seconds}


def evaluate_generation(model, tokenizer, path: str | os.PathLike, config: GenerationEvalConfig | None = None, *,
                        template: PromptTemplate | None = None, progress: bool = True) -> GenerationResult:
    """Generate an answer to every example of `path` and score the answers (see the module docstring)."""
    config = config or GenerationEvalConfig()
    if tokenizer is None:
        raise ValueError("generation metrics need a tokenizer (the checkpoint has none; pass --tokenizer)")
    template = template or PromptTemplate()
    examples = read_examples(path, template)
    total, source = len(examples), str(path)
    keep = sample_indices(total, config.max_docs, config.seed)
    if keep is not None:
        examples = [examples[i] for i in keep]
        source = f"{path} ({len(examples)} of {total} examples)"
    sampling = SamplingConfig(max_new_tokens=config.max_new_tokens, temperature=config.temperature, top_k=config.top_k,
                              seed=config.seed, stop=template.stop_strings())
    outputs, tokens = [], 0
    began = time.perf_counter()
    with Progress(len(examples), desc=f"generate {source}", unit="examples", enabled=progress) as bar:
        for start in range(0, len(examples), config.batch_size):
            batch = examples[start : start + config.batch_size]
            # subtle: seed + start keeps each example's draws the same whatever the batch size
            completions = generate(model, [e.prompt for e in batch], replace(sampling, seed=config.seed + start),
                                   tokenizer=tokenizer)
            for example, completion in zip(batch, completions):
                tokens += len(completion.tokens)
                outputs.append({"id": example.id, "prompt": example.prompt, "references": example.references,
                                "prediction": completion.text.strip()})
            bar.update(len(batch), tokens=sum(len(c.tokens) for c in completions))
    seconds = time.perf_counter() - began
    predictions = [o["prediction"] for o in outputs]
    bleu = corpus_bleu(predictions, [o["references"] for o in outputs])
    best = [max((rouge_l(o["prediction"], r) for r in o["references"]), key=lambda s: s.fmeasure) for o in outputs]
    n = len(best)
    rouge = RougeScore(sum(s.precision for s in best) / n, sum(s.recall for s in best) / n, sum(s.fmeasure for s in best) / n)
    for output, score in zip(outputs, best):
        output["rouge_l_f"] = score.fmeasure
    return GenerationResult(source, bleu.score, str(bleu), rouge, n, tokens, seconds, outputs)
