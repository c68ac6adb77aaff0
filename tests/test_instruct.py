"""Instruction finetuning: the template and the loss mask pinned token by token, records read and
split as documented, and the whole job: it learns to answer and stop, writes and scores its
answers, stores its template, and (with LoRA) loads merged wherever a GPT is loaded."""

import json

import pytest
import torch

from eval_fixtures import byte_tokenizer
from finetune_fixtures import instruction_records, pretrained_checkpoint, write_records
from minillm.checkpoint import load_checkpoint
from minillm.finetuning import FinetuneConfig
from minillm.generate import SamplingConfig, generate
from minillm.hf import load_pretrained
from minillm.instruct import (InstructConfig, collate, encode_record, finetune_instruct, read_records,
                              split_records)
from minillm.lora import LoRAConfig
from minillm.model import IGNORE_INDEX
from minillm.prompts import PromptTemplate
from minillm.trainer import TrainConfig

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\nRewrite in passive voice.\n\n### Input:\nCats chase mice.\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\nAdd 1 and 2.\n\n### Response:\n"
)


def test_template_and_mask_token_by_token():
    """With one token per byte (ids = byte values, <|endoftext|> = 256) the expected inputs and
    targets can be written down from the text alone."""
    tok = byte_tokenizer()
    assert tok.encode_ordinary("A\n") == [65, 10] and tok.eot_id == 256
    with_input = {"instruction": "Rewrite in passive voice.", "input": "Cats chase mice.", "output": "Mice are chased."}
    no_input = {"instruction": "Add 1 and 2.", "input": "", "output": "3"}
    a = encode_record(tok, PromptTemplate(), with_input, max_length=1000)
    b = encode_record(tok, PromptTemplate(), no_input, max_length=1000)
    assert a == (list(ALPACA_WITH_INPUT.encode()) + list(b"Mice are chased.") + [256], len(ALPACA_WITH_INPUT))
    assert b == (list(ALPACA_NO_INPUT.encode()) + [ord("3"), 256], len(ALPACA_NO_INPUT))

    x, y = collate([a, b], pad_id=256)
    n_a = len(ALPACA_WITH_INPUT) + len("Mice are chased.")  # inputs: every token but the last (EOT)
    n_b = len(ALPACA_NO_INPUT) + 1
    assert x.shape == y.shape == (2, n_a)
    assert x[0].tolist() == a[0][:-1]
    assert x[1].tolist() == b[0][:-1] + [256] * (n_a - n_b)  # right-padded with <|endoftext|>
    # targets: nothing for the prompt; the response and its end-of-text token; nothing for padding
    assert y[0].tolist() == [IGNORE_INDEX] * (len(ALPACA_WITH_INPUT) - 1) + list(b"Mice are chased.") + [256]
    assert y[1].tolist() == [IGNORE_INDEX] * (len(ALPACA_NO_INPUT) - 1) + [ord("3"), 256] + [IGNORE_INDEX] * (n_a - n_b)


def test_long_examples_are_cut_and_prompt_only_ones_dropped():
    tok = byte_tokenizer()
    record = {"instruction": "Add 1 and 2.", "input": "", "output": "three"}
    ids, prompt_len = encode_record(tok, PromptTemplate(), record, max_length=len(ALPACA_NO_INPUT) + 2)
    assert ids == list(ALPACA_NO_INPUT.encode()) + list(b"thr")  # max_length inputs + 1 target, EOT cut off
    assert encode_record(tok, PromptTemplate(), record, max_length=len(ALPACA_NO_INPUT)) is None


def test_records_are_read_checked_and_split_in_file_order(tmp_path):
    records = [{"instruction": f"i{n}", "input": "", "output": f"o{n}"} for n in range(1100)]
    splits = split_records(records, 0.1, 0.05)
    assert [len(splits[s]) for s in ("train", "test", "val")] == [935, 110, 55]  # the book's split
    assert splits["test"][0]["instruction"] == "i935" and splits["val"][-1]["instruction"] == "i1099"
    path = tmp_path / "r.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n')
    with pytest.raises(ValueError, match=r"r.jsonl:2: field 'output' is missing"):
        read_records(path)
    path.write_text('{"instruction": "a", "output": "b"}\n')
    assert read_records(path) == [{"instruction": "a", "input": "", "output": "b"}]


def run_instruct(tmp_path, base, ft, out="run", **train_overrides):
    data = write_records(tmp_path / "records.json", instruction_records(24))
    settings = dict(out_dir=tmp_path / out, max_steps=100, batch_size=8, learning_rate=1e-2, warmup_steps=5,
                    eval_every=30, checkpoint_every=60, log_every=20)
    ic = InstructConfig(data=data, test_fraction=0.25, val_fraction=0.125, max_new_tokens=12, score_base=True,
                        progress=False)
    lines = []
    scores = finetune_instruct(ft, ic, PromptTemplate(), LoRAConfig(lora_rank=4, lora_alpha=16.0),
                               TrainConfig(**{**settings, **train_overrides}), print_fn=lines.append)
    return scores, "\n".join(lines)


def test_finetune_instruct_learns_to_answer_and_stop(tmp_path):
    base, _, tokenizer = pretrained_checkpoint(tmp_path / "base", block_size=256)
    scores, log = run_instruct(tmp_path, base, FinetuneConfig(init_from=str(base), trainable="all"))
    assert "before finetuning: ROUGE-L" in log and "after finetuning: ROUGE-L" in log
    answers = json.loads((tmp_path / "run" / "responses.json").read_text())
    test = instruction_records(24)[15:21]  # file order: 15 train, then 6 test, then 3 val
    assert [{k: a[k] for k in ("instruction", "input", "output")} for a in answers] == test
    assert all(isinstance(a["model_response"], str) and 0 <= a["rouge_l"] <= 1 for a in answers)
    assert scores["rouge_l"]["fmeasure"] > scores["base"]["rouge_l"]["fmeasure"]
    assert json.loads((tmp_path / "run" / "scores.json").read_text())["bleu"] == scores["bleu"]
    # the template is stored, and read back by the one loader sampling and serving use
    ckpt = load_checkpoint(tmp_path / "run")
    assert ckpt.meta["prompt_template"] == PromptTemplate().to_dict()
    pretrained = load_pretrained(tmp_path / "run")
    assert pretrained.template == PromptTemplate()
    # a training record is answered exactly, and the answer ends at <|endoftext|>
    record = instruction_records(24)[1]
    prompt = PromptTemplate().render(record["instruction"], record["input"])
    done = generate(pretrained.model, [prompt], SamplingConfig(max_new_tokens=20, temperature=0.0), tokenizer=tokenizer)[0]
    assert (done.text, done.finish_reason) == (record["output"], "stop")


def test_lora_leaves_an_untied_pretrained_head_frozen(tmp_path):
    base, _, _ = pretrained_checkpoint(tmp_path / "base", block_size=256, tie_embeddings=False)
    _, log = run_instruct(tmp_path, base, FinetuneConfig(init_from=str(base), trainable="lora"), max_steps=2,
                          eval_every=2, checkpoint_every=2)
    assert "trainable: the LoRA adapters:" in log
    adapters = load_checkpoint(tmp_path / "run").tensors("adapters.safetensors")
    assert adapters and all("lora_" in name for name in adapters)


def test_lora_instruct_checkpoint_loads_merged_and_merge_exports(tmp_path):
    from finetune import main as finetune_main

    base, _, tokenizer = pretrained_checkpoint(tmp_path / "base", block_size=256)
    scores, log = run_instruct(tmp_path, base, FinetuneConfig(init_from=str(base), trainable="lora"), max_steps=20)
    assert "trainable: the LoRA adapters:" in log and "rouge_l" in scores
    ckpt = load_checkpoint(tmp_path / "run")
    assert (ckpt.path / "adapters.safetensors").is_file() and "lora" in ckpt.meta
    merged_in_memory = load_pretrained(tmp_path / "run").model
    assert finetune_main(["merge", "--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / "merged")]) == 0
    again = ["merge", "--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / "merged")]
    assert finetune_main(again) == 1  # its checkpoint is not replaced without --overwrite
    assert finetune_main([*again, "--overwrite"]) == 0
    assert finetune_main(["merge", "--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / "run")]) == 1
    assert (ckpt.path / "adapters.safetensors").is_file()  # the LoRA run is left whole
    exported = load_checkpoint(tmp_path / "merged")
    assert "lora" not in exported.meta and exported.meta["prompt_template"] == PromptTemplate().to_dict()
    assert not any("lora" in name for name in exported.tensors())
    idx = torch.randint(0, tokenizer.vocab_size, (2, 20))
    torch.testing.assert_close(exported.model()(idx)[0], merged_in_memory(idx)[0])
    with torch.no_grad():
        base_logits = load_checkpoint(base).model()(idx)[0]
    assert not torch.allclose(base_logits, merged_in_memory(idx)[0])  # the adapters learned something
