"""train.py end to end, in subprocesses: output, SIGKILL + --resume exactness, DDP == one process."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from minillm.checkpoint import list_checkpoints, load_checkpoint
from minillm.runlog import read_metrics
from minillm.tokenfile import write_tokens
from minillm.tokenizer import TOKENIZER_FILE, Tokenizer

REPO = Path(__file__).resolve().parent.parent
WORDS = "the a model learns to predict next token from context of words in text data runs fast slow".split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A tiny prepared folder: tokenizer.bpe, train.bin, val.bin, written by the library directly."""
    folder = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60))) + "." for _ in range(300)]
    tokenizer = Tokenizer.train(docs[:250], vocab_size=300)
    tokenizer.save(folder / TOKENIZER_FILE)
    for split, part in (("train", docs[:250]), ("val", docs[250:])):
        ids = [i for doc in part for i in [tokenizer.eot_id] + tokenizer.encode_ordinary(doc)]
        write_tokens(folder / f"{split}.bin", ids, tokenizer.vocab_size)
    return folder


def train_cmd(corpus: Path, out: Path, *extra: str, nproc: int = 1) -> list[str]:
    args = [f"--data={corpus}", f"--out_dir={out}", "--model=tiny", "--n_layer=2", "--n_embd=32", "--n_head=2",
            "--block_size=32", "--warmup_steps=2", "--eval_every=5", "--checkpoint_every=5", "--samples=1",
            "--sample_tokens=8", "--eval_batches=2", "--learning_rate=3e-3", *extra]
    script = str(REPO / "train.py")
    if nproc == 1:
        return [sys.executable, script, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script, *args]


def env() -> dict:
    # the same thread count in every process, so CPU kernels reduce in the same order
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run(cmd, **kw) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300, **kw)
    assert result.returncode == 0, f"{' '.join(cmd)}\nstdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"
    return result


def losses(out: Path) -> list[tuple]:
    return [(r["kind"], r["step"], r.get("loss"), r.get("val_loss")) for r in read_metrics(out / "metrics.jsonl")]


def test_train_prints_progress_perplexity_samples_and_paths(corpus, tmp_path):
    out = tmp_path / "run"
    stdout = run(train_cmd(corpus, out, "--max_steps=10")).stdout
    assert '"train": {' in stdout and '"gpt": {' in stdout  # the resolved config, printed at start
    assert "step 10/10 | loss " in stdout and "tok/s" in stdout
    assert "eval step 10 | val_loss" in stdout
    assert "val perplexity" in stdout and "--- sample 1" in stdout
    assert f"checkpoint: {out / 'ckpt-00000010'}" in stdout and "loss.svg" in stdout
    ckpt = load_checkpoint(out)
    assert ckpt.tokenizer() is not None and ckpt.meta["pretrain"]["model"] == "tiny"
    assert ckpt.model_config().n_embd == 32 and ckpt.model_config().vocab_size == ckpt.tokenizer().vocab_size
    assert (out / "loss.svg").read_text().startswith("<svg")


def test_sigkill_then_resume_is_bitwise_exact(corpus, tmp_path):
    """A run killed with SIGKILL at a random step after a checkpoint, then resumed to N, ends with the
    same weights, bit for bit, and the same loss log as a run that was never interrupted. The resume
    names nothing but the folder: its settings come from the checkpoint."""
    steps = 20
    straight = tmp_path / "straight"
    run(train_cmd(corpus, straight, f"--max_steps={steps}"))

    killed = tmp_path / "killed"
    kill_after = random.Random().randint(6, 14)  # past the first checkpoint (step 5), before the end
    proc = subprocess.Popen(train_cmd(corpus, killed, f"--max_steps={steps}"), env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        logged = [r["step"] for r in read_metrics(killed / "metrics.jsonl")] if (killed / "metrics.jsonl").exists() else []
        if logged and max(logged) >= kill_after:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert list_checkpoints(killed), "killed before the first checkpoint"
    # only the folder and --resume: the data, shape and schedule come from the run's checkpoint
    run([sys.executable, str(REPO / "train.py"), f"--out_dir={killed}", "--resume"])

    a, b = load_checkpoint(straight), load_checkpoint(killed)
    assert a.step == b.step == steps
    for name, tensor in a.tensors().items():
        assert torch.equal(tensor, b.tensors()[name]), name
    for name, tensor in a.tensors("optimizer.safetensors").items():
        assert torch.equal(tensor, b.tensors("optimizer.safetensors")[name]), name
    assert losses(straight) == losses(killed)


def test_resume_before_the_first_checkpoint_starts_over_from_init_from(corpus, tmp_path):
    """A run killed before its first checkpoint left only metrics.jsonl: --resume starts again, from
    --init_from's weights, and the log holds the new run's steps only."""
    base = tmp_path / "base"
    run(train_cmd(corpus, base, "--max_steps=5"))
    out = tmp_path / "again"
    out.mkdir()
    (out / "metrics.jsonl").write_text("".join(f'{{"kind": "train", "step": {i}, "loss": 9.0}}\n' for i in range(1, 34)))
    stdout = run(train_cmd(corpus, out, "--max_steps=3", f"--init_from={base}", "--resume")).stdout
    assert "resume: no checkpoint" in stdout and f"initialised from {base / 'ckpt-00000005'}" in stdout
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"] == [1, 2, 3]


def test_model_options_apply_to_the_preset_chosen(corpus):
    from minillm.pretrain import PretrainConfig, TrainConfig, model_config, run_configs
    from minillm.config import GPTConfig

    defaults = (PretrainConfig(), TrainConfig(), GPTConfig.from_preset("mini"))
    pre, _, overrides = run_configs(["--model=small", "--n_head=12"], *defaults)  # 12 does not divide mini's 128
    config = model_config(pre, overrides, 4096)
    assert (config.n_head, config.n_embd) == (12, GPTConfig.from_preset("small").n_embd)


def test_two_processes_match_one_with_the_same_global_batch(corpus, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    run(train_cmd(corpus, one, "--max_steps=6", "--batch_size=4", "--device=cpu"))
    result = run(train_cmd(corpus, two, "--max_steps=6", "--batch_size=2", "--device=cpu", nproc=2))
    assert result.stdout.count("step 6/6 | loss") == 1  # rank 0 alone prints
    la, lb = losses(one), losses(two)
    assert [x[:2] for x in la] == [x[:2] for x in lb]
    for (kind, step, loss_a, val_a), (_, _, loss_b, val_b) in zip(la, lb):
        if loss_a is not None:
            assert loss_a == pytest.approx(loss_b, abs=1e-5), (kind, step)
        if val_a is not None:
            assert val_a == pytest.approx(val_b, abs=1e-5), (kind, step)
    for name, tensor in load_checkpoint(one).tensors().items():
        torch.testing.assert_close(tensor, load_checkpoint(two).tensors()[name], atol=1e-5, rtol=1e-4)


def test_clear_errors(corpus, tmp_path, capsys):
    from train import main

    assert main([f"--data={tmp_path / 'nothing'}", f"--out_dir={tmp_path / 'run'}"]) == 1
    assert "is not a prepared corpus (missing train.bin, val.bin, tokenizer.bpe): run `python prepare.py" in capsys.readouterr().err
    assert main([f"--data={corpus}", f"--out_dir={tmp_path / 'run'}", "--vocab_size=10"]) == 1
    assert "--vocab_size=10 is smaller than the tokenizer's" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["--max_stepz=3"])
    assert exit_info.value.code == 2 and "did you mean --max_steps?" in capsys.readouterr().err
