"""Classification finetuning: the classifier reads each text's last real token, the labelled data
is split, balanced and accounted for, what trains is what was asked (gradual unfreezing included),
and the whole job trains, scores, saves, resumes exactly and predicts."""

import json
import math

import numpy as np
import pytest
import torch

from finetune_fixtures import labelled_texts, pretrained_checkpoint, tiny_config, tiny_tokenizer, write_tsv
from minillm.checkpoint import load_checkpoint
from minillm.classify import (ClassifyConfig, GPTClassifier, collate, cut, finetune_classifier, load_classifier,
                              predict_texts)
from minillm.finetuning import ExampleBatches, FinetuneConfig, TrainableSchedule
from minillm.labelled import LabelledText, carve, downsample, load_labelled
from minillm.lora import LoRAConfig
from minillm.model import GPT
from minillm.sources import DataError, SourceConfig
from minillm.trainer import TrainConfig

SMS_LIKE = dict(format="tsv", columns=("label", "text"), label_field="label")


def classifier(num_classes=3, seed=0):
    torch.manual_seed(seed)
    return GPTClassifier.from_gpt(GPT(tiny_config(100)), num_classes).eval()


def test_reads_the_last_real_token_whatever_the_padding():
    model = classifier()
    short, long = torch.randint(0, 100, (5,)), torch.randint(0, 100, (13,))
    alone = model(short[None], torch.tensor([5]))
    idx, lengths, _ = collate([(short.numpy(), 0), (long.numpy(), 1)], pad_id=7)
    batched = model(idx, lengths)
    assert idx.shape == (2, 13) and lengths.tolist() == [5, 13] and idx[0, 5:].eq(7).all()
    torch.testing.assert_close(batched[0], alone[0], rtol=1e-5, atol=1e-6)
    # the same hidden state the GPT computes at that position, through the new head
    hidden = model.hidden_states(long[None])[0, -1]
    torch.testing.assert_close(batched[1], model.classifier(hidden), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="lengths"):
        model(idx, torch.tensor([0, 13]))


def test_classifier_replaces_the_head_and_shares_the_body():
    gpt = GPT(tiny_config(100))
    model = GPTClassifier.from_gpt(gpt, 2)
    assert model.transformer is gpt.transformer and not hasattr(model, "lm_head")
    names = set(model.state_dict())
    assert names == (set(gpt.state_dict()) - {"lm_head.weight"}) | {"classifier.weight", "classifier.bias"}


def test_cut_keeps_the_start_or_the_end():
    ids = np.arange(10)
    assert cut(ids, 4, "start").tolist() == [0, 1, 2, 3] and cut(ids, 4, "end").tolist() == [6, 7, 8, 9]
    assert cut(ids, 20, "end").tolist() == list(range(10))


@pytest.mark.parametrize("mode, last, expected_blocks", [("head", 1, 0), ("last", 1, 1), ("last", 2, 2), ("all", 1, 2)])
def test_trainable_selection(mode, last, expected_blocks):
    model = classifier()
    schedule = TrainableSchedule(model, FinetuneConfig(trainable=mode, last_blocks=last), list(model.classifier.parameters()))
    schedule.prepare()
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    blocks = {n.split(".")[2] for n in trained if n.startswith("transformer.h.")}
    assert blocks == {str(i) for i in range(2 - expected_blocks, 2)}  # counted from the top
    assert {"classifier.weight", "classifier.bias"} <= trained
    assert ("transformer.ln_f.weight" in trained) == (mode != "head")
    assert ("transformer.wte.weight" in trained) == (mode == "all")


def test_gradual_unfreezing_adds_one_group_every_n_steps():
    model = classifier()
    schedule = TrainableSchedule(model, FinetuneConfig(trainable="head", unfreeze_every=5), list(model.classifier.parameters()))
    schedule.prepare()  # the optimizer must see everything that will ever train
    assert all(p.requires_grad for p in model.parameters())
    seen = []
    for step in (0, 4, 5, 10, 15, 99):
        schedule(step)
        seen.append(sum(p.numel() for p in model.parameters() if p.requires_grad))
    assert seen[0] == seen[1] == 32 * 3 + 3  # the head alone
    assert seen[0] < seen[2] < seen[3] < seen[4] == seen[5] == sum(p.numel() for p in model.parameters())
    model.train()
    idx = torch.randint(0, 100, (2, 6))
    schedule(5)  # head + ln_f + the top block: nothing below gets a gradient
    model(idx, torch.tensor([6, 3])).sum().backward()
    assert model.transformer.h[0].attn.c_attn.weight.grad is None and model.transformer.h[1].attn.c_attn.weight.grad is not None


def test_example_batches_resume_where_they_stopped():
    examples = [(np.arange(i % 5 + 1), i % 2) for i in range(11)]
    a = ExampleBatches(examples, 4, lambda b: collate(b), seed=3)
    for _ in range(4):  # past an epoch boundary
        a.next_batch()
    b = ExampleBatches(examples, 4, lambda b: collate(b), seed=99)
    b.load_state_dict(a.state_dict())
    for _ in range(5):
        for x, y in zip(a.next_batch(), b.next_batch()):
            assert torch.equal(x, y)
    seen = torch.cat([ExampleBatches(examples, 11, lambda b: collate(b), seed=0).next_batch()[2]])
    assert seen.sum() == 5  # one epoch is every example once


def texts(labels):
    return [LabelledText(np.array([i]), label, f"f:{i}") for i, label in enumerate(labels)]


def test_carve_is_stratified_and_downsample_balances():
    import random

    rest, carved = carve(texts(["a"] * 60 + ["b"] * 20), 0.25, random.Random(0))
    assert sorted(t.label for t in carved).count("a") == 15 and [t.label for t in carved].count("b") == 5
    assert len(rest) + len(carved) == 80 and not {t.source for t in rest} & {t.source for t in carved}
    balanced = downsample(texts(["a"] * 60 + ["b"] * 20 + ["c"] * 7), random.Random(0))
    assert sorted(t.label for t in balanced) == ["a"] * 7 + ["b"] * 7 + ["c"] * 7


def test_labelled_files_splits_duplicates_and_labels(tmp_path):
    tokenizer = tiny_tokenizer()
    rows = labelled_texts(200)
    train = write_tsv(tmp_path / "train.tsv", rows[:150] + [rows[160]])  # a test text copied into train
    test = write_tsv(tmp_path / "test.tsv", rows[150:])
    source = SourceConfig(input=[f"train={train}", f"test={test}"], **SMS_LIKE)
    data = load_labelled(data=None, source=source, tokenizer=tokenizer, seed=0, val_fraction=0.2, test_fraction=0.3,
                         balance="train", progress=False)
    assert data.classes == ["ham", "spam"]
    assert len(data.splits["test"]) == 50  # the official test split is kept as it is
    assert any("duplicates" in n for n in data.notes)  # ... and the train copy of a test text dropped
    counts = {s: [t.label for t in data.splits[s]] for s in data.splits}
    assert counts["train"].count("ham") == counts["train"].count("spam")  # balanced train
    assert len(data.splits["val"]) == 30  # 20% of train, carved out per class, before balancing
    assert "ham" in data.table() and "total" in data.table()
    with pytest.raises(DataError, match="label_field"):
        load_labelled(data=None, source=SourceConfig(input=[str(train)], format="tsv", columns=("label", "text")),
                      tokenizer=tokenizer, seed=0, val_fraction=0.1, test_fraction=0.1, progress=False)
    odd = write_tsv(tmp_path / "odd.tsv", rows[:20] + [("weird", "a text")])
    with pytest.raises(DataError, match="odd.tsv:21: label 'weird'"):
        load_labelled(data=None, source=SourceConfig(input=[f"train={train}", f"test={odd}"], **SMS_LIKE),
                      tokenizer=tokenizer, seed=0, val_fraction=0.1, test_fraction=0.1, progress=False)


def test_prepared_folder_with_another_tokenizer_is_refused(tmp_path):
    from prepare import main as prepare_main

    write_tsv(tmp_path / "sms.tsv", labelled_texts(60))
    assert prepare_main(["--input", str(tmp_path / "sms.tsv"), "--format", "tsv", "--columns", "label,text",
                         "--label_field", "label", "--min_chars", "1", "--vocab_size", "280", "--out",
                         str(tmp_path / "prepared"), "--no-progress", "--num_workers", "1"]) == 0
    with pytest.raises(DataError, match="not the model's tokenizer"):
        load_labelled(data=tmp_path / "prepared", source=SourceConfig(), tokenizer=tiny_tokenizer(), seed=0,
                      val_fraction=0.1, test_fraction=0.1, progress=False)


def run_classify(tmp_path, base, out="run", ft=None, lora=None, **train_overrides):
    data = write_tsv(tmp_path / "data.tsv", labelled_texts(240))
    settings = dict(out_dir=tmp_path / out, max_steps=40, batch_size=16, learning_rate=3e-3, warmup_steps=4,
                    eval_every=20, checkpoint_every=20, log_every=10)
    lines = []
    scores = finetune_classifier(ft or FinetuneConfig(init_from=str(base), trainable="all"),
                                 ClassifyConfig(progress=False), SourceConfig(input=[str(data)], **SMS_LIKE),
                                 lora or LoRAConfig(lora_rank=4, lora_alpha=8.0),
                                 TrainConfig(**{**settings, **train_overrides}), print_fn=lines.append)
    return scores, "\n".join(lines)


def test_finetune_classifier_end_to_end(tmp_path):
    base, _, tokenizer = pretrained_checkpoint(tmp_path / "base")
    scores, log = run_classify(tmp_path, base)
    assert "trainable: every parameter" in log and "confusion matrix" in log
    assert scores["classes"] == ["ham", "spam"]
    for split in ("val", "test"):
        report = scores[split]
        assert sum(map(sum, report["confusion"])) == report["total"] > 0
        assert set(report["classes"]) == {"ham", "spam"} and 0 <= report["macro_f1"] <= 1
    assert scores["test"]["accuracy"] >= 0.9  # the rule is learnable in 40 steps; chance is 2/3
    assert json.loads((tmp_path / "run" / "scores.json").read_text()) == json.loads(json.dumps(scores))
    ckpt = load_checkpoint(tmp_path / "run")
    assert ckpt.meta["classifier"]["classes"] == ["ham", "spam"] and ckpt.tokenizer() == tokenizer
    with pytest.raises(ValueError, match="classifier"):
        ckpt.model()  # not a language model
    model, tok, meta = load_classifier(tmp_path / "run")
    results = predict_texts(model, tok, meta, ["we sat at noon with tea", "urgent claim your cash prize"])
    assert [label for label, _, _ in results] == ["ham", "spam"]
    assert all(math.isclose(sum(probs), 1.0, rel_tol=1e-5) and p == max(probs) for _, p, probs in results)


def test_classifier_resumes_exactly_with_gradual_unfreezing(tmp_path):
    """12 steps straight, against a run resumed from the straight run's step-6 checkpoint: the same
    bits (weights, batches, the unfreezing schedule and the optimizer state all carried over)."""
    import shutil

    base, _, _ = pretrained_checkpoint(tmp_path / "base")
    ft = FinetuneConfig(init_from=str(base), trainable="head", unfreeze_every=3)
    run_classify(tmp_path, base, out="straight", ft=ft, max_steps=12, checkpoint_every=6, eval_every=6)
    (tmp_path / "resumed").mkdir()
    shutil.copytree(tmp_path / "straight" / "ckpt-00000006", tmp_path / "resumed" / "ckpt-00000006")
    _, log = run_classify(tmp_path, base, out="resumed", ft=ft, max_steps=12, checkpoint_every=6, eval_every=6, resume=True)
    assert "resumed from" in log
    a, b = (load_checkpoint(tmp_path / d).tensors() for d in ("straight", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    first = load_checkpoint(tmp_path / "straight" / "ckpt-00000006").tensors()
    # unfrozen at step 9, so the lowest block moved only in the second half
    assert torch.equal(first["transformer.h.0.attn.c_attn.weight"], load_checkpoint(base).tensors()["transformer.h.0.attn.c_attn.weight"])
    assert not torch.equal(first["transformer.h.0.attn.c_attn.weight"], a["transformer.h.0.attn.c_attn.weight"])


def test_lora_classifier_saves_adapters_and_loads_merged(tmp_path):
    base, _, _ = pretrained_checkpoint(tmp_path / "base")
    scores, log = run_classify(tmp_path, base, ft=FinetuneConfig(init_from=str(base), trainable="lora"), max_steps=20)
    assert "trainable: the LoRA adapters and the head" in log
    ckpt = load_checkpoint(tmp_path / "run")
    adapters = ckpt.tensors("adapters.safetensors")
    assert set(adapters) == {n for n in ckpt.tensors() if "lora_" in n} | {"classifier.weight", "classifier.bias"}
    base_weights = load_checkpoint(base).tensors()
    tuned = ckpt.tensors()
    assert torch.equal(tuned["transformer.h.0.mlp.c_fc.weight"], base_weights["transformer.h.0.mlp.c_fc.weight"])
    model, tok, meta = load_classifier(tmp_path / "run")
    assert not any("lora" in n for n in model.state_dict())
    probs = predict_texts(model, tok, meta, ["the cat sat on a mat"])[0][2]
    assert len(probs) == 2 and scores["test"]["total"] > 0


def test_lora_without_training_the_head_still_saves_it_with_the_adapters(tmp_path):
    """--no-lora_head: the new head stays as initialised, but nothing else can rebuild it."""
    base, _, _ = pretrained_checkpoint(tmp_path / "base")
    _, log = run_classify(tmp_path, base, ft=FinetuneConfig(init_from=str(base), trainable="lora"),
                          lora=LoRAConfig(lora_rank=4, lora_alpha=8.0, lora_head=False), max_steps=4, eval_every=4,
                          checkpoint_every=4)
    assert "trainable: the LoRA adapters:" in log
    ckpt = load_checkpoint(tmp_path / "run")
    adapters = ckpt.tensors("adapters.safetensors")
    assert {"classifier.weight", "classifier.bias"} <= set(adapters)
    for name in ("classifier.weight", "classifier.bias"):
        assert torch.equal(adapters[name], ckpt.tensors()[name])


def test_starts_from_a_hugging_face_folder_with_its_tokenizer(tmp_path):
    from minillm.hf import export_hf_gpt2

    _, gpt, tokenizer = pretrained_checkpoint(tmp_path / "base")
    hf = export_hf_gpt2(gpt, tmp_path / "hf", tokenizer)
    ft = FinetuneConfig(init_from=str(hf), trainable="last", dropout=0.1)
    scores, log = run_classify(tmp_path, hf, ft=ft, max_steps=4, eval_every=4, checkpoint_every=4)
    assert f"base: Hugging Face GPT-2 folder {hf}" in log and scores["steps"] == 4
    ckpt = load_checkpoint(tmp_path / "run")
    assert ckpt.model_config().dropout == 0.1 and ckpt.tokenizer() == tokenizer
