"""Tokenizer benchmark: our code and the named peer, in one process, on the same input; ratios printed.

    python bench/tokenizer.py                          # the whole table, a few minutes on 2 cores
    python bench/tokenizer.py --vocab_sizes=512 --textbook_merges=10 --imdb_docs=500   # a quick look

Training: seconds to learn a vocabulary of 512, 2048 and 8192 ids on tiny Shakespeare (1.1 MB, one
document) and a slice of the IMDB reviews (one document per review), against Hugging Face
`tokenizers`' byte-level BpeTrainer (Rust, multi-threaded; the target is at most 3x its time), and
against the textbook loop in tests/bpe_reference.py (recount every pair for every merge; target: at
least 50x faster) on the same number of merges, `--textbook_merges`, since the textbook loop at 8192
would take hours; the merges of both are checked equal.

Encoding: MB/s of UTF-8 text with GPT-2's vocabulary (from ../shared/data, no download) against
tiktoken (Rust), one process on one long text, and a batch of documents over all CPUs (our processes,
tiktoken's threads). "cold" is a new tokenizer's first pass (every distinct chunk goes through BPE);
"warm" is a later pass (our chunk cache holds them). The ids are checked equal to tiktoken's.
Targets: single >= 0.33x tiktoken, batch >= 0.5x tiktoken's batch.
Timings are the best of `--repeats`. On a shared machine wall-clock time is noisy (with other work
running, two processes do not get two cores), so the encoding table also gives the ratio of CPU
seconds spent (ours: this process and its workers; tiktoken: all its threads), which load barely moves.
"""

from __future__ import annotations

import csv
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]  # run from anywhere; the textbook reference lives in tests/

import bpe_reference  # noqa: E402
from minillm.cli import format_config, parse_args  # noqa: E402
from minillm.tokenizer import EOT, GPT2_PATTERN, Tokenizer  # noqa: E402
from minillm.tokenizer.parallel import cpu_count  # noqa: E402


@dataclass
class BenchConfig:
    data: str = ""  # the shared data folder (empty: $MINILLM_SHARED_DATA or ../shared/data)
    imdb_docs: int = 3000  # reviews in the IMDB slice (the first rows of imdb_train.csv)
    vocab_sizes: tuple[int, ...] = (512, 2048, 8192)  # vocabulary sizes to train
    textbook_merges: int = 50  # merges for the textbook comparison (it takes ~0.3 s per merge on Shakespeare)
    repeats: int = 3  # each timing is the best of this many runs
    workers: int = 0  # processes / threads for the batch runs (0: every CPU)
    sections: tuple[str, ...] = ("train", "textbook", "encode")  # which parts to run


def cpu_seconds() -> float:
    """CPU time of this process (all threads) and of its children that have exited."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def best_time(fn, repeats: int):
    """(wall seconds of the fastest run, its CPU seconds, the result of the last run)."""
    best, best_cpu, result = float("inf"), float("inf"), None
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), cpu_seconds()
        result = fn()
        wall, cpu = time.perf_counter() - start, cpu_seconds() - start_cpu
        if wall < best:
            best, best_cpu = wall, cpu
    return best, best_cpu, result


def best_cold(make, fn, repeats: int):
    """`best_time` of fn(tokenizer), each run on a new tokenizer (an empty cache) from make()."""
    runs = []
    for _ in range(repeats):
        tokenizer = make()
        runs.append(best_time(lambda: fn(tokenizer), 1))
    return min(runs, key=lambda run: run[0])


def load_corpora(folder: Path, imdb_docs: int) -> dict[str, list[str]]:
    shakespeare = (folder / "tinyshakespeare.txt").read_text(encoding="utf-8")
    with open(folder / "imdb_train.csv", encoding="utf-8", newline="") as f:
        rows = csv.reader(f)
        next(rows)
        reviews = [row[0] for _, row in zip(range(imdb_docs), rows)]
    return {"tinyshakespeare": [shakespeare], f"imdb[:{imdb_docs}]": reviews}


def size_mb(docs: list[str]) -> float:
    return sum(len(d.encode("utf-8")) for d in docs) / 1e6


def bench_training(config: BenchConfig, corpora: dict[str, list[str]]) -> None:
    try:
        import tokenizers
    except ImportError:
        tokenizers = None
    print("\n## training: seconds (lower is better); target minillm <= 3x Hugging Face tokenizers")
    print(f"{'corpus':<22} {'MB':>5} {'vocab':>6} {'minillm':>9} {'HF tokenizers':>14} {'minillm/HF':>11}")
    for name, docs in corpora.items():
        texts = docs[0] if len(docs) == 1 else docs
        for vocab_size in config.vocab_sizes:
            ours, _, _ = best_time(lambda: Tokenizer.train(texts, vocab_size, special_tokens=(EOT,)), config.repeats)
            line = f"{name:<22} {size_mb(docs):>5.1f} {vocab_size:>6} {ours:>8.2f}s"
            if tokenizers is not None:
                def hf_train():
                    hf = tokenizers.Tokenizer(tokenizers.models.BPE())
                    hf.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
                    trainer = tokenizers.trainers.BpeTrainer(
                        vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
                    )
                    hf.train_from_iterator(docs, trainer=trainer)
                    return hf

                theirs, _, hf = best_time(hf_train, config.repeats)
                assert hf.get_vocab_size() == vocab_size
                line += f" {theirs:>13.2f}s {ours / theirs:>10.2f}x"
            else:
                line += "   (tokenizers not installed)"
            print(line, flush=True)


def bench_textbook(config: BenchConfig, corpora: dict[str, list[str]]) -> None:
    text = corpora["tinyshakespeare"][0]
    n = config.textbook_merges
    ours, _, tok = best_time(lambda: Tokenizer.train(text, 256 + n, special_tokens=()), config.repeats)
    start = time.perf_counter()
    textbook_merges = bpe_reference.train(bpe_reference.split([text]), n)
    textbook = time.perf_counter() - start
    assert [m[:2] for m in tok.merges] == textbook_merges, "the fast and the textbook trainer disagree"
    print(f"\n## training vs the textbook loop (tests/bpe_reference.py), tinyshakespeare, {n} merges each, same merges")
    print(f"textbook {textbook:.2f}s  minillm {ours:.3f}s  ->  minillm is {textbook / ours:.0f}x faster (target >= 50x)")
    full = max(config.vocab_sizes) - 257
    per_merge = textbook / n
    print(f"(at {full} merges the textbook loop would take about {per_merge * full / 60:.0f} min at its "
          f"{per_merge:.2f} s/merge; it gets a little faster per merge as chunks shrink)")


def bench_encoding(config: BenchConfig, corpora: dict[str, list[str]], folder: Path) -> None:
    try:
        import tiktoken
        from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    except ImportError:
        print("\n## encoding: skipped (tiktoken not installed)")
        return
    os.environ["TIKTOKEN_CACHE_DIR"] = ""  # tiktoken would copy the local files into /tmp otherwise
    ranks = data_gym_to_mergeable_bpe_ranks(str(folder / "vocab.bpe"), str(folder / "encoder.json"))
    enc = tiktoken.Encoding("gpt2-local", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={EOT: 50256})
    gpt2 = Tokenizer.from_gpt2_files(folder / "encoder.json", folder / "vocab.bpe")
    workers = config.workers or cpu_count()

    def fresh() -> Tokenizer:  # the same tokenizer with an empty chunk cache
        return Tokenizer(gpt2.pattern, gpt2.byte_ids, gpt2.merges, gpt2.special_tokens)

    print(f"\n## encoding with GPT-2's vocabulary: MB/s (higher is better); batch = {workers} processes / threads")
    print(f"{'text':<22} {'MB':>5} {'mode':<14} {'minillm':>8} {'tiktoken':>9} {'ratio':>7} {'CPU-time ratio':>15}  target")
    for name, docs in corpora.items():
        mb = size_mb(docs)
        text = "\n".join(docs)
        batch = text.split("\n\n") if len(docs) == 1 else docs  # Shakespeare: one document per speech
        single = best_time(lambda: enc.encode_ordinary(text), config.repeats)
        cold = best_cold(fresh, lambda tok: tok.encode_ordinary(text), config.repeats)
        tok = fresh()
        tok.encode_ordinary(text)
        warm = best_time(lambda: tok.encode_ordinary(text), config.repeats)
        assert cold[2] == warm[2] == single[2], f"{name}: our ids differ from tiktoken's"
        many = best_time(lambda: enc.encode_ordinary_batch(batch, num_threads=workers), config.repeats)
        cold_many = best_cold(fresh, lambda tok: tok.encode_batch(batch, num_workers=workers), config.repeats)
        tok = fresh()
        tok.encode_batch(batch, num_workers=workers)
        warm_many = best_time(lambda: tok.encode_batch(batch, num_workers=workers), config.repeats)
        assert cold_many[2] == warm_many[2] == many[2], f"{name}: our batch ids differ from tiktoken's"
        for mode, ours, peer, target in (
            ("single, cold", cold, single, 0.33), ("single, warm", warm, single, 0.33),
            ("batch, cold", cold_many, many, 0.5), ("batch, warm", warm_many, many, 0.5),
        ):
            ratio, cpu_ratio = peer[0] / ours[0], peer[1] / max(ours[1], 1e-9)
            print(f"{name:<22} {mb:>5.1f} {mode:<14} {mb / ours[0]:>8.1f} {mb / peer[0]:>9.1f} {ratio:>6.2f}x "
                  f"{cpu_ratio:>14.2f}x  >= {target}x {'ok' if ratio >= target else 'MISSED'}", flush=True)


def main(argv: list[str] | None = None) -> None:
    config = parse_args(sys.argv[1:] if argv is None else argv, BenchConfig(), prog="bench/tokenizer.py", description=__doc__)
    folder = Path(config.data or os.environ.get("MINILLM_SHARED_DATA") or REPO.parent / "shared" / "data")
    if not (folder / "encoder.json").is_file():
        raise SystemExit(f"bench/tokenizer.py: shared data not found in {folder} (pass --data=FOLDER)")
    print(format_config(config))
    print(f"python {sys.version.split()[0]}, {cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} (other work skews timings)")
    corpora = load_corpora(folder, config.imdb_docs)
    warnings.simplefilter("ignore")  # a tiny --imdb_docs may run out of pairs; not what is measured
    if "train" in config.sections:
        bench_training(config, corpora)
    if "textbook" in config.sections:
        bench_textbook(config, corpora)
    if "encode" in config.sections:
        bench_encoding(config, corpora, folder)
    print(f"\nload average at the end {os.getloadavg()[0]:.1f} on {cpu_count()} CPUs")


if __name__ == "__main__":
    main()
