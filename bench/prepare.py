"""Benchmark: throughput of the whole prepare pipeline (read, clean, redact, filter, deduplicate,
train the tokenizer, tokenize, write) on the IMDB train file, on 1 worker process and on all cores.

    python bench/prepare.py                        # ../shared/data/imdb_train.csv: 1 and all cores
    python bench/prepare.py --limit 5000           # the first 5,000 reviews only: quicker
    python bench/prepare.py --no-train_tokenizer   # prepare with a tokenizer trained beforehand
    python bench/prepare.py --workers 1,2,4

The peer is our own pipeline on one worker process, so the ratio printed is the speedup that
parallel cleaning and tokenization give. MB/s counts the UTF-8 bytes of the documents' text (the
review column; the CSV's quoting and labels are not counted). Timings on a shared machine are
noisy: compare runs made one right after the other.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere: the checkout's code

from minillm import cli  # noqa: E402
from minillm.data import PrepareConfig, prepare  # noqa: E402
from minillm.progress import format_duration  # noqa: E402
from minillm.sources import SourceConfig  # noqa: E402

SHARED = Path(os.environ.get("MINILLM_SHARED_DATA") or Path(__file__).resolve().parent.parent.parent / "shared" / "data")


@dataclass
class BenchConfig:
    """What to prepare and how often."""

    input: str = str(SHARED / "imdb_train.csv")  # a CSV file with the text in --text_field
    text_field: str = "review"  # the column holding the text
    limit: int = 0  # documents to read (0: all 25,000)
    vocab_size: int = 4096  # tokenizer vocabulary
    train_tokenizer: bool = True  # time training the tokenizer as part of each run
    workers: tuple[int, ...] = ()  # worker counts to time; empty: 1 and all cores


def main(argv: list[str] | None = None) -> None:
    bench = cli.parse_args(sys.argv[1:] if argv is None else argv, BenchConfig(), prog="bench/prepare.py",
                           description=__doc__.split("\n\n")[0])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = bench.workers or tuple(sorted({1, cores}))
    source = SourceConfig(input=[bench.input], text_field=bench.text_field, limit=bench.limit)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = None
        if not bench.train_tokenizer:
            begin = time.perf_counter()
            prepare(PrepareConfig(out=Path(tmp, "tok"), vocab_size=bench.vocab_size, progress=False), source)
            tokenizer = Path(tmp, "tok", "tokenizer.bpe")
            print(f"tokenizer trained beforehand in {format_duration(time.perf_counter() - begin)}")
        load = f"; load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
        print(f"input {bench.input} ({bench.limit or 'all'} documents), vocabulary {bench.vocab_size}, "
              f"{cores} cores{load}; tokenizer {'trained in each run' if tokenizer is None else 'given'}")
        print(f"{'workers':>7}  {'seconds':>8}  {'MB/s':>6}  {'speedup':>7}  stages")
        baseline = None
        for n in workers:
            config = PrepareConfig(out=Path(tmp, f"w{n}"), vocab_size=bench.vocab_size, num_workers=n,
                                   progress=False, tokenizer=tokenizer)
            begin = time.perf_counter()
            report = prepare(config, source)
            seconds = time.perf_counter() - begin
            rate = report["input_bytes"] / 1e6 / seconds
            baseline = baseline or rate
            stages = ", ".join(f"{k} {v:.1f}s" for k, v in report["stage_seconds"].items())
            print(f"{n:>7}  {seconds:>8.1f}  {rate:>6.2f}  {rate / baseline:>6.2f}x  {stages}", flush=True)
        if hasattr(os, "getloadavg"):  # other work on the machine skews the ratio: say how much there was
            print(f"load average after: {os.getloadavg()[0]:.1f} (more than {cores} means the cores were shared)")


if __name__ == "__main__":
    main()
