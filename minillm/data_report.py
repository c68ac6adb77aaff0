"""The data preparation report: the tallies kept while preparing, `report.json`, and its table.

Every record read ends in exactly one outcome: "kept", or dropped for one of REASONS. The tallies
are kept per (split, label, outcome), so for every split and label, and in total,

    read == kept + empty + too_short + low_quality + exact_duplicate + near_duplicate
                 + cross_split_duplicate + bad_record

`check_accounting(report)` verifies that identity on a finished report (the tests run it on random
corpora; `prepare.py --stats` runs it on a folder). `format_report` is the table `prepare.py`
prints at the end and `--stats` prints again.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minillm.cleaning import PII_KINDS
from minillm.progress import format_duration
from minillm.sources import SPLITS, DataError

REPORT_FILE = "report.json"
REASONS = ("empty", "too_short", "low_quality", "exact_duplicate", "near_duplicate", "cross_split_duplicate",
           "bad_record")
NO_SPLIT = "unknown"  # the split of a bad record whose input gave none
CLEANING_STEPS = ("html", "nfc", "control", "whitespace", "lowercase")
_HEADINGS = ("empty", "too_short", "low_quality", "exact_dup", "near_dup", "cross_split", "bad_record")


@dataclass
class Accounts:
    """Running tallies while preparing; `build_report` turns them into the report."""

    outcomes: Counter = field(default_factory=Counter)  # (split, label, outcome) -> documents
    changed: Counter = field(default_factory=Counter)  # cleaning step -> documents it changed
    redacted: Counter = field(default_factory=Counter)  # (kind, "count" | "chars") -> total
    low_quality: Counter = field(default_factory=Counter)  # which test failed -> documents
    overlap: Counter = field(default_factory=Counter)  # (split, split of the copy, exact|near) -> documents
    examples: dict = field(default_factory=lambda: {"bad_record": [], "cross_split": []})
    raw_bytes: int = 0  # UTF-8 bytes of all document texts read

    def example(self, kind: str, item: dict, keep: int = 20) -> None:
        if len(self.examples[kind]) < keep:
            self.examples[kind].append(item)


def _empty_tally() -> dict:
    return {"read": 0, "kept": 0, "dropped": dict.fromkeys(REASONS, 0)}


def _add(total: dict, part: dict) -> None:
    total["read"] += part["read"]
    total["kept"] += part["kept"]
    for reason, n in part["dropped"].items():
        total["dropped"][reason] += n


def _row_order(row: dict) -> tuple:
    return (SPLITS + (NO_SPLIT,)).index(row["split"]), row["label"] is not None, str(row["label"])


def build_report(accounts: Accounts, *, tokens: dict[str, int], dtype: str, vocab_size: int, eot_id: int,
                 tokenizer: str, inputs: list[str], cross_split_removed: bool, near_dedup: dict | None,
                 configs: dict[str, dict], seconds: float, stage_seconds: dict[str, float]) -> dict[str, Any]:
    """The report as a JSON-ready dict."""
    rows: dict[tuple, dict] = {}
    for (split, label, outcome), n in accounts.outcomes.items():
        row = rows.setdefault((split, label), {"split": split, "label": label, **_empty_tally()})
        row["read"] += n
        if outcome == "kept":
            row["kept"] += n
        else:
            row["dropped"][outcome] += n
    ordered = sorted(rows.values(), key=_row_order)
    splits = {split: _empty_tally() for split in SPLITS}
    totals = _empty_tally()
    for row in ordered:
        _add(splits.setdefault(row["split"], _empty_tally()), row)
        _add(totals, row)
    for split in SPLITS:
        splits[split]["tokens"] = tokens.get(split, 0)
    pairs = sorted({(a, b) for a, b, _ in accounts.overlap})
    return {
        "format": "minillm-prepared-corpus",
        "version": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(seconds, 2),
        "stage_seconds": stage_seconds,
        "input_bytes": accounts.raw_bytes,
        "inputs": inputs,
        "totals": totals,
        "splits": splits,
        "rows": ordered,
        "tokens": {"per_split": {s: tokens.get(s, 0) for s in SPLITS}, "dtype": dtype, "vocab_size": vocab_size,
                   "eot_id": eot_id, "tokenizer": tokenizer},
        "cleaning": {step: accounts.changed[step] for step in CLEANING_STEPS},
        "redacted": {kind: {"count": accounts.redacted[kind, "count"], "chars": accounts.redacted[kind, "chars"]}
                     for kind in PII_KINDS},
        "low_quality": dict(accounts.low_quality),
        "cross_split": {"removed": cross_split_removed,
                        "pairs": [{"split": a, "copies_of": b, "exact": accounts.overlap[a, b, "exact"],
                                   "near": accounts.overlap[a, b, "near"]} for a, b in pairs],
                        "examples": accounts.examples["cross_split"]},
        "near_dedup": near_dedup,
        # the first 1,000 bad records with their locations (dropped.jsonl lists every one)
        "bad_records": {"count": totals["dropped"]["bad_record"], "examples": accounts.examples["bad_record"]},
        "configs": configs,
    }


def check_accounting(report: dict) -> list[str]:
    """Where read != kept + dropped (per row, per split, in total); empty when everything adds up."""
    problems = []
    tallies = [(f"{r['split']}/{r['label']}", r) for r in report["rows"]]
    tallies += [(split, t) for split, t in report["splits"].items()] + [("total", report["totals"])]
    for name, t in tallies:
        if t["read"] != t["kept"] + sum(t["dropped"].values()):
            problems.append(f"{name}: read {t['read']} != kept {t['kept']} + dropped {sum(t['dropped'].values())}")
    for key in ("read", "kept"):
        if sum(r[key] for r in report["rows"]) != report["totals"][key]:
            problems.append(f"rows do not add up to the total {key}")
    return problems


def load_report(folder: str | Path) -> dict:
    path = Path(folder) / REPORT_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: not found: {folder} is not a prepared folder, or its preparation did not "
                        f"finish") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err})") from None


def format_report(report: dict) -> str:
    """The report as the table prepare.py prints."""
    totals, seconds = report["totals"], report["seconds"]
    mb = report["input_bytes"] / 1e6
    stages = ", ".join(f"{k} {format_duration(v)}" for k, v in report.get("stage_seconds", {}).items())
    lines = [f"read {totals['read']:,} documents ({mb:.1f} MB of text) in {format_duration(seconds)} "
             f"({mb / max(seconds, 1e-9):.2f} MB/s; {stages}): kept {totals['kept']:,}, "
             f"dropped {sum(totals['dropped'].values()):,}"]
    table = [("split", "label", "read", "kept", *_HEADINGS)]

    def add(split: str, label: str, t: dict) -> None:
        table.append((split, label, f"{t['read']:,}", f"{t['kept']:,}", *(f"{t['dropped'][r]:,}" for r in REASONS)))

    for split, t in report["splits"].items():
        rows = [r for r in report["rows"] if r["split"] == split]
        for r in rows:
            add(split, "-" if r["label"] is None else str(r["label"]), r)
        if len(rows) != 1:
            add(split, "(all)", t)
    add("all", "", totals)
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        lines.append("  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in
                               enumerate(zip(row, widths))).rstrip())
    tok = report["tokens"]
    lines.append("tokens: " + " | ".join(f"{s} {n:,}" for s, n in tok["per_split"].items())
                 + f"  ({tok['dtype']}, vocabulary {tok['vocab_size']:,}, <|endoftext|> = {tok['eot_id']} "
                   f"before every document; tokenizer {tok['tokenizer']})")
    lines.append("cleaning, documents changed: " + " | ".join(f"{k} {v:,}" for k, v in report["cleaning"].items()))
    lines.append("redacted: " + " | ".join(f"{kind} {v['count']:,} ({v['chars']:,} chars)"
                                           for kind, v in report["redacted"].items()))
    if report["low_quality"]:
        lines.append("low quality: " + " | ".join(f"{k} {v:,}" for k, v in report["low_quality"].items()))
    cross = report["cross_split"]
    for pair in cross["pairs"]:
        verb = f"removed from {pair['split']}" if cross["removed"] else "kept (--no-cross_split_dedup)"
        lines.append(f"cross-split: {pair['exact'] + pair['near']:,} {pair['split']} documents copy "
                     f"{pair['copies_of']} documents (exact {pair['exact']:,}, near {pair['near']:,}): {verb}")
    if report["bad_records"]["count"]:
        first = report["bad_records"]["examples"][0]["message"]
        lines.append(f"bad records: {report['bad_records']['count']:,} skipped (first: {first}); "
                     f"all are listed in dropped.jsonl")
    problems = check_accounting(report)
    if problems:
        lines.append("WARNING: the counts do not add up: " + "; ".join(problems))
    return "\n".join(lines)
