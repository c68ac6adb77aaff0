"""Training a byte-level BPE vocabulary, fast: count the chunks once, then update only what changes.

The textbook loop (karpathy/minbpe) recounts every adjacent pair of the whole corpus for every merge:
O(corpus x merges), about 80 s for 256 merges on tiny Shakespeare. Here:

1. Pre-split once (pretokenize.py) and count the distinct chunks: tiny Shakespeare's 300k chunks
   are 15k distinct words, each kept once with its frequency. Documents are independent, so this
   step runs on all cores; special-token strings in the text act as document boundaries (they are
   never learned as ordinary text).
2. Count every adjacent pair, weighted by chunk frequency, and keep an index pair -> the chunks that
   contain it.
3. Repeat: take the most frequent pair from a heap; rewrite only the chunks the index names; move
   their pair counts (old pairs down, new pairs up). Counts only ever fall, except for pairs with
   the new token, so the heap is lazy: an entry whose count has fallen since it was pushed is pushed
   again with its true count when it reaches the top; pairs with the new token are pushed once the
   merge is done. Every live pair thus has an entry at least as high as its true count, so the first
   entry popped that matches its pair's count is the true maximum.

The rules, which the textbook reference in tests/bpe_reference.py follows too (a property test checks
that the two agree merge for merge on random corpora):
- the pair with the highest count wins; equal counts go to the smallest pair (left id, then right
  id), a rule that needs no insertion order and that the heap gives for free;
- a pair whose merged bytes already form a token (say "a"+"bc" after "ab"+"c" made "abc") is
  skipped, so that every token has its own bytes and every file format can store the vocabulary;
- merges apply to a chunk left to right without overlap ("aaa" with "a"+"a" -> "aa","a");
- token ids: bytes 0..255 are themselves, merge number i makes id 256 + i.
Training stops early, with a warning, when no pair is left to merge.
"""

from __future__ import annotations

import heapq
import itertools
import warnings
from collections import Counter, defaultdict, deque
from collections.abc import Iterable, Iterator, Mapping

import regex

from minillm.progress import Progress
from minillm.tokenizer.bpe import gc_paused, merge_pair
from minillm.tokenizer.parallel import process_pool, resolve_workers
from minillm.tokenizer.pretokenize import Splitter

PIECE_CHARS = 1 << 18  # a long text is cut into pieces of about 256k characters for the workers
BATCH_CHARS = 1 << 20  # each task sent to a worker holds about this much text


def count_chunks(
    texts: str | Iterable[str],
    pattern: str = "gpt2",
    special_tokens: Iterable[str] = (),
    *,
    num_workers: int | None = None,
    verbose: bool = False,
) -> Counter[str]:
    """Pre-split `texts` (one string, or an iterable of documents) and count each distinct chunk."""
    splitter = Splitter(pattern)
    workers = resolve_workers(num_workers)
    total = len(texts) if isinstance(texts, str) else None
    counts: Counter[str] = Counter()
    with Progress(total, desc="pre-split", unit="chars", enabled=verbose) as progress:
        batches = _batches(_pieces(texts, splitter, special_tokens))
        head = [b for _, b in zip(range(2), batches)]
        if workers == 1 or len(head) < 2:  # a small corpus: starting processes would cost more
            for batch in itertools.chain(head, batches):
                for piece in batch:
                    counts.update(splitter.split(piece))
                progress.update(sum(map(len, batch)))
            return counts
        with process_pool(workers) as pool:
            pending: deque = deque()  # at most 2 tasks per worker in flight: memory stays bounded
            for batch in itertools.chain(head, batches):
                pending.append((pool.apply_async(_count_batch, (splitter.pattern, batch)), sum(map(len, batch))))
                while len(pending) > 2 * workers or (pending and pending[0][0].ready()):
                    result, chars = pending.popleft()
                    _add_counts(counts, result.get())
                    progress.update(chars)
            for result, chars in pending:
                _add_counts(counts, result.get())
                progress.update(chars)
    return counts


def _pieces(texts: str | Iterable[str], splitter: Splitter, special_tokens: Iterable[str]) -> Iterator[str]:
    """Documents, cut at special-token strings and then into safe pieces for the workers."""
    specials = sorted(set(special_tokens), key=len, reverse=True)
    cut = regex.compile("|".join(map(regex.escape, specials))) if specials else None
    for i, doc in enumerate([texts] if isinstance(texts, str) else texts):
        if not isinstance(doc, str):
            raise TypeError(f"training texts must be strings; document {i} is {type(doc).__name__}")
        for part in cut.split(doc) if cut is not None else (doc,):
            yield from splitter.safe_pieces(part, PIECE_CHARS)


def _batches(pieces: Iterator[str]) -> Iterator[list[str]]:
    batch, size = [], 0
    for piece in pieces:
        batch.append(piece)
        size += len(piece)
        if size >= BATCH_CHARS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _count_batch(pattern: str, batch: list[str]) -> Counter[str]:
    """Worker side: the chunk counts of a batch of text pieces."""
    splitter = Splitter(pattern)
    counts: Counter[str] = Counter()
    for piece in batch:
        counts.update(splitter.split(piece))
    return counts


def _add_counts(total: Counter[str], part: Counter[str]) -> None:
    if not total:
        total.update(part)
        return
    get = total.get
    for chunk, n in part.items():
        total[chunk] = get(chunk, 0) + n


def train_bpe(chunk_counts: Mapping[str, int], num_merges: int, *, verbose: bool = False) -> list[tuple[int, int]]:
    """Learn up to `num_merges` merges from chunk -> count; merge i makes token 256 + i."""
    with gc_paused():  # millions of pair tuples and index sets, none in a cycle
        merges = _learn_merges(chunk_counts, num_merges, verbose)
    if len(merges) < num_merges:
        warnings.warn(
            f"BPE training stopped after {len(merges)} of {num_merges} merges: no pair of tokens is left "
            "to merge (the training text is too small for this vocabulary size)",
            stacklevel=3,
        )
    return merges


def _learn_merges(chunk_counts: Mapping[str, int], num_merges: int, verbose: bool) -> list[tuple[int, int]]:
    words: list[list[int]] = []  # each distinct chunk as its current token ids
    freqs: list[int] = []
    for chunk, n in chunk_counts.items():
        ids = list(chunk.encode("utf-8", "surrogatepass"))
        if len(ids) >= 2 and n > 0:
            words.append(ids)
            freqs.append(n)
    counts: defaultdict[tuple[int, int], int] = defaultdict(int)  # pair -> occurrences in the corpus
    where: defaultdict[tuple[int, int], set[int]] = defaultdict(set)  # pair -> words that (may) hold it
    for w, (ids, n) in enumerate(zip(words, freqs)):
        for pair in zip(ids, ids[1:]):
            counts[pair] += n
            where[pair].add(w)
    heap = [(-n, pair) for pair, n in counts.items()]
    heapq.heapify(heap)
    vocab = [bytes([i]) for i in range(256)]
    known = set(vocab)
    merges: list[tuple[int, int]] = []
    with Progress(num_merges, desc="merges", unit="merges", enabled=verbose) as progress:
        while len(merges) < num_merges and heap:
            negative, pair = heapq.heappop(heap)
            n = counts.get(pair, 0)
            if n != -negative:  # stale: the count fell since this entry was pushed
                if n > 0:
                    heapq.heappush(heap, (-n, pair))
                continue
            merged = vocab[pair[0]] + vocab[pair[1]]
            if merged in known:  # these bytes are a token already: skip the pair for good
                continue
            new_id = len(vocab)
            merges.append(pair)
            vocab.append(merged)
            known.add(merged)
            new_pairs = set()
            for w in where.pop(pair):
                ids = words[w]
                merged_ids = merge_pair(ids, pair, new_id)
                if len(merged_ids) == len(ids):
                    continue  # the index is lazy too: this word lost the pair in an earlier merge
                f = freqs[w]
                for p in zip(ids, ids[1:]):
                    counts[p] -= f
                for p in zip(merged_ids, merged_ids[1:]):
                    counts[p] += f
                    if new_id in p:
                        new_pairs.add(p)
                        where[p].add(w)
                words[w] = merged_ids
            del counts[pair]  # now zero
            for p in new_pairs:
                heapq.heappush(heap, (-counts[p], p))
            progress.update(1)
    return merges
