"""The preparation pipeline end to end: outputs that decode back to the cleaned documents, every
document accounted for (a property over random corpora), duplicates across splits, deterministic
splits, the same result on 1 and 2 worker processes, clear errors, and prepare.py itself."""

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minillm.cleaning import CleanConfig, normalize, redact
from minillm.data import (REASONS, Cleaned, DataError, PrepareConfig, Survivors, TokenFile, assign_split,
                          check_accounting, format_report, iter_documents, load_report, prepare, random_windows)
from minillm.dedup import DedupConfig, exact_key
from minillm.sources import SourceConfig
from minillm.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parent.parent
LOREM = ("the quick brown fox jumps over the lazy dog while seven wizards quietly hex every jumbo vat of "
         "boxing liquor and a sphinx of black quartz judges my vow as pack my box with five dozen jugs").split()


def paragraph(seed: int, words: int = 40) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(LOREM[i] for i in rng.integers(0, len(LOREM), words)).capitalize() + "."


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    """A small tokenizer trained once for the whole module (passing it skips training in each run)."""
    path = tmp_path_factory.mktemp("tok") / "tokenizer.bpe"
    Tokenizer.train([paragraph(i) for i in range(50)], 300).save(path)
    return path


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def run(tmp_path, rows, name="out", input_name=None, **options):
    """prepare() over a JSONL file of `rows` (label and split default to null), one worker, quiet;
    options such as prepare__vocab_size=300 go to the config they name."""
    rows = [{"label": None, "split": None, **r} if isinstance(r, dict) else r for r in rows]
    configs = {"prepare": PrepareConfig(out=tmp_path / name, num_workers=1, progress=False),
               "source": SourceConfig(input=[str(write_jsonl(tmp_path / (input_name or f"{name}.jsonl"), rows))],
                                      label_field="label", split_field="split"),
               "clean": CleanConfig(), "dedup": DedupConfig()}
    for key, value in options.items():
        section, field = key.split("__")
        configs[section] = dataclasses.replace(configs[section], **{field: value})
    return prepare(configs["prepare"], configs["source"], configs["clean"], configs["dedup"]), tmp_path / name


def test_end_to_end_outputs_decode_back_to_the_cleaned_documents(tmp_path):
    base = [paragraph(i) for i in range(12)]
    rows = [
        {"text": base[0] + " Mail me: ann@example.org<br />Thanks!", "label": "pos", "split": "train"},  # 0 PII, HTML
        {"text": base[1], "label": "neg", "split": "train"},  # 1
        {"text": base[1].upper(), "label": "neg", "split": "train"},  # 2 exact duplicate of 1 (case)
        {"text": base[2] + " extra", "label": "pos", "split": "train"},  # 3 near duplicate of 4 (test)
        {"text": base[2], "label": "pos", "split": "test"},  # 4
        {"text": base[3], "label": "neg", "split": "test"},  # 5
        {"text": base[3], "label": "neg", "split": "train"},  # 6 exact copy of a test document
        {"text": "Too short", "label": "neg", "split": "train"},  # 7
        {"text": "<br /><br />", "label": "pos", "split": "val"},  # 8 empty after cleaning
        {"text": "12345 67890 " * 5, "label": "pos", "split": "val"},  # 9 low quality
        '{"text": "broken',  # 10 bad record
        {"text": base[4], "label": "pos", "split": "val"},  # 11
        {"text": base[5], "label": "pos", "split": None},  # 12 split by a hash of its text
    ]
    report, out = run(tmp_path, rows, source__on_bad="skip", prepare__vocab_size=300)
    assert check_accounting(report) == []
    assert report["totals"]["read"] == 13
    dropped = {row["id"]: row for row in read_jsonl(out / "dropped.jsonl")}
    assert {i: dropped[i]["reason"] for i in (2, 3, 6, 7, 8, 9, 10)} == {
        2: "exact_duplicate", 3: "cross_split_duplicate", 6: "cross_split_duplicate", 7: "too_short", 8: "empty",
        9: "low_quality", 10: "bad_record"}
    assert dropped[2]["duplicate_of"] == 1 and dropped[6]["duplicate_of"] == 5 and dropped[3]["duplicate_of"] == 4
    assert report["bad_records"]["examples"][0]["source"].endswith(".jsonl:11")
    pairs = {(p["split"], p["copies_of"]): (p["exact"], p["near"]) for p in report["cross_split"]["pairs"]}
    assert pairs[("train", "test")] == (1, 1)
    assert report["redacted"]["email"] == {"count": 1, "chars": len("ann@example.org")}

    index = read_jsonl(out / "documents.jsonl")
    kept_ids = {row["id"] for row in index}
    assert kept_ids | set(dropped) == set(range(13)) and not kept_ids & set(dropped)
    hash_split = assign_split(exact_key(rows[12]["text"]), None, PrepareConfig())
    assert [row["split"] for row in index if row["id"] == 12] == [hash_split]
    assert len(index) == report["totals"]["kept"]
    tokenizer = Tokenizer.load(out / "tokenizer.bpe")
    texts = {i: r["text"] for i, r in enumerate(rows) if isinstance(r, dict)}
    for split in ("train", "val", "test"):
        tokens = TokenFile(out / f"{split}.bin").tokens
        docs = [row for row in index if row["split"] == split]
        assert len(tokens) == report["splits"][split]["tokens"] == sum(d["length"] + 1 for d in docs)
        for doc in docs:
            expected = redact(normalize(texts[doc["id"]], CleanConfig())[0])[0]
            assert tokens[doc["offset"] - 1] == tokenizer.eot_id  # <|endoftext|> before every document
            assert tokenizer.decode(tokens[doc["offset"] : doc["offset"] + doc["length"]].tolist()) == expected
            assert doc["label"] == rows[doc["id"]]["label"]
    assert "[EMAIL]" in tokenizer.decode(TokenFile(out / "train.bin").tokens.tolist())
    test_docs = list(iter_documents(out, "test"))
    assert [row["id"] for row, _ in test_docs] == [4, 5] + ([12] if hash_split == "test" else [])
    assert [row["label"] for row, _ in test_docs][:2] == ["pos", "neg"]
    assert tokenizer.decode(test_docs[1][1].tolist()) == rows[5]["text"]
    assert not (out / ".prepare-tmp").exists()
    assert load_report(out) == report
    table = format_report(report)
    assert "cross-split: 2 train documents copy test documents (exact 1, near 1): removed from train" in table


def test_cross_split_duplicates_can_be_kept_but_are_still_reported(tmp_path):
    rows = [{"text": paragraph(1), "split": "test"}, {"text": paragraph(1), "split": "train"},
            {"text": paragraph(2), "split": "train"}, {"text": paragraph(2), "split": "train"}]
    report, out = run(tmp_path, rows, dedup__cross_split_dedup=False, prepare__vocab_size=300)
    assert report["splits"]["train"]["kept"] == 2 and report["splits"]["train"]["dropped"]["exact_duplicate"] == 1
    assert report["cross_split"]["pairs"] == [{"split": "train", "copies_of": "test", "exact": 1, "near": 0}]
    assert "kept (--no-cross_split_dedup)" in format_report(report)


def corpus_rows():
    """Random corpora: documents drawn from a few texts (so duplicates happen), short and empty ones,
    HTML-only ones, random labels and splits, and malformed lines."""
    texts = st.sampled_from([paragraph(i) for i in range(6)] + [paragraph(0) + " x", "short", "", "<p></p>",
                                                                 "9999 " * 10, "Line\nLine\nLine\nLine"])
    doc = st.fixed_dictionaries({"text": texts, "label": st.sampled_from([None, "a", "b"]),
                                 "split": st.sampled_from([None, "train", "val", "test"])})
    return st.lists(st.one_of(doc, doc, doc, st.just('{"text": oops'), st.just('{"other": 1}')), max_size=25)


@settings(max_examples=20, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=corpus_rows())
def test_every_document_is_accounted_for(tmp_path, tokenizer_path, rows):
    rows = [{"text": paragraph(99, 60), "label": "a", "split": "train"}] + rows  # one that always survives
    report, out = run(tmp_path, rows, source__on_bad="skip", prepare__tokenizer=tokenizer_path)
    assert check_accounting(report) == []
    totals = report["totals"]
    assert totals["read"] == len(rows) == totals["kept"] + sum(totals["dropped"].values())
    assert totals["dropped"]["bad_record"] == sum(1 for r in rows if not isinstance(r, dict))
    labels = {}
    for r in rows:
        label = r.get("label") if isinstance(r, dict) else None
        labels[label] = labels.get(label, 0) + 1
    assert {row_label: sum(r["read"] for r in report["rows"] if r["label"] == row_label) for row_label in labels} \
        == labels
    for split in ("train", "val", "test"):  # documents that name their split are counted under it
        named = sum(1 for r in rows if isinstance(r, dict) and r["split"] == split)
        assert report["splits"][split]["read"] >= named
    kept, dropped = read_jsonl(out / "documents.jsonl"), read_jsonl(out / "dropped.jsonl")
    assert len(kept) == totals["kept"] and len(dropped) == sum(totals["dropped"].values())
    assert sorted(r["id"] for r in kept + dropped) == list(range(len(rows)))
    assert set(r["reason"] for r in dropped) <= set(REASONS)


def test_hash_split_is_deterministic_and_follows_the_ratios():
    config = PrepareConfig(val_fraction=0.1, test_fraction=0.2)
    keys = [exact_key(f"document number {i}") for i in range(4000)]
    splits = [assign_split(k, None, config) for k in keys]
    assert splits == [assign_split(k, None, config) for k in keys]
    share = {s: splits.count(s) / len(splits) for s in ("train", "val", "test")}
    assert abs(share["val"] - 0.1) < 0.02 and abs(share["test"] - 0.2) < 0.025
    other_seed = [assign_split(k, None, PrepareConfig(val_fraction=0.1, test_fraction=0.2, seed=1)) for k in keys]
    assert other_seed != splits
    assert {assign_split(k, "test", config) for k in keys} == {"test"}  # a document's own split is kept
    moved = [assign_split(k, "train", PrepareConfig(val_from_train=0.25)) for k in keys]
    assert set(moved) == {"train", "val"} and abs(moved.count("val") / len(moved) - 0.25) < 0.03


def test_split_depends_only_on_the_text(tmp_path, tokenizer_path):
    rows = [{"text": paragraph(i)} for i in range(40)]
    split_of = []
    for name, order in (("a", rows), ("b", rows[::-1] + [{"text": paragraph(100)}])):
        report, out = run(tmp_path, order, name=name, prepare__tokenizer=tokenizer_path)
        split_of.append({order[d["id"]]["text"]: d["split"] for d in read_jsonl(out / "documents.jsonl")})
    assert {t: s for t, s in split_of[1].items() if t in split_of[0]} == split_of[0]


def test_two_workers_give_the_same_bytes_as_one(tmp_path, tokenizer_path):
    rows = [{"text": paragraph(i % 30, 80) + (" variant" if i % 7 == 0 else ""), "label": str(i % 3)}
            for i in range(1500)]
    outs = []
    for workers in (1, 2):
        report, out = run(tmp_path, rows, name=f"w{workers}", input_name="same.jsonl",
                          prepare__tokenizer=tokenizer_path, prepare__num_workers=workers)
        outs.append(out)
    for name in ("train.bin", "val.bin", "test.bin", "documents.jsonl", "dropped.jsonl"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name


def test_empty_results_say_which_filter_removed_everything(tmp_path, tokenizer_path):
    rows = [{"text": "tiny"}, {"text": ""}, {"text": "short one"}]
    with pytest.raises(DataError, match=r"all 3 documents were dropped: empty 1 \(empty after cleaning\), "
                                        r"too_short 2 \(shorter than --min_chars=20\)"):
        run(tmp_path, rows)
    with pytest.raises(DataError, match="no train documents are left to train the tokenizer on"):
        run(tmp_path, [{"text": paragraph(1), "split": "test"}])
    report, _ = run(tmp_path, [{"text": paragraph(1), "split": "test"}], prepare__tokenizer=tokenizer_path)
    assert report["splits"]["test"]["kept"] == 1 and report["splits"]["train"]["tokens"] == 0
    with pytest.raises(DataError, match="no documents were read"):
        run(tmp_path, [])


def test_all_bad_records_are_quoted_in_the_error(tmp_path):
    """When every record is bad the error itself shows the first three (no outputs are written, so
    there is no dropped.jsonl to point at, or only an older run's)."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "dropped.jsonl").write_text('{"from": "an older run"}\n')
    rows = ['{"text": "broken', '{"text": 5}', '["text"]', '{"body": "x"}']
    with pytest.raises(DataError) as err:
        run(tmp_path, rows, source__on_bad="skip")
    message = str(err.value)
    assert re.match(r"all 4 documents were dropped: bad_record 4 \(first: \S*out.jsonl:1: malformed JSON", message)
    assert "out.jsonl:2: field 'label' is missing" in message and "out.jsonl:3: expected a JSON object" in message
    assert "out.jsonl:4" not in message and message.endswith("; ...)") and "dropped.jsonl" not in message


def test_a_file_name_that_is_not_utf8_is_kept_and_recorded_readably(tmp_path, tokenizer_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    try:
        with open(os.path.join(os.fsencode(folder), b"caf\xe9.txt"), "wb") as f:  # Latin-1, as old archives are
            f.write(paragraph(1).encode())
    except OSError:
        pytest.skip("this file system refuses file names that are not UTF-8")
    (folder / "plain.txt").write_text(paragraph(2))
    config = PrepareConfig(out=tmp_path / "out", num_workers=1, progress=False, tokenizer=tokenizer_path,
                           val_fraction=0.0, test_fraction=0.0)
    report = prepare(config, SourceConfig(input=[str(folder)]))
    assert report["splits"]["train"]["kept"] == 2
    sources = [row["source"] for row in read_jsonl(tmp_path / "out" / "documents.jsonl")]
    assert sources == [str(folder / "caf\\xe9.txt"), str(folder / "plain.txt")]


def test_many_distinct_labels_are_looked_up_not_searched(tmp_path):
    """Each new label costs O(1), not a scan of the labels seen so far: a label type that counts its
    comparisons shows it (a list lookup compares with every earlier label: n^2 / 2 comparisons)."""
    compared = [0]

    class Label(str):
        __hash__ = str.__hash__

        def __eq__(self, other):
            compared[0] += 1
            return str.__eq__(self, other)

    survivors = Survivors(tmp_path / "spool.bin")
    no_signatures = np.zeros((0, 128), dtype=np.uint32)
    labels = [Label(f"label {i}") for i in range(2000)]
    for i, label in enumerate(labels + labels[:10]):
        survivors.add(Cleaned(i, "train", label, f"a.jsonl:{i}", "kept", None, b"text", bytes(16), -1, 4, (), {}),
                      no_signatures)
    survivors.close()
    assert [survivors.label(i) for i in range(len(survivors))] == labels + labels[:10]
    assert compared[0] < 100  # a few hash collisions at most; a list lookup makes about 2,000,000


def test_training_windows_from_a_prepared_folder(tmp_path, tokenizer_path):
    report, out = run(tmp_path, [{"text": paragraph(i, 100), "split": "train"} for i in range(20)],
                      prepare__tokenizer=tokenizer_path)
    train = TokenFile(out / "train.bin")
    assert len(train) == report["tokens"]["per_split"]["train"] and train.vocab_size == report["tokens"]["vocab_size"]
    x, y = random_windows(train, 4, 32, torch.Generator().manual_seed(0))
    assert x.shape == (4, 32) and torch.equal(x[:, 1:], y[:, :-1]) and int(x.max()) < train.vocab_size


def script(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(REPO / "prepare.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_prepare_script_on_imdb_slices(shared_data, tmp_path):
    for name in ("imdb_train.csv", "imdb_test.csv"):  # 150 reviews of each: the real format, quickly
        lines = (shared_data / name).read_bytes().split(b"\n")[:151]
        (tmp_path / name).write_bytes(b"\n".join(lines) + b"\n")
    result = script("--input", "train=imdb_train.csv", "--input", "test=imdb_test.csv", "--text_field", "review",
                    "--label_field", "sentiment", "--vocab_size", "400", "--out", "prepared", "--no-progress",
                    cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = load_report(tmp_path / "prepared")
    assert check_accounting(report) == [] and report["totals"]["read"] == 300
    assert report["splits"]["train"]["read"] == report["splits"]["test"]["read"] == 150
    assert {r["label"] for r in report["rows"]} == {"positive", "negative"}
    assert report["cleaning"]["html"] > 50  # the <br /> tags
    assert "train  negative" in result.stdout and "tokens: train" in result.stdout
    stats = script("--stats", "prepared", cwd=tmp_path)
    assert stats.returncode == 0 and stats.stdout.strip() == format_report(report)


def test_prepare_main_default_corpus_and_errors(tmp_path, monkeypatch, capsys):
    """prepare.main() in this process (the script itself runs above): the embedded corpus with no
    input, and the exit status and one-line message for bad input and bad options."""
    import prepare as prepare_script

    monkeypatch.chdir(tmp_path)
    assert prepare_script.main(["--limit", "40", "--vocab_size", "300", "--no-progress", "--num_workers", "1"]) == 0
    report = load_report(tmp_path / "data" / "corpus")  # the default --out
    assert report["totals"]["read"] == 40 and report["rows"][0]["label"] == "pydoc-topic"
    assert "pydoc-topic" in capsys.readouterr().out
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"txt": "oops"}\n')
    assert prepare_script.main(["--input", "bad.jsonl", "--out", "x"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress line
    assert err == "prepare.py: error: bad.jsonl:2: field 'text' is missing; the record has fields: txt"
    assert prepare_script.main(["--stats", "nowhere"]) == 1 and "not a prepared folder" in capsys.readouterr().err
    (tmp_path / "broken.bpe").write_text("not a tokenizer")
    assert prepare_script.main(["--limit", "5", "--tokenizer", "broken.bpe", "--no-progress"]) == 1
    assert "--tokenizer broken.bpe: cannot load it" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        prepare_script.main(["--inptu", "a"])
    assert info.value.code == 2 and "did you mean --input?" in capsys.readouterr().err
