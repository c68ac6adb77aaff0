"""The training loop, in process: schedule, decay groups, accumulation, exact resume, NaN handling,
early stopping, the metrics log and its picture."""

import json
import math
import os
import re
import signal

import numpy as np
import pytest
import torch

from minillm.checkpoint import list_checkpoints, load_checkpoint
from minillm.config import GPTConfig
from minillm.model import GPT
from minillm.optim import load_optimizer_state, lr_at, optimizer_state_tensors, param_groups
from minillm.pretrain import RandomWindows, lm_evaluator
from minillm.safetensors import load_file, save_file
from minillm.runlog import format_step, read_metrics
from minillm.trainer import TrainConfig, TrainingDiverged, lm_loss, train

MODEL = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.1)


def corpus(n=4000, seed=0):
    """A learnable token stream: a repeating pattern with some noise."""
    rng = np.random.default_rng(seed)
    base = np.tile(np.arange(0, 60, 3), n // 20 + 1)[:n]
    noise = rng.integers(0, 64, n)
    return np.where(rng.random(n) < 0.1, noise, base).astype(np.uint16)


def run(tmp_path, *, seed=0, tokens=None, loss_fn=lm_loss, evaluate=True, **overrides):
    torch.manual_seed(seed)
    model = GPT(MODEL)
    tokens = corpus() if tokens is None else tokens
    settings = dict(out_dir=tmp_path, max_steps=12, batch_size=4, warmup_steps=3, eval_every=4,
                    checkpoint_every=4, learning_rate=3e-3, log_every=1)
    config = TrainConfig(**{**settings, **overrides})
    batches = RandomWindows(tokens, config.batch_size, MODEL.block_size, seed=config.seed)
    evaluator = lm_evaluator(corpus(seed=1), 4, MODEL.block_size, max_batches=2) if evaluate else None
    lines = []
    result = train(model, config, batches, evaluate=evaluator, loss_fn=loss_fn, print_fn=lines.append,
                   flops_per_token=model.flops_per_token(MODEL.block_size))
    return model, result, lines


def test_lr_schedule():
    kw = dict(peak=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert lr_at(0, **kw) == pytest.approx(0.1) and lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(10, **kw) == pytest.approx(1.0)
    assert lr_at(60, **kw) == pytest.approx(0.55)  # cosine midpoint: halfway between peak and floor
    assert lr_at(110, **kw) == pytest.approx(0.1) and lr_at(500, **kw) == pytest.approx(0.1)
    decay = [lr_at(s, **kw) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    assert lr_at(5, peak=1.0, warmup_steps=0, max_steps=10, min_lr_ratio=0.0) == pytest.approx(0.5)


def test_weight_decay_only_on_matrices():
    model = GPT(MODEL)
    decay, no_decay = param_groups(model, 0.1)
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1
    n = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert n == model.num_params()  # every parameter once, the tied head included once


def test_optimizer_state_round_trip(tmp_path):
    torch.manual_seed(0)
    model = GPT(MODEL)
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3)
    idx = torch.randint(0, 64, (2, 16))
    model(idx, idx)[1].backward()
    opt.step()
    tensors, meta = optimizer_state_tensors(opt)
    save_file(tensors, tmp_path / "opt.safetensors")  # through the files a checkpoint holds
    tensors, meta = load_file(tmp_path / "opt.safetensors"), json.loads(json.dumps(meta))
    twin = GPT(MODEL)
    twin.load_state_dict(model.state_dict())
    opt2 = torch.optim.AdamW(param_groups(twin, 0.1), lr=1e-3)
    load_optimizer_state(opt2, tensors, meta)
    for m, o in ((model, opt), (twin, opt2)):
        torch.manual_seed(1)  # the same dropout masks for both
        o.zero_grad()
        m(idx, idx)[1].backward()
        o.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_training_lowers_the_loss_and_logs(tmp_path):
    model, result, lines = run(tmp_path, max_steps=40, eval_every=20, checkpoint_every=20)
    records = read_metrics(tmp_path / "metrics.jsonl")
    train_losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(train_losses) == 40 and train_losses[-1] < train_losses[0] - 1.0
    assert [r["step"] for r in records if r["kind"] == "val"] == [20, 40]
    assert result.steps == 40 and result.stop_reason == "max_steps" and result.skipped_steps == 0
    assert result.tokens == 40 * 4 * 16
    step_line = next(line for line in lines if line.startswith("step 40/40"))
    # no MFU column on a CPU
    assert re.fullmatch(r"step 40/40 \| loss \d+\.\d{4} \| lr \d\.\d\de-\d\d \| [\d.]+ ms \| [\d,]+ tok/s \| ETA \S+", step_line)
    svg = (tmp_path / "loss.svg").read_text()
    assert svg.startswith("<svg") and "train loss" in svg and "val loss" in svg
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-00000020", "ckpt-00000040"]
    meta = load_checkpoint(tmp_path).meta
    assert meta["train"]["max_steps"] == 40 and meta["model"]["n_embd"] == 32


def test_format_step():
    line = format_step(12, 100, 3.14159, 6e-4, 212.44, 19288.4, 0.412, 399.0)
    assert line == "step 12/100 | loss 3.1416 | lr 6.00e-04 | 212.4 ms | 19,288 tok/s | MFU 41.2% | ETA 6m39s"


def test_gradient_accumulation_matches_a_bigger_batch(tmp_path):
    """4 micro-batches of 2 give the same updates as 1 batch of 8 over the same windows (no dropout)."""
    tokens = corpus()
    results = []
    for batch_size, tokens_per_step in ((8, 0), (2, 8 * 16)):
        torch.manual_seed(0)
        model = GPT(GPTConfig(**{**MODEL.__dict__, "dropout": 0.0}))
        config = TrainConfig(out_dir=tmp_path / str(batch_size), max_steps=5, batch_size=batch_size,
                             tokens_per_step=tokens_per_step, warmup_steps=1, eval_every=0, checkpoint_every=0)
        # the same global windows: draw 8 per step either way
        source = RandomWindows(tokens, 8, 16, seed=1)
        if batch_size == 2:
            class Chunked:
                def __init__(self):
                    self.pending = []

                def next_batch(self):
                    if not self.pending:
                        x, y = source.next_batch()
                        self.pending = [(x[i:i + 2], y[i:i + 2]) for i in range(0, 8, 2)]
                    return self.pending.pop(0)

                def state_dict(self):
                    return source.state_dict()

                def load_state_dict(self, state):
                    source.load_state_dict(state)

            batches = Chunked()
        else:
            batches = source
        result = train(model, config, batches, print_fn=lambda _: None)
        results.append((result.last_loss, [p.detach().clone() for p in model.parameters()]))
    (loss_a, params_a), (loss_b, params_b) = results
    assert loss_a == pytest.approx(loss_b, abs=1e-5)
    for a, b in zip(params_a, params_b):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_tokens_per_step_must_divide(tmp_path):
    with pytest.raises(ValueError, match="must be a multiple of the tokens in one micro-batch"):
        run(tmp_path, tokens_per_step=100)


def test_ctrl_c_then_resume_is_exact(tmp_path):
    """12 steps straight vs a run interrupted by Ctrl-C (SIGINT) during step 7, which finishes that
    step, saves and stops, then is resumed to 12: identical bits and the same metrics log."""
    full, full_result, _ = run(tmp_path / "full")
    calls = {"n": 0}

    def interrupt_at_step_7(model, batch):
        calls["n"] += 1
        if calls["n"] == 7:
            os.kill(os.getpid(), signal.SIGINT)
        return lm_loss(model, batch)

    _, stopped, lines = run(tmp_path / "split", loss_fn=interrupt_at_step_7)
    assert stopped.stop_reason == "interrupted" and stopped.steps == 7
    assert [p.name for p in list_checkpoints(tmp_path / "split")][-1] == "ckpt-00000007"
    resumed, resumed_result, lines = run(tmp_path / "split", seed=99, resume=True)  # seed 99: init is overwritten
    assert any(line.startswith("resumed from") for line in lines)
    for (name, a), b in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
    assert full_result.last_loss == resumed_result.last_loss
    strip = lambda path: [(r["kind"], r["step"], r.get("loss"), r.get("val_loss")) for r in read_metrics(path)]
    assert strip(tmp_path / "full" / "metrics.jsonl") == strip(tmp_path / "split" / "metrics.jsonl")


def test_a_new_run_never_mixes_into_an_old_one(tmp_path):
    run(tmp_path, max_steps=4)
    with pytest.raises(ValueError, match="already holds a run .*pass --resume to continue it, --overwrite"):
        run(tmp_path, max_steps=4)
    _, result, _ = run(tmp_path, max_steps=2, overwrite=True)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-00000002"]
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == "train"] == [1, 2]
    with pytest.raises(ValueError, match="pick one"):
        TrainConfig(resume=True, overwrite=True)


def test_resume_without_checkpoint_starts_fresh(tmp_path):
    _, result, lines = run(tmp_path, max_steps=2, resume=True)
    assert result.steps == 2 and any("no checkpoint" in line for line in lines)


def test_on_step_hook_runs_before_every_step_and_frozen_parameters_stay_put(tmp_path):
    """The hook gradual unfreezing uses: called with each 0-based step, also after a resume; a
    parameter it leaves without requires_grad gets no update that step, weight decay included."""
    seen = []

    def freeze_embeddings_first(step):
        seen.append(step)
        model.transformer.wte.weight.requires_grad_(step >= 3)

    def go(out, **overrides):
        settings = dict(out_dir=out, max_steps=5, batch_size=4, warmup_steps=1, eval_every=0, checkpoint_every=3,
                        learning_rate=3e-3, weight_decay=0.5)
        train(model, TrainConfig(**{**settings, **overrides}), RandomWindows(corpus(), 4, MODEL.block_size, seed=0),
              on_step=freeze_embeddings_first, print_fn=lambda _: None)

    torch.manual_seed(0)
    model = GPT(MODEL)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    go(tmp_path)
    assert seen == [0, 1, 2, 3, 4]
    at3 = load_checkpoint(tmp_path / "ckpt-00000003").tensors()
    assert torch.equal(at3["transformer.wte.weight"], start["transformer.wte.weight"])
    assert not torch.equal(at3["transformer.h.0.mlp.c_fc.weight"], start["transformer.h.0.mlp.c_fc.weight"])
    assert not torch.equal(model.transformer.wte.weight, start["transformer.wte.weight"])  # unfrozen at step 3
    seen.clear()
    go(tmp_path, resume=True, max_steps=7)
    assert seen == [5, 6]


def test_non_finite_steps_are_skipped_then_stop(tmp_path):
    calls = {"n": 0}

    def poisoned_loss(model, batch):
        calls["n"] += 1
        loss = lm_loss(model, batch)
        return loss * float("nan") if calls["n"] in (3, 4) else loss

    model, result, lines = run(tmp_path, loss_fn=poisoned_loss, max_steps=8, checkpoint_every=1, eval_every=0)
    assert result.skipped_steps == 2 and result.steps == 8
    assert sum("skipped: non-finite loss" in line for line in lines) == 2
    for path in list_checkpoints(tmp_path):  # no checkpoint ever holds a NaN
        assert all(torch.isfinite(t).all() for t in load_checkpoint(path).tensors().values())
    records = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["skipped"] for r in records][2:4] == [True, True]

    def always_nan(model, batch):
        return lm_loss(model, batch) * float("nan")

    with pytest.raises(TrainingDiverged, match=r"step 3: 3 non-finite steps in a row"):
        run(tmp_path / "diverge", loss_fn=always_nan, max_bad_steps=3)


def test_skipped_step_leaves_weights_alone(tmp_path):
    def inf_grad(model, batch):
        """A finite loss whose gradient is infinite: d/dw sqrt(w - w) at 0 is 1 / (2 * 0)."""
        w = model.transformer.wte.weight
        return lm_loss(model, batch) + torch.sqrt(w - w.detach()).sum()

    torch.manual_seed(0)
    model = GPT(MODEL)
    before = [p.detach().clone() for p in model.parameters()]
    config = TrainConfig(out_dir=tmp_path, max_steps=1, batch_size=2, eval_every=0, checkpoint_every=0, max_bad_steps=5)
    lines = []
    result = train(model, config, RandomWindows(corpus(), 2, 16, seed=0), loss_fn=inf_grad, print_fn=lines.append)
    assert result.skipped_steps == 1 and any("non-finite gradient norm" in line for line in lines)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_early_stopping(tmp_path):
    # a learning rate of ~0 keeps the val loss flat, so it never improves on the first evaluation
    _, result, lines = run(tmp_path, learning_rate=1e-12, min_lr_ratio=1.0, warmup_steps=0, max_steps=40,
                           eval_every=2, early_stopping=2, evaluate=True)
    assert result.stop_reason == "early stopping" and result.steps < 40
    assert any(line.startswith("early stopping at step") for line in lines)
    assert load_checkpoint(tmp_path).step == result.steps  # stopping saves where it stopped


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**MODEL.__dict__, "dropout": 0.0}))
    idx = torch.randint(0, 64, (2, 16))
    model(idx, idx)[1].backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.activation_checkpointing = True
    model(idx, idx)[1].backward()
    for a, p in zip(plain, model.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=0, atol=1e-7)


def test_config_validation():
    with pytest.raises(ValueError, match="max_steps must be at least 1"):
        TrainConfig(max_steps=0)
    with pytest.raises(ValueError, match="dtype must be auto, fp32, bf16 or fp16"):
        TrainConfig(dtype="fp8")
    with pytest.raises(ValueError, match="min_lr_ratio"):
        TrainConfig(min_lr_ratio=2)


def test_evaluator_is_fixed_and_counts_windows():
    tokens = corpus(n=16 * 5 + 1)
    model = GPT(GPTConfig(**{**MODEL.__dict__, "dropout": 0.0})).eval()
    evaluate = lm_evaluator(tokens, batch_size=2, block_size=16, max_batches=10)
    with torch.no_grad():
        a, b = evaluate(model), evaluate(model)
        windows = torch.from_numpy(tokens[:81].astype(np.int64))
        x = torch.stack([windows[i * 16:(i + 1) * 16] for i in range(5)])
        y = torch.stack([windows[i * 16 + 1:(i + 1) * 16 + 1] for i in range(5)])
        expected = model(x, y)[1].item()
    assert a == b and a["val_loss"] == pytest.approx(expected, rel=1e-6)
    assert a["val_ppl"] == pytest.approx(math.exp(expected), rel=1e-6)
