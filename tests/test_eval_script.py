"""eval.py end to end: each command on a run folder built here, the report card's numbers against the
run's files and separate evaluations, two runs side by side, a Hugging Face export scoring the same,
and clear errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from eval_fixtures import CORPUS, bpe_tokenizer, make_prepared, make_run, tiny_gpt

import eval as eval_script
from minillm.perplexity import PerplexityConfig, evaluate_perplexity
from minillm.progress import format_duration

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tokenizer():
    return bpe_tokenizer(320)


@pytest.fixture
def run(tmp_path, tokenizer):
    """A run trained on a prepared corpus: checkpoint at step 20, metrics logged to step 23."""
    data = make_prepared(tmp_path / "data", tokenizer, {
        "train": [CORPUS[:200]], "val": [CORPUS[i : i + 90] for i in range(0, 450, 90)], "test": [CORPUS[500:800]]})
    model = tiny_gpt(tokenizer.vocab_size, block_size=32, seed=2)
    return make_run(tmp_path / "runs" / "a", model, tokenizer, step=20, data=data, logged_steps=23), model


def test_ppl_command_in_a_fresh_process(tmp_path, run):
    run_dir, model = run
    text = tmp_path / "notes.txt"
    text.write_text(CORPUS[:400], encoding="utf-8")
    out = tmp_path / "ppl.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "eval.py"), "ppl", "--model", str(run_dir), "--data", str(text),
         "--stride=8", "--json", str(out), "--no-progress"],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    line = [l for l in proc.stdout.splitlines() if l.startswith(f"{text}: ")]
    assert len(line) == 1 and "| ppl " in line[0] and "| bpb " in line[0] and "stride 8" in line[0], proc.stdout
    saved = json.loads(out.read_text())["results"][0]
    expected = evaluate_perplexity(model, bpe_tokenizer(320), text, PerplexityConfig(stride=8), progress=False)
    assert saved["tokens"] == expected.total.tokens and saved["bytes"] == len(CORPUS[:400].encode())
    assert saved["perplexity"] == pytest.approx(expected.total.perplexity, rel=1e-5)


def test_report_card_matches_the_run_files_and_separate_evaluations(tmp_path, run, tokenizer, capsys):
    run_dir, model = run
    bench = tmp_path / "bench.jsonl"
    bench.write_text("".join(json.dumps({"context": "The cat", "choices": [" sat", " flew"], "label": i % 2}) + "\n"
                             for i in range(4)))
    code = eval_script.main(["report", str(run_dir), "--benchmarks", str(bench), "--samples", "2",
                             "--sample_tokens", "5", "--no-progress"])
    assert code == 0
    report = (run_dir / "report.md").read_text()
    assert f"| parameters | {model.num_params():,} " in report
    assert "| tokens seen | 10,240 |" in report  # trainer_state.json: 20 steps x 512
    # the steps logged past the checkpoint (21-23) are left out: 20 x 250 ms
    assert f"| training time | {format_duration(5.0)} (20 steps, 2,048 tok/s on average) |" in report
    assert "| final train loss | 4.0000 at step 20" in report
    assert "| final val loss | 4.2000 (perplexity 66.69) at step 20; best 4.2000 at step 20 |" in report
    for split in ("val", "test"):
        path = tmp_path / "data" / f"{split}.bin"
        expected = evaluate_perplexity(model, tokenizer, path, PerplexityConfig(), progress=False)
        assert f"| perplexity on {path} | {expected.total.line().replace('|', chr(92) + '|')} |" in report
    assert f"| {bench} | acc 0.5000, acc_norm " in report
    assert report.count("```text") == 2 and "![loss curve of" in report and "(loss.svg)" in report
    assert '"pretrain": {' in report
    printed = capsys.readouterr().out
    assert f"report card: {run_dir / 'report.md'}" in printed


def test_two_runs_side_by_side(tmp_path, run, tokenizer):
    run_dir, _ = run
    other = make_run(tmp_path / "runs" / "b", tiny_gpt(tokenizer.vocab_size, block_size=32, seed=5), tokenizer, step=10)
    text = tmp_path / "t.txt"
    text.write_text(CORPUS[:300])
    out = tmp_path / "cards" / "compare.md"
    assert eval_script.main(["report", str(run_dir), str(other / "ckpt-00000010"), "--texts", str(text),
                             "--samples", "0", "--out", str(out), "--no-progress"]) == 0
    report = out.read_text()
    assert f"# Report cards: {run_dir} vs {other}" in report
    header = next(l for l in report.splitlines() if l.startswith("|  |"))
    assert header == f"|  | {run_dir} | {other} |"
    row = next(l for l in report.splitlines() if l.startswith(f"| perplexity on {text} |"))
    assert row.count("ppl ") == 2
    assert "(../runs/a/loss.svg)" in report and "(../runs/b/loss.svg)" in report


def test_mc_and_gen_commands_write_predictions(tmp_path, run, capsys):
    run_dir, _ = run
    bench = tmp_path / "arc.jsonl"
    bench.write_text(json.dumps({"id": "q", "question": "Which is a gas?", "answerKey": "B",
                                 "choices": {"text": ["ice", "steam"], "label": ["A", "B"]}}) + "\n")
    preds = tmp_path / "mc_preds.jsonl"
    assert eval_script.main(["mc", "--model", str(run_dir), "--data", str(bench), "--predictions", str(preds),
                             "--json", str(tmp_path / "mc.json"), "--no-progress"]) == 0
    assert f"{bench} (arc): acc " in capsys.readouterr().out
    saved = json.loads((tmp_path / "mc.json").read_text())["results"][0]  # strict JSON: one question has no stderr
    assert saved["questions"] == 1 and saved["acc_stderr"] is None and saved["acc"] in (0.0, 1.0)
    row = json.loads(preds.read_text())
    assert row["id"] == "q" and row["label"] == 1 and len(row["logprobs"]) == 2
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"prompt": "The cat", "reference": "sat on the mat"}) + "\n")
    gen_preds = tmp_path / "gen_preds.jsonl"
    assert eval_script.main(["gen", "--model", str(run_dir), "--data", str(qa), "--max_new_tokens", "4",
                             "--predictions", str(gen_preds), "--json", str(tmp_path / "gen.json"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "BLEU " in out and "ROUGE-L F " in out
    assert json.loads(gen_preds.read_text())["references"] == ["sat on the mat"]
    assert json.loads((tmp_path / "gen.json").read_text())["results"][0]["examples"] == 1


def test_a_hugging_face_export_scores_the_same(tmp_path, run, tokenizer):
    from minillm.hf import export_hf_gpt2

    run_dir, model = run
    folder = export_hf_gpt2(model, tmp_path / "hf", tokenizer=tokenizer)
    val = tmp_path / "data" / "val.bin"
    results = {}
    for name, path in (("ckpt", run_dir), ("hf", folder)):
        out = tmp_path / f"{name}.json"
        assert eval_script.main(["ppl", "--model", str(path), "--data", str(val), "--json", str(out), "--no-progress"]) == 0
        results[name] = json.loads(out.read_text())["results"][0]
    assert results["hf"]["perplexity"] == pytest.approx(results["ckpt"]["perplexity"], rel=1e-5)
    assert results["hf"]["bits_per_byte"] == pytest.approx(results["ckpt"]["bits_per_byte"], rel=1e-5)


def test_errors_are_one_line_and_name_the_problem(tmp_path, run, capsys):
    run_dir, _ = run
    assert eval_script.main([]) == 2 and "the first argument is the command" in capsys.readouterr().err
    assert eval_script.main(["ppl", "--model", str(run_dir)]) == 2
    assert "give --model and --data" in capsys.readouterr().err
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"abc \xff")
    assert eval_script.main(["ppl", "--model", str(run_dir), "--data", str(bad), "--no-progress"]) == 1
    assert f"eval.py ppl: error: {bad}: not UTF-8 text" in capsys.readouterr().err
    assert eval_script.main(["mc", "--model", str(tmp_path / "nothing"), "--data", str(bad)]) == 1
    assert "no minillm checkpoint at" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        eval_script.main(["ppl", "--model", str(run_dir), "--data", str(bad), "--strid", "3"])
    assert exit_info.value.code == 2 and "did you mean --stride" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        eval_script.main(["ppl", "--model", str(run_dir), "--data", str(bad), "--dtype", "float8"])
    assert "EvalConfig.dtype must be auto or one of float32" in capsys.readouterr().err
    other = tmp_path / "other.bin"
    from minillm.tokenfile import write_tokens
    write_tokens(other, [1, 2, 3], vocab_size=50_000)
    assert eval_script.main(["ppl", "--model", str(run_dir), "--data", str(other), "--no-progress"]) == 1
    assert "made with a tokenizer of 50,000 ids" in capsys.readouterr().err
    assert eval_script.main(["report", "--no-progress"]) == 1
    assert "name the run folder" in capsys.readouterr().err


def test_report_card_of_a_real_training_run(tmp_path, tokenizer, capsys):
    """The trainer's own files (train.py in-process): the card reads what it wrote."""
    import train as train_script
    from minillm.runlog import read_metrics

    data = make_prepared(tmp_path / "data", tokenizer, {"train": [CORPUS[i : i + 200] for i in range(0, 1200, 200)],
                                                        "val": [CORPUS[:150], CORPUS[150:300]], "test": [CORPUS[300:450]]})
    out = tmp_path / "run"
    assert train_script.main([f"--data={data}", f"--out_dir={out}", "--model=tiny", "--n_layer=1", "--n_embd=16",
                              "--n_head=2", "--block_size=16", "--batch_size=2", "--max_steps=6", "--eval_every=3",
                              "--checkpoint_every=3", "--eval_batches=1", "--samples=0", "--log_every=100"]) == 0
    assert eval_script.main(["report", str(out), "--samples", "1", "--sample_tokens", "3", "--no-progress"]) == 0
    capsys.readouterr()
    report = (out / "report.md").read_text()
    records = read_metrics(out / "metrics.jsonl")
    train_records = [r for r in records if r["kind"] == "train"]
    val_records = [r for r in records if r["kind"] == "val"]
    assert f"| tokens seen | {train_records[-1]['tokens']:,} |" in report
    seconds = sum(r["ms"] for r in train_records) / 1000
    assert f"| training time | {format_duration(seconds)} (6 steps, " in report
    assert f"| final train loss | {train_records[-1]['loss']:.4f} at step 6" in report
    assert f"| final val loss | {val_records[-1]['val_loss']:.4f} " in report
    assert f"| perplexity on {data / 'val.bin'} | loss " in report and f"| perplexity on {data / 'test.bin'} | loss " in report
    assert "(loss.svg)" in report and (out / "loss.svg").is_file()
