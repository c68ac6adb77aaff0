"""finetune.py from the command line: classify a TSV file end to end in a fresh process, predict
with the saved classifier, and one-line errors with their exit status; the shared SMS data's
reading when it is there."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from finetune import main
from finetune_fixtures import labelled_texts, pretrained_checkpoint, write_tsv

ROOT = Path(__file__).resolve().parent.parent


def test_classify_from_the_command_line_then_predict(tmp_path, capsys):
    base, _, _ = pretrained_checkpoint(tmp_path / "base")
    data = write_tsv(tmp_path / "sms.tsv", labelled_texts(240))
    command = [sys.executable, str(ROOT / "finetune.py"), "classify", "--init_from", str(base), "--input", str(data),
               "--format", "tsv", "--columns", "label,text", "--label_field", "label", "--trainable", "all",
               "--out_dir", str(tmp_path / "run"), "--max_steps", "40", "--learning_rate", "3e-3", "--eval_every", "20",
               "--no-progress"]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for expected in ("classes: ham, spam", "step 40/40", "eval step 40 | val_loss", "test: ", "macro avg",
                     "confusion matrix (rows: true, columns: predicted)", "scores: ", "predict: python finetune.py"):
        assert expected in out, expected
    assert (tmp_path / "run" / "scores.json").is_file()

    assert main(["classify", "--ckpt", str(tmp_path / "run"), "--predict", "urgent claim your cash prize"]) == 0
    label, probability, text = capsys.readouterr().out.strip().split("\t")
    assert (label, text) == ("spam", "urgent claim your cash prize") and 0.5 < float(probability) <= 1
    texts = tmp_path / "texts.txt"
    texts.write_text("we sat at noon with tea\n\nnow call to win free cash\n")
    assert main(["classify", "--ckpt", str(tmp_path / "run"), "--predict_file", str(texts)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == ["ham", "spam"]  # the blank line is skipped


def test_errors_are_one_line_with_a_status(tmp_path, capsys):
    assert main([]) == 2
    assert "first argument must be one of classify, instruct, merge" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["classify", "--trainable", "some"])
    assert exit_info.value.code == 2 and "trainable must be one of head, last, all, lora" in capsys.readouterr().err
    assert main(["classify", "--out_dir", str(tmp_path / "x")]) == 1
    assert "error: finetuning starts from a pretrained model: pass --init_from" in capsys.readouterr().err
    base, _, _ = pretrained_checkpoint(tmp_path / "base")
    assert main(["classify", "--init_from", str(base), "--out_dir", str(tmp_path / "x")]) == 1
    assert "error: no data: give --data" in capsys.readouterr().err
    assert main(["classify", "--ckpt", str(base), "--predict", "hi"]) == 1
    assert "holds a language model, not a classifier" in capsys.readouterr().err
    assert main(["instruct", "--init_from", str(base), "--data", str(tmp_path / "none.json")]) == 1
    assert "none.json: cannot read it" in capsys.readouterr().err
    assert main(["merge", "--ckpt", str(base)]) == 1
    assert "has no LoRA adapters to merge" in capsys.readouterr().err


def test_shared_sms_data_reads_as_labelled_splits(shared_data):
    """The real file: 5,574 lines, ham and spam; duplicates dropped; a stratified split made."""
    from minillm.labelled import load_labelled
    from minillm.sources import SourceConfig
    from minillm.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_gpt2_files(shared_data / "encoder.json", shared_data / "vocab.bpe")
    source = SourceConfig(input=[str(shared_data / "SMSSpamCollection")], format="tsv", columns=("label", "text"),
                          label_field="label")
    data = load_labelled(data=None, source=source, tokenizer=tokenizer, seed=0, val_fraction=0.1, test_fraction=0.2,
                         progress=False)
    assert data.classes == ["ham", "spam"]
    sizes = {s: len(v) for s, v in data.splits.items()}
    assert sum(sizes.values()) < 5574 and any("duplicates" in n for n in data.notes)
    spam_share = {s: sum(t.label == "spam" for t in v) / len(v) for s, v in data.splits.items()}
    assert all(0.10 < share < 0.16 for share in spam_share.values())  # stratified: about 13% everywhere
