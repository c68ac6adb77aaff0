"""Instruction finetuning: teach a pretrained GPT to answer Alpaca-style records
({"instruction", "input", "output"}) through the shared training loop, then write and score its
answers to held-out records.

One example, token by token (`encode_record`, `collate`):

    text     = template.render(instruction, input)  +  output  +  <|endoftext|>
               \\________ prompt (masked) ________/    \\____ response (learned) ____/
    inputs   x = ids[:-1]                     right-padded with <|endoftext|> to the batch's longest
    targets  y = ids[1:], with every target that is a prompt token, and all padding, set to
             IGNORE_INDEX (-100): the loss is the next-token loss on the response and its
             end-of-text token only, so the model learns to answer and then to stop.

Prompt and response are tokenized separately and joined, so the boundary between them is a token
boundary whatever the tokenizer would merge across it, and a prompt rendered at inference time
tokenizes exactly as in training. The template (`minillm.prompts.PromptTemplate`, Alpaca's by
default; every piece settable, e.g. `--response_header`) is stored in each checkpoint's
minillm.json, where sample.py, eval.py and the server read it back.

Splits: in file order, train first, then test, then val (`--test_fraction 0.1 --val_fraction 0.05`:
the book's 935/110/55 of the 1,100 shared records). After training, the model answers every test
record (greedy, through `minillm.generate` via `minillm.generation_eval`), and the answers are
written beside their references (`responses.json`) and scored with ROUGE-L and BLEU
(`minillm.metrics`; `scores.json`), so two runs compare; `--score_base` first does the same with the
model before finetuning (`responses_base.json`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from minillm import cli
from minillm.checkpoint import LORA_KEY
from minillm.finetuning import ExampleBatches, FinetuneConfig, TrainableSchedule, finetune_start
from minillm.lora import ADAPTERS_FILE, LoRAConfig, save_adapters
from minillm.model import IGNORE_INDEX
from minillm.prompts import META_KEY, PromptTemplate

RESPONSES_FILE, BASE_RESPONSES_FILE, SCORES_FILE = "responses.json", "responses_base.json", "scores.json"


@dataclass
class InstructConfig:
    """The instruction records, how they are split and cut, and how the answers are scored."""

    data: Path = Path("../shared/data/instruction-data.json")  # JSON array or JSONL of {instruction, input, output}
    test_fraction: float = 0.1  # split in file order: train first, then this share as test, then val
    val_fraction: float = 0.05  # the last records: the val split (its loss is what training tracks)
    max_length: int = 0  # tokens per example (prompt + response + end of text), longer ones cut; 0: the block size
    max_new_tokens: int = 256  # the longest answer generated for a test record
    response_batch: int = 8  # test prompts answered together
    test_limit: int = 0  # answer and score only the first N test records (0: all)
    score_base: bool = False  # also answer the test records with the model before finetuning (ROUGE-L before/after)
    progress: bool = True  # progress bars on stderr while generating

    def __post_init__(self) -> None:
        self.data = Path(self.data)
        for name in ("test_fraction", "val_fraction"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"InstructConfig.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.test_fraction + self.val_fraction >= 1.0:
            raise ValueError("InstructConfig.test_fraction + val_fraction must leave records for train")
        if self.max_length < 0 or self.test_limit < 0 or self.max_new_tokens < 1 or self.response_batch < 1:
            raise ValueError("InstructConfig: max_length and test_limit must be >= 0, max_new_tokens and "
                             "response_batch >= 1")


def read_records(path: str | Path) -> list[dict[str, str]]:
    """The records of a JSON array or JSONL file; a bad one is an error naming its place and field."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: cannot read it ({err})") from None
    try:
        if text.lstrip().startswith("["):
            rows = [(f"{path}[{i}]", row) for i, row in enumerate(json.loads(text))]
        else:
            rows = [(f"{path}:{n}", json.loads(line)) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON (line {err.lineno}: {err.msg})") from None
    records = []
    for where, row in rows:
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected an object with instruction, input and output")
        for name in ("instruction", "output"):
            if not isinstance(row.get(name), str):
                raise ValueError(f"{where}: field {name!r} is missing or not a string (fields: {', '.join(row)})")
        if not isinstance(row.get("input", ""), str):
            raise ValueError(f"{where}: field 'input' must be a string")
        records.append({"instruction": row["instruction"], "input": row.get("input", ""), "output": row["output"]})
    if not records:
        raise ValueError(f"{path}: no records in it")
    return records


def split_records(records: list, test_fraction: float, val_fraction: float) -> dict[str, list]:
    """train, test, val in file order (the book's split: 85% / 10% / 5% by default)."""
    n_train = int(len(records) * (1 - test_fraction - val_fraction))
    n_test = int(len(records) * test_fraction)
    return {"train": records[:n_train], "test": records[n_train : n_train + n_test],
            "val": records[n_train + n_test :]}


def encode_record(tokenizer, template: PromptTemplate, record: dict[str, str], max_length: int) -> tuple[list[int], int] | None:
    """(ids of prompt + response + EOT, at most max_length + 1 of them; the prompt's token count),
    or None when the prompt alone fills max_length (no response token would be learned)."""
    prompt = template.render(record["instruction"], record["input"])
    prompt_ids = tokenizer.encode_ordinary(prompt)
    ids = prompt_ids + tokenizer.encode_ordinary(record["output"]) + [tokenizer.eot_id]
    if len(prompt_ids) >= max_length:
        return None
    return ids[: max_length + 1], len(prompt_ids)


def collate(examples: list[tuple[list[int], int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, prompt length) pairs -> inputs x (B, T) and targets y (B, T): y is x shifted by one,
    with prompt targets and padding set to IGNORE_INDEX (see the module docstring)."""
    width = max(len(ids) - 1 for ids, _ in examples)
    x = torch.full((len(examples), width), pad_id, dtype=torch.long)
    y = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, prompt_len) in enumerate(examples):
        ids = torch.tensor(ids, dtype=torch.long)
        n = len(ids) - 1
        x[row, :n] = ids[:-1]
        y[row, :n] = ids[1:]
        y[row, : prompt_len - 1] = IGNORE_INDEX  # targets that are prompt tokens are not learned
    return x, y


def instruct_evaluator(examples: list[tuple[list[int], int]], batch_size: int, pad_id: int):
    """An `evaluate(model)` for the trainer: the mean loss over every response token of `examples`."""
    batches = [collate(examples[i : i + batch_size], pad_id) for i in range(0, len(examples), batch_size)]

    def evaluate(model: nn.Module) -> dict[str, float]:
        device = next(model.parameters()).device
        total, count = 0.0, 0
        for x, y in batches:
            scored = int((y != IGNORE_INDEX).sum())
            _, loss = model(x.to(device), y.to(device))
            total, count = total + float(loss) * scored, count + scored
        mean = total / count
        return {"val_loss": mean, "val_ppl": float(torch.tensor(min(mean, 50.0)).exp())}

    return evaluate


def respond(model, tokenizer, template: PromptTemplate, records: list[dict], out_path: Path, ic: InstructConfig) -> dict[str, Any]:
    """Answer every record greedily, write the answers beside the references to `out_path` (JSON),
    and return the scores (ROUGE-L precision/recall/F, BLEU) from the evaluation code."""
    from minillm.generation_eval import GenerationEvalConfig, evaluate_generation

    # the evaluation code reads examples from a file: the held-out records, as given
    records_path = out_path.with_name(out_path.stem + ".records.json")
    records_path.write_text(json.dumps(records, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    config = GenerationEvalConfig(max_new_tokens=ic.max_new_tokens, temperature=0.0, batch_size=ic.response_batch)
    result = evaluate_generation(model, tokenizer, records_path, config, template=template, progress=ic.progress)
    records_path.unlink()
    answers = [{**record, "model_response": o["prediction"], "rouge_l": o["rouge_l_f"]}
               for record, o in zip(records, result.outputs)]
    out_path.write_text(json.dumps(answers, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return {"rouge_l": vars(result.rouge_l), "bleu": result.bleu, "records": result.examples,
            "generated_tokens": result.generated_tokens, "seconds": result.seconds, "responses": str(out_path)}


def finetune_instruct(ft: FinetuneConfig, ic: InstructConfig, template: PromptTemplate, lora: LoRAConfig,
                      train_config, print_fn=print) -> dict[str, Any]:
    """The whole `finetune.py instruct` job; returns the scores written to scores.json."""
    from minillm.tokenizer import TOKENIZER_FILE
    from minillm.trainer import claim_out_dir, train

    with finetune_start(ft, train_config, print_fn) as start:
        dist, base, say = start.dist, start.base, start.say
        model, tokenizer = base.model, base.tokenizer
        if tokenizer.eot_id is None:
            raise ValueError(f"{base.source}: the tokenizer has no <|endoftext|> token to end each response with")
        max_length = min(ic.max_length or model.config.block_size, model.config.block_size)
        splits = split_records(read_records(ic.data), ic.test_fraction, ic.val_fraction)
        encoded, dropped = {}, {}
        for split in ("train", "val"):
            pairs = [encode_record(tokenizer, template, r, max_length) for r in splits[split]]
            encoded[split] = [p for p in pairs if p is not None]
            dropped[split] = len(pairs) - len(encoded[split])
        if not encoded["train"]:
            raise ValueError(f"{ic.data}: none of the {len(splits['train'])} train records fits: every prompt is at least "
                             f"{max_length} tokens (--max_length, at most the block size {model.config.block_size})")
        say(cli.format_config(ft, ic, template, *([lora] if ft.trainable == "lora" else []), train_config))
        say(f"base: {base.source}\nrecords from {ic.data}: train {len(splits['train']):,} | val {len(splits['val']):,} | "
            f"test {len(splits['test']):,} (file order); examples up to {max_length} tokens, "
            f"{sum(ids[-1] != tokenizer.eot_id for ids, _ in encoded['train']):,} train examples cut"  # only a cut one lacks its EOT
            + "".join(f"; {n} {s} records dropped (prompt longer than {max_length} tokens)" for s, n in dropped.items() if n))
        test = splits["test"][: ic.test_limit] if ic.test_limit else splits["test"]
        scores: dict[str, Any] = {}
        out_dir = train_config.out_dir
        if ic.score_base and test and dist.is_main and not train_config.resume:
            claim_out_dir(out_dir, train_config)  # before spending time on answers: --resume/--overwrite rules
            scores["base"] = respond(model, tokenizer, template, test, out_dir / BASE_RESPONSES_FILE, ic)
            say(f"before finetuning: ROUGE-L F {scores['base']['rouge_l']['fmeasure']:.4f} | BLEU {scores['base']['bleu']:.2f} "
                f"| {len(test)} test records -> {out_dir / BASE_RESPONSES_FILE}")
        # an untied lm_head is the task head for head/last/all; under LoRA it stays frozen like every
        # pretrained weight (lora_head is for a new classifier head, which has nothing to start from)
        head = [] if model.config.tie_embeddings or ft.trainable == "lora" else [model.lm_head.weight]
        schedule = TrainableSchedule(model, ft, head, lora if ft.trainable == "lora" else None)
        schedule.prepare()
        say(schedule.describe())
        pad_id = tokenizer.eot_id
        configs: dict[str, Any] = {"finetune": ft, "instruct": ic, META_KEY: template}
        writers = {TOKENIZER_FILE: tokenizer.save}
        if ft.trainable == "lora":
            configs[LORA_KEY] = lora
            writers[ADAPTERS_FILE] = lambda path: save_adapters(model, lora, path, base=ft.init_from)
        result = train(
            model, train_config,
            ExampleBatches(encoded["train"], train_config.batch_size, lambda b: collate(b, pad_id),
                           seed=train_config.seed, dist=dist),
            dist=dist,
            evaluate=instruct_evaluator(encoded["val"], train_config.batch_size, pad_id) if encoded["val"] else None,
            flops_per_token=model.flops_per_token(max_length), checkpoint_configs=configs, checkpoint_writers=writers,
            on_step=schedule if ft.unfreeze_every else None, print_fn=print_fn,
        )
        scores |= {"checkpoint": str(result.checkpoint), "steps": result.steps}
        if dist.is_main:
            if test:
                scores |= respond(model, tokenizer, template, test, out_dir / RESPONSES_FILE, ic)
                before = (f" (before finetuning {scores['base']['rouge_l']['fmeasure']:.4f})" if "base" in scores else "")
                say(f"after finetuning: ROUGE-L F {scores['rouge_l']['fmeasure']:.4f}{before} | BLEU {scores['bleu']:.2f} | "
                    f"{len(test)} test records -> {out_dir / RESPONSES_FILE}")
            (out_dir / SCORES_FILE).write_text(json.dumps(scores, indent=2) + "\n", encoding="utf-8")
            say(f"scores: {out_dir / SCORES_FILE}\ncheckpoint: {result.checkpoint}\n"
                f"chat: python sample.py --ckpt {out_dir} --interactive")
        return scores
