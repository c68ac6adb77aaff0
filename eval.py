"""Evaluate a model: perplexity and bits per byte, multiple-choice benchmarks, generation metrics, and
the report card of a training run.

    python eval.py ppl --model runs/demo --data data/demo/test.bin              # a prepared split
    python eval.py ppl --model runs/demo --data notes.txt,essays/ --per_document  # any text, files or folders
    python eval.py ppl --model runs/demo --data big.jsonl --max_docs 1000 --stride 64
    python eval.py mc --model runs/demo --data hellaswag_val.jsonl --max_docs 500 --predictions preds.jsonl
    python eval.py gen --model runs/instruct --data ../shared/data/instruction-data.json --max_docs 50
    python eval.py report runs/demo                                             # writes runs/demo/report.md
    python eval.py report runs/a runs/b --texts notes.txt --out compare.md      # two runs side by side
    python eval.py ppl --help                                                   # every option of a command

--model is a minillm checkpoint, a run folder (its newest checkpoint) or a Hugging Face GPT-2 folder.
Each command prints its resolved settings, progress on stderr, then one result line per input;
--json writes every number (per document, per question) to a file as well. What each command
measures is specified in the docstrings of minillm/perplexity.py, multiple_choice.py,
generation_eval.py and report_card.py.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass

from minillm import cli
from minillm.generation_eval import GenerationDataError, GenerationEvalConfig, evaluate_generation
from minillm.multiple_choice import BenchmarkError, MultipleChoiceConfig, evaluate_multiple_choice
from minillm.perplexity import PerplexityConfig, evaluate_perplexity
from minillm.report_card import ReportConfig, build_card, write_report
from minillm.scoring import DTYPES, resolve_device, resolve_dtype
from minillm.token_stream import EvalDataError

COMMANDS = {"ppl": PerplexityConfig, "mc": MultipleChoiceConfig, "gen": GenerationEvalConfig, "report": ReportConfig}


@dataclass
class EvalConfig:
    """The model to evaluate and where it runs (every command)."""

    model: str = ""  # a minillm checkpoint or run folder, or a Hugging Face GPT-2 folder (report: the runs instead)
    tokenizer: str = ""  # a tokenizer file or folder to use instead of the model's own
    device: str = "auto"  # cpu, cuda, cuda:1, ... or auto (cuda when there is one)
    dtype: str = "auto"  # float32, bfloat16, float16 (autocast), or auto (bfloat16 on a GPU that has it, else float32)
    impl: str = "auto"  # attention/layernorm path: auto, torch or triton
    json: str = ""  # also write all results (per document and question) to this JSON file
    progress: bool = True  # progress lines on stderr

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", *DTYPES):
            raise ValueError(f"EvalConfig.dtype must be auto or one of {', '.join(DTYPES)}, got {self.dtype!r}")


def load(cfg: EvalConfig, path: str):
    """(Pretrained model + tokenizer + template, device, dtype) through the shared loader."""
    from minillm.hf import load_pretrained
    from minillm.tokenizer import open_tokenizer

    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    pretrained = load_pretrained(path, device, impl=cfg.impl)
    if cfg.tokenizer:
        pretrained.tokenizer = open_tokenizer(cfg.tokenizer)
    model = pretrained.model
    print(f"model: {pretrained.source} | {model.num_params():,} parameters | block {model.config.block_size} | "
          f"{device} {str(dtype).removeprefix('torch.')}" + ("" if pretrained.tokenizer else " | no tokenizer"), flush=True)
    return pretrained, device, dtype


def run_ppl(cfg: EvalConfig, task: PerplexityConfig) -> list[dict]:
    pretrained, _, dtype = load(cfg, cfg.model)
    results = []
    for path in task.data:
        result = evaluate_perplexity(pretrained.model, pretrained.tokenizer, path, task, dtype=dtype, progress=cfg.progress)
        print(f"{result.source}: {result.total.line()} | {result.num_documents:,} documents | "
              f"{result.windows:,} windows of {result.block_size} (stride {result.stride}) | "
              f"{result.tokens_per_second:,.0f} tok/s", flush=True)
        if task.per_document:
            width = max(len(d.name) for d in result.documents)
            for doc in result.documents:
                print(f"  {doc.name:<{width}}  {doc.line() if doc.tokens else 'no tokens'}")
        results.append(result.to_dict())
    return results


def run_mc(cfg: EvalConfig, task: MultipleChoiceConfig) -> list[dict]:
    pretrained, _, dtype = load(cfg, cfg.model)
    results, predictions = [], []
    for path in task.data:
        result = evaluate_multiple_choice(pretrained.model, pretrained.tokenizer, path, task, dtype=dtype, progress=cfg.progress)
        print(f"{result.source} ({result.format}): {result.line()}", flush=True)
        predictions += [{"file": str(path), **q} for q in result.per_question]
        results.append({**result.to_dict(), "per_question": result.per_question})
    if task.predictions:
        write_jsonl(task.predictions, predictions)
        print(f"predictions: {task.predictions}")
    return results


def run_gen(cfg: EvalConfig, task: GenerationEvalConfig) -> list[dict]:
    pretrained, _, _ = load(cfg, cfg.model)
    results, outputs = [], []
    for path in task.data:
        result = evaluate_generation(pretrained.model, pretrained.tokenizer, path, task, template=pretrained.template,
                                     progress=cfg.progress)
        print(f"{result.source}: {result.line()}\n  {result.bleu_detail}", flush=True)
        outputs += result.outputs
        results.append({**result.to_dict(), "outputs": result.outputs})
    if task.predictions:
        write_jsonl(task.predictions, outputs)
        print(f"predictions: {task.predictions}")
    return results


def run_report(cfg: EvalConfig, task: ReportConfig, runs: list[str], command: str) -> list[dict]:
    runs = runs or ([cfg.model] if cfg.model else [])
    if not runs:
        raise ValueError("name the run folder(s) to report on: eval.py report RUN [RUN ...]")
    cards = []
    for run in runs:
        pretrained, device, dtype = load(cfg, run)
        cards.append(build_card(run, task, model=pretrained.model, tokenizer=pretrained.tokenizer, dtype=dtype,
                                device=device, progress=cfg.progress))
    out = task.out or (f"{cards[0].run_dir}/report.md" if len(cards) == 1 else "report.md")
    path = write_report(cards, out, commands=command)
    for card in cards:
        for result in card.perplexity:
            print(f"{card.run_dir}: {result.source}: {result.total.line()}")
        for result in card.benchmarks:
            print(f"{card.run_dir}: {result.source}: {result.line()}")
    print(f"report card: {path}")
    return [{"run": str(c.run_dir), "facts": c.facts, "parameters": c.parameters,
             "perplexity": [r.to_dict() for r in c.perplexity], "benchmarks": [r.to_dict() for r in c.benchmarks],
             "samples": c.samples} for c in cards]


def json_safe(value):
    """NaN and infinity (an undefined standard error, a document without tokens) as null: strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_jsonl(path: str, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(json_safe(row), ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS:
        print(__doc__.rstrip(), file=sys.stderr)
        print(f"\neval.py: error: the first argument is the command: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    command = argv.pop(0)
    runs = []
    if command == "report":  # the run folders come first, before the options
        while argv and not argv[0].startswith("-"):
            runs.append(argv.pop(0))
    cfg, task = cli.parse_args(argv, EvalConfig(), COMMANDS[command](), prog=f"eval.py {command}",
                               description=__doc__.split("\n\n")[0])
    if command != "report" and (not cfg.model or not task.data):
        print(f"eval.py {command}: error: give --model and --data (see eval.py {command} --help)", file=sys.stderr)
        return 2
    print(cli.format_config(cfg, task), flush=True)
    try:
        if command == "ppl":
            results = run_ppl(cfg, task)
        elif command == "mc":
            results = run_mc(cfg, task)
        elif command == "gen":
            results = run_gen(cfg, task)
        else:
            results = run_report(cfg, task, runs, "python eval.py " + " ".join(["report", *runs, *argv]))
    except (EvalDataError, BenchmarkError, GenerationDataError, FileNotFoundError, ValueError) as err:
        print(f"eval.py {command}: error: {err}", file=sys.stderr)
        return 1
    if cfg.json:
        with open(cfg.json, "w", encoding="utf-8") as f:
            json.dump(json_safe({"command": command, "results": results}), f, indent=2, default=str)
        print(f"results: {cfg.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
