"""The textbook BPE, written as plainly as possible, to check the fast one against (and to time it).

Training recounts every adjacent pair of every chunk occurrence for every merge, as karpathy/minbpe
does; it follows the rules minillm/tokenizer/train.py documents (highest count; ties to the smallest
pair; a pair whose bytes already form a token is skipped; ids 256, 257, ... in merge order).
Encoding applies the merges one after another, each over the whole chunk, as GPT-2's paper describes.
Nothing here is shared with minillm's code, so agreement means something.
"""

import regex

GPT2_ORIGINAL_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def split(docs, pattern=GPT2_ORIGINAL_PATTERN):
    return [chunk for doc in docs for chunk in regex.findall(pattern, doc)]


def merge(ids, pair, new_id):
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def train(chunks, num_merges):
    """chunks: every pre-split chunk of the corpus (repeats included). Returns the merged pairs."""
    words = [list(chunk.encode("utf-8")) for chunk in chunks]
    vocab = {i: bytes([i]) for i in range(256)}
    known = set(vocab.values())
    merges = []
    while len(merges) < num_merges:
        counts = {}
        for ids in words:
            for pair in zip(ids, ids[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        candidates = [(-n, pair) for pair, n in counts.items() if vocab[pair[0]] + vocab[pair[1]] not in known]
        if not candidates:
            break
        _, best = min(candidates)  # highest count, then the smallest pair
        new_id = 256 + len(merges)
        vocab[new_id] = vocab[best[0]] + vocab[best[1]]
        known.add(vocab[new_id])
        merges.append(best)
        words = [merge(ids, best, new_id) for ids in words]
    return merges


def encode_chunk(chunk_bytes, merges):
    """merges: (left, right) pairs, merge i making id 256 + i (byte b is id b)."""
    ids = list(chunk_bytes)
    for i, pair in enumerate(merges):
        ids = merge(ids, pair, 256 + i)
    return ids
