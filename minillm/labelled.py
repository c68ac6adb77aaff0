"""Labelled texts for classification: read from a `prepare.py` output folder or straight from
CSV/TSV/JSON(L) files, split, optionally balanced, with every document accounted for.

Two ways in:
- a prepared folder (`--data data/sms`): its documents.jsonl gives each kept document's split,
  label and token ids (`minillm.data.iter_documents`); prepare.py already cleaned, deduplicated and
  split them, with its own tokenizer, which must be the model's.
- files (`--input`, read by `minillm.sources` with the same options prepare.py takes): the texts
  as they are, tokenized here with the model's tokenizer. Exact duplicates (same text up to case
  and spacing) are dropped, the copy in the later split of test, val, train kept, so no test text
  is trained on.

Splits: a document's own split when the source gives one (a split column, or `train=PATH`);
documents without one go to train. Then an empty test or val split is carved out of train: that
share of every class (`test_fraction`, `val_fraction` of train), drawn with the seed. So a file
without splits (SMSSpamCollection) gets a stratified train/val/test split, and IMDB's train/test
files get a val split from train while their test split stays the official one.

Balancing (`balance`): downsample every class of the chosen splits (train, or all) to the count of
its rarest class, at random with the seed: the book's recipe for SMS spam, where ham outnumbers
spam 6 to 1. The label set is read from the data: the sorted labels of the train split; a val or
test label that train never shows is an error naming its source.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from minillm.progress import Progress
from minillm.sources import SPLITS, BadRecord, DataError, SourceConfig, read_documents

BALANCE = ("none", "train", "all")


@dataclass
class LabelledText:
    ids: np.ndarray  # token ids, without <|endoftext|>
    label: str
    source: str  # where it came from (file:line), for messages


@dataclass
class LabelledData:
    splits: dict[str, list[LabelledText]]
    classes: list[str]
    notes: list[str] = field(default_factory=list)  # what was dropped, carved or downsampled, for the log

    def table(self) -> str:
        """Examples per split and class, as a small aligned table."""
        width = max([len(c) for c in self.classes] + [5])
        lines = [f"{'split':<6} " + " ".join(f"{c:>{width}}" for c in self.classes) + f" {'total':>{width}}"]
        for split in SPLITS:
            counts = Counter(t.label for t in self.splits[split])
            lines.append(f"{split:<6} " + " ".join(f"{counts[c]:>{width},}" for c in self.classes)
                         + f" {len(self.splits[split]):>{width},}")
        return "\n".join(lines)


def read_prepared(folder: Path, tokenizer) -> dict[str, list[LabelledText]]:
    """Every kept document of a prepared folder, by split (see the module docstring)."""
    from minillm.data import iter_documents
    from minillm.tokenizer import TOKENIZER_FILE, Tokenizer

    folder = Path(folder)
    if not (folder / TOKENIZER_FILE).is_file():
        raise DataError(f"{folder} is not a prepared folder (no {TOKENIZER_FILE}); run prepare.py, or give --input files")
    if Tokenizer.load(folder / TOKENIZER_FILE) != tokenizer:
        raise DataError(f"{folder / TOKENIZER_FILE} is not the model's tokenizer: prepare the data with the model's "
                        f"(prepare.py --tokenizer CHECKPOINT/{TOKENIZER_FILE}) or give --input files")
    splits: dict[str, list[LabelledText]] = {}
    for split in SPLITS:
        splits[split] = []
        for row, ids in iter_documents(folder, split):
            if row.get("label") is None:
                raise DataError(f"{row.get('source', folder)}: document {row['id']} has no label; classification needs "
                                f"labelled documents (prepare.py --label_field)")
            splits[split].append(LabelledText(np.asarray(ids), str(row["label"]), row.get("source", "")))
    return splits


def read_files(source: SourceConfig, tokenizer, *, dedup: bool = True, progress: bool = True
               ) -> tuple[dict[str, list[LabelledText]], list[str]]:
    """The labelled documents of `source`'s inputs, tokenized, by split (None: no split given);
    and notes on what was dropped."""
    from minillm.dedup import exact_key

    if not source.input:
        raise DataError("no data: give --data (a prepare.py output folder) or --input files with --label_field")
    if not source.label_field:
        raise DataError("--input files need --label_field: the field or column that holds each text's label")
    docs, bad = [], 0
    for doc in read_documents(source, progress=progress):
        if isinstance(doc, BadRecord):
            bad += 1
            continue
        if doc.label is None or str(doc.label).strip() == "":
            raise DataError(f"{doc.source}: no label in field {source.label_field!r}")
        docs.append(doc)
    notes = [f"skipped {bad:,} bad records (--on_bad skip)"] if bad else []
    if dedup:  # walk test, val, then train, keeping the first copy of each text
        rank = {"test": 0, "val": 1, "train": 2, None: 3}
        seen, kept, dropped = set(), [], Counter()
        for doc in sorted(docs, key=lambda d: rank[d.split]):  # a stable sort: reading order within a split
            key = exact_key(doc.text)
            if key in seen:
                dropped[doc.split or "unsplit"] += 1
                continue
            seen.add(key)
            kept.append(doc)
        docs = kept
        if dropped:
            notes.append("dropped exact duplicates: " + ", ".join(f"{n:,} from {s}" for s, n in dropped.items()))
    by_split: dict[str | None, list[LabelledText]] = {}
    with Progress(len(docs), desc="tokenize", unit="docs", enabled=progress) as bar:
        for start in range(0, len(docs), 4096):
            chunk = docs[start : start + 4096]
            for doc, ids in zip(chunk, tokenizer.encode_batch([d.text for d in chunk])):
                by_split.setdefault(doc.split, []).append(LabelledText(np.asarray(ids, dtype=np.int64), str(doc.label),
                                                                        doc.source))
            bar.update(len(chunk))
    return by_split, notes


def carve(examples: list[LabelledText], fraction: float, rng: random.Random) -> tuple[list[LabelledText], list[LabelledText]]:
    """(rest, carved): `fraction` of each class moved out, chosen with `rng`; order otherwise kept."""
    by_class: dict[str, list[int]] = {}
    for i, t in enumerate(examples):
        by_class.setdefault(t.label, []).append(i)
    chosen = set()
    for label in sorted(by_class):
        indices = by_class[label]
        chosen.update(rng.sample(indices, round(fraction * len(indices))))
    return ([t for i, t in enumerate(examples) if i not in chosen], [t for i, t in enumerate(examples) if i in chosen])


def downsample(examples: list[LabelledText], rng: random.Random) -> list[LabelledText]:
    """Every class cut to the rarest class's count, at random; order otherwise kept."""
    by_class: dict[str, list[int]] = {}
    for i, t in enumerate(examples):
        by_class.setdefault(t.label, []).append(i)
    smallest = min(len(v) for v in by_class.values())
    keep = set()
    for label in sorted(by_class):
        keep.update(rng.sample(by_class[label], smallest))
    return [t for i, t in enumerate(examples) if i in keep]


def load_labelled(*, data: Path | None, source: SourceConfig, tokenizer, seed: int, val_fraction: float,
                  test_fraction: float, balance: str = "none", dedup: bool = True, progress: bool = True) -> LabelledData:
    """Labelled, split (and balanced) token ids from a prepared folder or from files."""
    if balance not in BALANCE:
        raise ValueError(f"balance must be one of {', '.join(BALANCE)}; got {balance!r}")
    notes: list[str] = []
    if data is not None:
        if source.input:
            raise DataError("give either --data (a prepared folder) or --input files, not both")
        splits: dict = read_prepared(data, tokenizer)
    else:
        splits, notes = read_files(source, tokenizer, dedup=dedup, progress=progress)
    unsplit = splits.pop(None, [])
    splits = {s: list(splits.get(s, [])) for s in SPLITS}
    if unsplit:
        splits["train"] += unsplit
        notes.append(f"{len(unsplit):,} documents without a split went to train")
    rng = random.Random(seed)
    base = len(splits["train"])
    for split, fraction in (("test", test_fraction), ("val", val_fraction)):
        if not splits[split] and fraction > 0:
            splits["train"], carved = carve(splits["train"], fraction * base / max(len(splits["train"]), 1), rng)
            splits[split] = carved
            notes.append(f"{split}: {len(carved):,} documents carved out of train ({fraction:.0%}, per class)")
    if not splits["train"]:
        raise DataError("no training documents left after splitting")
    classes = sorted({t.label for t in splits["train"]})
    if len(classes) < 2:
        raise DataError(f"the train split has only the label {classes!r}: a classifier needs at least two classes")
    for split in ("val", "test"):
        for t in splits[split]:
            if t.label not in classes:
                raise DataError(f"{t.source}: label {t.label!r} of the {split} split never occurs in train "
                                f"(train's labels: {', '.join(classes)})")
    for split in (("train",) if balance == "train" else SPLITS if balance == "all" else ()):
        if splits[split]:
            before = len(splits[split])
            splits[split] = downsample(splits[split], rng)
            notes.append(f"balanced {split}: {before:,} -> {len(splits[split]):,} documents (every class downsampled "
                         f"to the rarest's count)")
    return LabelledData(splits, classes, notes)
