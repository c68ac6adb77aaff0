"""Data preparation: raw documents in; a clean, deduplicated, split and tokenized corpus out, with
every document accounted for.

    report = prepare(PrepareConfig(out=Path("data/imdb")), SourceConfig(input=[...]))

The stages, each in its own module except the glue here:
1. read, clean, judge (`minillm.sources`, `minillm.cleaning`), in worker processes: every record is
   normalised, redacted and filtered; survivors get an exact key and a MinHash signature
   (`minillm.dedup`) and a split: their own (a field, or `train=PATH`), else one drawn from a hash
   of their text, so the same text always lands in the same split. Surviving texts are spooled to
   disk; only a few hundred bytes per document stay in memory, whatever the input's size.
2. deduplicate: walk the survivors test first, then val, then train (reading order within each),
   keeping each document unless an already kept one of its split is an exact or near copy. A
   document that copies one of an earlier split (a train review that is also a test review) is
   reported as cross-split overlap and, by default, dropped, so the evaluation splits stay the ones
   the source defined and the model never trains on its test set.
3. tokenizer: trained on the kept train documents (`Tokenizer.train`), or the one given.
4. tokenize on all cores (`Tokenizer.encode_batch`), writing one token file per split with
   `<|endoftext|>` before every document (`minillm.tokenfile`).
5. write the index (`documents.jsonl`: id, split, label, token offset and length, source), the
   dropped documents (`dropped.jsonl`: id, split, label, source, reason, duplicate_of), and the
   report (`report.json`, printed as a table).

Accounting: every record read is either kept or dropped for exactly one reason in REASONS, so
per split and label, read == kept + sum(dropped). `check_accounting` verifies it; the tests check
it over random corpora. Outputs are written in a temporary folder and moved into place at the
end, report.json last: a folder with a report.json is a complete one.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing
import os
import shutil
import sys
import time
from array import array
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from minillm import cli
from minillm.cleaning import CleanConfig, normalize, quality_problem, redact
from minillm.data_report import (NO_SPLIT, REASONS, REPORT_FILE, Accounts, build_report, check_accounting,
                                 format_report, load_report)
from minillm.dedup import DedupConfig, DuplicateIndex, MinHasher, exact_key, lsh_params
from minillm.progress import Progress
from minillm.sources import SPLITS, BadRecord, DataError, Document, SourceConfig, read_documents
from minillm.tokenfile import TokenFile, TokenWriter, dtype_for_vocab, eval_windows, random_windows
from minillm.tokenizer import TOKENIZER_FILE, Tokenizer

# what training, evaluation and prepare.py use from here; the token-file reader and the report live
# in their own modules and are re-exported so `from minillm.data import TokenFile` works
__all__ = ["PrepareConfig", "prepare", "iter_documents", "TokenFile", "random_windows", "eval_windows", "load_report",
           "format_report", "check_accounting", "DataError", "REASONS", "DOCUMENTS_FILE", "DROPPED_FILE",
           "REPORT_FILE"]
DOCUMENTS_FILE, DROPPED_FILE = "documents.jsonl", "dropped.jsonl"
_DEDUP_ORDER = ("test", "val", "train")  # earlier splits win: their documents are kept


@dataclass
class PrepareConfig:
    """Where the prepared corpus goes, how documents without a split are split, and the tokenizer."""

    out: Path = Path("data/corpus")  # output folder (created; its earlier outputs are replaced)
    val_fraction: float = 0.05  # share of the documents without a split of their own that go to val
    test_fraction: float = 0.05  # ... and to test (by a hash of the text: deterministic)
    val_from_train: float = 0.0  # move this share of the documents whose source says train to val
    seed: int = 0  # seeds the hash split (a plain --seed also seeds MinHash; --prepare.seed only this)
    tokenizer: Path | None = None  # use this tokenizer file instead of training one on the train split
    vocab_size: int = 4096  # vocabulary of the tokenizer trained here
    num_workers: int = 0  # worker processes for cleaning and tokenization; 0: one per core
    progress: bool = True  # progress bars on stderr
    stats: Path | None = None  # print the report of an already prepared folder and exit

    def __post_init__(self) -> None:
        for name in ("val_fraction", "test_fraction", "val_from_train"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"PrepareConfig.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("PrepareConfig.val_fraction + test_fraction must leave some documents for train")
        if self.vocab_size < 257:
            raise ValueError(f"PrepareConfig.vocab_size must be at least 257 (256 bytes + <|endoftext|>), "
                             f"got {self.vocab_size}")
        if self.num_workers < 0:
            raise ValueError(f"PrepareConfig.num_workers must be >= 0, got {self.num_workers}")

    def workers(self) -> int:
        if self.num_workers:
            return self.num_workers
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class Cleaned(NamedTuple):
    """What a worker reports about one record."""

    id: int
    split: str
    label: str | None
    source: str
    outcome: str  # "kept" (so far) or a reason from REASONS
    detail: str | None  # low_quality: which test; bad_record: the message
    data: bytes  # a survivor's cleaned text, UTF-8
    key: bytes  # exact_key of the cleaned text
    signature_row: int  # its MinHash signature's row in the batch's matrix; -1: none
    raw_bytes: int  # UTF-8 bytes of the text as read
    changed: tuple[str, ...]  # cleaning steps that changed it
    redacted: dict[str, tuple[int, int]]  # PII kind -> (matches, characters)


class Survivors:
    """The documents of one split that passed cleaning, in reading order. What deduplication needs
    stays in memory column by column (id, label, exact key, MinHash signature: about 0.6 KB per
    document with 128 permutations, whatever the text's size); source and text go to a spool file
    on disk and are read back, in order, by `read()`."""

    def __init__(self, path: Path):
        self.path = path
        self.ids, self.label_ids, self.sizes = array("q"), array("i"), array("q")  # sizes: source, text
        self.label_names: list[str | None] = []  # label id -> label
        self._label_ids: dict[str | None, int] = {}  # label -> label id (a corpus may have many labels)
        self.keys = bytearray()  # 16 bytes each
        # signatures stay in the matrices the workers sent (no copy); per document: (matrix, row) or -1
        self._matrices: list[np.ndarray] = []
        self._signature_at = array("q")
        self._spool = open(path, "wb")

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, r: Cleaned, matrix: np.ndarray) -> None:
        self.ids.append(r.id)
        label_id = self._label_ids.setdefault(r.label, len(self.label_names))
        if label_id == len(self.label_names):
            self.label_names.append(r.label)
        self.label_ids.append(label_id)
        self.keys += r.key
        if r.signature_row >= 0 and (not self._matrices or self._matrices[-1] is not matrix):
            self._matrices.append(matrix)
        self._signature_at.append((len(self._matrices) - 1) << 32 | r.signature_row if r.signature_row >= 0 else -1)
        source = r.source.encode("utf-8")
        self._spool.write(source + r.data)
        self.sizes.extend((len(source), len(r.data)))

    def label(self, i: int) -> str | None:
        return self.label_names[self.label_ids[i]]

    def key(self, i: int) -> bytes:
        return bytes(self.keys[16 * i : 16 * i + 16])

    def signature(self, i: int) -> np.ndarray | None:
        at = self._signature_at[i]
        return None if at < 0 else self._matrices[at >> 32][at & 0xFFFFFFFF]

    def close(self) -> None:
        self._spool.close()

    def read(self) -> Iterator[tuple[int, str, str]]:
        """(index, source, text) of every survivor, in order, from the spool."""
        with open(self.path, "rb") as spool:
            for i in range(len(self.ids)):
                source, text = spool.read(self.sizes[2 * i]), spool.read(self.sizes[2 * i + 1])
                yield i, source.decode("utf-8"), text.decode("utf-8")


def assign_split(key: bytes, own_split: str | None, config: PrepareConfig) -> str:
    """The document's own split, else one drawn from a seeded hash of its exact key."""
    digest = hashlib.blake2b(key, digest_size=8, key=config.seed.to_bytes(8, "little", signed=True)).digest()
    u = int.from_bytes(digest, "little") / 2.0**64  # uniform in [0, 1), a pure function of the text
    if own_split is None:
        return "val" if u < config.val_fraction else "test" if u < config.val_fraction + config.test_fraction \
            else "train"
    return "val" if own_split == "train" and u < config.val_from_train else own_split


def clean_documents(batch: list[tuple[int, Document | BadRecord]], clean: CleanConfig, dedup: DedupConfig,
                    prepare: PrepareConfig) -> tuple[list[Cleaned], np.ndarray]:
    """Stage 1 for a batch of records (runs in a worker process): normalise, redact, judge, key.

    Returns the results and one (rows, num_perm) matrix of MinHash signatures: one array pickles
    far faster than an array per document.
    """
    hasher = MinHasher(dedup.num_perm, dedup.seed, dedup.shingle_words) if dedup.near_dedup else None
    out, signatures = [], []
    for doc_id, doc in batch:
        if isinstance(doc, BadRecord):
            out.append(Cleaned(doc_id, doc.split or NO_SPLIT, None, doc.source, "bad_record", doc.message, b"", b"",
                               -1, 0, (), {}))
            continue
        text, changed = normalize(doc.text, clean)
        text, redacted = redact(text, clean.redact) if clean.redact else (text, {})
        key = exact_key(text)
        problem = quality_problem(text, clean)
        outcome, detail = problem if problem else ("kept", None)
        row = -1
        if hasher is not None and problem is None:
            signature = hasher.signature(text)
            if signature.size:  # a text without words has none and is never a near-duplicate
                row = len(signatures)
                signatures.append(signature)
        data = text.encode("utf-8") if problem is None else b""
        out.append(Cleaned(doc_id, assign_split(key, doc.split, prepare), doc.label, doc.source, outcome, detail,
                           data, key, row, len(doc.text.encode("utf-8")), tuple(changed), redacted))
    return out, np.stack(signatures) if signatures else np.zeros((0, dedup.num_perm), dtype=np.uint32)


def _batches(records: Iterable[Document | BadRecord], max_docs: int = 512,
             max_chars: int = 1 << 20) -> Iterator[list[tuple[int, Document | BadRecord]]]:
    batch, chars = [], 0
    for doc_id, record in enumerate(records):
        batch.append((doc_id, record))
        chars += len(record.text) if isinstance(record, Document) else 0
        if len(batch) >= max_docs or chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def parallel_map(fn: Callable, items: Iterable, workers: int) -> Iterator:
    """`map(fn, items)` in order on `workers` processes, with at most 2 * workers items in flight,
    so a lazy `items` is read only as fast as it is processed (Pool.imap would read it all)."""
    if workers <= 1:
        yield from map(fn, items)
        return
    # fork where it is safe (Linux): workers start in milliseconds with the modules already imported;
    # elsewhere the platform's default (spawn), which re-imports minillm in each worker
    method = "fork" if sys.platform.startswith("linux") else None
    with multiprocessing.get_context(method).Pool(workers) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.apply_async(fn, (item,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def prepare(config: PrepareConfig, source: SourceConfig | None = None, clean: CleanConfig | None = None,
            dedup: DedupConfig | None = None) -> dict[str, Any]:
    """Run the whole preparation into `config.out`; returns the report (also in report.json)."""
    source, clean, dedup = source or SourceConfig(), clean or CleanConfig(), dedup or DedupConfig()
    start = time.perf_counter()
    out = Path(config.out)
    work = out / ".prepare-tmp"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    stages: dict[str, float] = {}

    def timed(stage: str, fn, *args):
        begin = time.perf_counter()
        result = fn(*args)
        stages[stage] = round(time.perf_counter() - begin, 2)
        return result

    try:
        accounts, survivors = timed("read_clean", _read_and_clean, config, source, clean, dedup, work)
        duplicates = timed("dedup", _deduplicate, survivors, dedup, accounts)
        _check_not_empty(accounts, config, clean)
        tokenizer = timed("tokenizer", _get_tokenizer, config, work, survivors, duplicates)
        tokens = timed("tokenize", _tokenize, config, tokenizer, work, survivors, duplicates)
        near = dict(zip(("bands", "rows"), lsh_params(dedup.near_threshold, dedup.num_perm)),
                    threshold=dedup.near_threshold, shingle_words=dedup.shingle_words)
        report = build_report(
            accounts, tokens=tokens, dtype=dtype_for_vocab(tokenizer.vocab_size).name,
            vocab_size=tokenizer.vocab_size, eot_id=tokenizer.eot_id,
            tokenizer=str(config.tokenizer) if config.tokenizer else "trained on the train split",
            inputs=list(source.input) or ["(embedded default corpus: pydoc topics and stdlib docstrings)"],
            cross_split_removed=dedup.cross_split_dedup, near_dedup=near if dedup.near_dedup else None,
            configs={cli.section_name(c): cli.to_dict(c) for c in (config, source, clean, dedup)},
            seconds=time.perf_counter() - start, stage_seconds=stages)
        (work / REPORT_FILE).write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        for name in [f"{s}.bin" for s in SPLITS] + [TOKENIZER_FILE, DOCUMENTS_FILE, DROPPED_FILE, REPORT_FILE]:
            os.replace(work / name, out / name)  # report.json last: its presence means complete
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return report


def _read_and_clean(config: PrepareConfig, source: SourceConfig, clean: CleanConfig, dedup: DedupConfig,
                    work: Path) -> tuple[Accounts, dict[str, Survivors]]:
    """Stage 1: stream records through the workers; keep the survivors, log the dropped."""
    accounts = Accounts()
    survivors = {s: Survivors(work / f"spool-{s}.bin") for s in SPLITS}
    worker = partial(clean_documents, clean=clean, dedup=dedup, prepare=config)
    records = read_documents(source, progress=config.progress)
    try:
        with open(work / DROPPED_FILE, "w", encoding="utf-8") as dropped, \
                Progress(desc="read+clean", unit="docs", enabled=config.progress) as bar:
            for results, signatures in parallel_map(worker, _batches(records), config.workers()):
                for r in results:
                    accounts.outcomes[r.split, r.label, r.outcome] += 1
                    accounts.changed.update(r.changed)
                    for kind, (count, chars) in r.redacted.items():
                        accounts.redacted[kind, "count"] += count
                        accounts.redacted[kind, "chars"] += chars
                    accounts.raw_bytes += r.raw_bytes
                    if r.outcome == "kept":
                        survivors[r.split].add(r, signatures)
                        continue
                    if r.outcome == "low_quality":
                        accounts.low_quality[r.detail] += 1
                    if r.outcome == "bad_record":
                        accounts.example("bad_record", {"source": r.source, "message": r.detail}, keep=1000)
                    _log_dropped(dropped, r.id, r.split, r.label, r.source, r.outcome, detail=r.detail)
                bar.update(len(results), bytes=sum(r.raw_bytes for r in results))
    finally:
        for s in survivors.values():
            s.close()
    return accounts, survivors


def _log_dropped(f, doc_id: int, split: str, label: str | None, source: str, reason: str, *,
                 detail: str | None = None, duplicate_of: int | None = None) -> None:
    row = {"id": doc_id, "split": split, "label": label, "source": source, "reason": reason}
    if detail is not None:
        row["detail"] = detail
    if duplicate_of is not None:
        row["duplicate_of"] = duplicate_of
    f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _deduplicate(survivors: dict[str, Survivors], dedup: DedupConfig, accounts: Accounts) -> dict[int, tuple]:
    """Stage 2: {id: (reason, id of the copy kept)} for the survivors dropped as duplicates.

    Splits are walked test, val, train, so a copy in an evaluation split is the one kept. Exact
    copies are looked for before near ones, in the document's own split before earlier ones.
    """
    indexes = {s: DuplicateIndex(dedup.near_threshold, dedup.num_perm) for s in SPLITS}
    checks = [kind for kind, on in (("exact", dedup.exact_dedup), ("near", dedup.near_dedup)) if on]
    dropped: dict[int, tuple] = {}
    for position, split in enumerate(_DEDUP_ORDER):
        docs, earlier = survivors[split], _DEDUP_ORDER[:position]
        for i in range(len(docs)):
            doc_id, key, signature = docs.ids[i], docs.key(i), docs.signature(i)
            if dedup.cross_split_dedup:
                found = _search(indexes, (split, *earlier), checks, key, signature)
            else:  # a copy in its own split still decides; a copy elsewhere is only reported
                found = _search(indexes, (split,), checks, key, signature) or \
                    _search(indexes, earlier, checks, key, signature)
            reason = None
            if found is not None:
                kind, where, match = found
                reason = f"{kind}_duplicate"
                if where != split:
                    accounts.overlap[split, where, kind] += 1
                    accounts.example("cross_split", {"id": doc_id, "split": split, "kind": kind,
                                                     "duplicate_of": match, "duplicate_split": where})
                    reason = "cross_split_duplicate" if dedup.cross_split_dedup else None
            if reason is None:
                indexes[split].add(doc_id, key, signature)
                continue
            dropped[doc_id] = (reason, match)
            label = docs.label(i)
            accounts.outcomes[split, label, "kept"] -= 1
            accounts.outcomes[split, label, reason] += 1
    return dropped


def _search(indexes: dict[str, DuplicateIndex], splits: tuple[str, ...], checks: list[str], key: bytes,
            signature: np.ndarray | None) -> tuple[str, str, int] | None:
    """The first (kind, split, id of the kept copy) found, exact copies before near ones."""
    for kind in checks:
        for where in splits:
            index = indexes[where]
            match = index.find_exact(key) if kind == "exact" else index.find_near(signature)
            if match is not None:
                return kind, where, match
    return None


def _check_not_empty(accounts: Accounts, config: PrepareConfig, clean: CleanConfig) -> None:
    """An empty result is an error that says which filters removed everything."""
    totals: Counter = Counter()
    for (split, _, outcome), n in accounts.outcomes.items():
        totals[outcome] += n
        totals[split, outcome] += n
    read = sum(n for key, n in totals.items() if isinstance(key, str))
    if read == 0:
        raise DataError("no documents were read: the inputs hold no records")
    bad = [example["message"] for example in accounts.examples["bad_record"]]
    # subtle: no "see dropped.jsonl": the error stops the run before any output is moved into place
    first_bad = "first: " + "; ".join(bad[:3]) + ("; ..." if len(bad) > 3 else "")
    hints = {"empty": "empty after cleaning", "too_short": f"shorter than --min_chars={clean.min_chars}",
             "low_quality": f"--min_letter_share={clean.min_letter_share} or "
                            f"--max_repeated_line_share={clean.max_repeated_line_share}",
             "exact_duplicate": "--no-exact_dedup keeps them", "near_duplicate": "--near_threshold, --no-near_dedup",
             "cross_split_duplicate": "--no-cross_split_dedup keeps them", "bad_record": first_bad}
    if totals["kept"] == 0:
        why = ", ".join(f"{reason} {totals[reason]:,} ({hints[reason]})" for reason in REASONS if totals[reason])
        raise DataError(f"all {read:,} documents were dropped: {why}")
    if totals["train", "kept"] == 0 and config.tokenizer is None:
        why = ", ".join(f"{reason} {totals['train', reason]:,}" for reason in REASONS if totals["train", reason])
        raise DataError(f"no train documents are left to train the tokenizer on ({why or 'no document landed in the train split'}); "
                        f"give the inputs a train split or pass --tokenizer")


def _kept(survivors: Survivors, duplicates: dict[int, tuple], log=None, split: str = "") -> Iterator[tuple]:
    """(id, label, source, text) of a split's kept documents; the duplicates go to `log` if given."""
    for i, source, text in survivors.read():
        doc_id = survivors.ids[i]
        if doc_id not in duplicates:
            yield doc_id, survivors.label(i), source, text
        elif log is not None:
            reason, copy_of = duplicates[doc_id]
            _log_dropped(log, doc_id, split, survivors.label(i), source, reason, duplicate_of=copy_of)


def _get_tokenizer(config: PrepareConfig, work: Path, survivors: dict[str, Survivors],
                   duplicates: dict[int, tuple]) -> Tokenizer:
    """Stage 3: the tokenizer given, or one trained on the kept train documents; saved to the output."""
    if config.tokenizer is not None:
        try:
            tokenizer = Tokenizer.load(config.tokenizer)
        except (OSError, ValueError) as err:  # missing, damaged or of an unknown version
            raise DataError(f"--tokenizer {config.tokenizer}: cannot load it: {err}") from None
    else:
        texts = (text for *_, text in _kept(survivors["train"], duplicates))
        tokenizer = Tokenizer.train(texts, config.vocab_size, verbose=config.progress, num_workers=config.workers())
    if tokenizer.eot_id is None:
        raise DataError(f"{config.tokenizer}: this tokenizer has no <|endoftext|> token, which prepare.py "
                        f"writes before every document")
    tokenizer.save(work / TOKENIZER_FILE)
    return tokenizer


def _tokenize(config: PrepareConfig, tokenizer: Tokenizer, work: Path, survivors: dict[str, Survivors],
              duplicates: dict[int, tuple]) -> dict[str, int]:
    """Stage 4: token files and documents.jsonl (and the duplicates' lines of dropped.jsonl);
    returns the tokens written per split."""
    total = sum(len(s) for s in survivors.values()) - len(duplicates)
    tokens = {}
    eot, workers = tokenizer.eot_id, config.workers()
    with open(work / DOCUMENTS_FILE, "w", encoding="utf-8") as index, \
            open(work / DROPPED_FILE, "a", encoding="utf-8") as log, \
            Progress(total=total, desc="tokenize", unit="docs", enabled=config.progress) as bar, \
            tokenizer.encoding_workers(workers) as pool:
        for split in SPLITS:
            with TokenWriter(work / f"{split}.bin", tokenizer.vocab_size) as writer:
                docs = _kept(survivors[split], duplicates, log, split)
                while chunk := list(itertools.islice(docs, 2048)):
                    flat: list[int] = []
                    encoded = pool.encode([text for *_, text in chunk])
                    for (doc_id, label, source, _), ids in zip(chunk, encoded):
                        flat.append(eot)
                        row = {"id": doc_id, "split": split, "label": label, "offset": writer.num_tokens + len(flat),
                               "length": len(ids), "source": source}
                        index.write(json.dumps(row, ensure_ascii=False) + "\n")
                        flat.extend(ids)
                    writer.write(np.asarray(flat, dtype=np.int64))
                    bar.update(len(chunk), bytes=sum(len(text.encode("utf-8")) for *_, text in chunk))
            tokens[split] = writer.num_tokens
    return tokens


def iter_documents(folder: str | Path, split: str) -> Iterator[tuple[dict, np.ndarray]]:
    """(index row, token ids) of each kept document of a split in a prepared folder, in order: how
    classification finetuning finds labelled documents (`row["label"]`). The ids are a read-only
    view into the memory-mapped token file, without the <|endoftext|> before them."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    tokens = TokenFile(Path(folder) / f"{split}.bin").tokens
    path = Path(folder) / DOCUMENTS_FILE
    try:
        with open(path, encoding="utf-8") as index:
            for line in index:
                row = json.loads(line)
                if row["split"] == split:
                    yield row, tokens[row["offset"] : row["offset"] + row["length"]]
    except FileNotFoundError:
        raise DataError(f"{path}: not found: {folder} is not a prepared folder") from None
