"""The Tokenizer: text <-> token ids with a byte-level BPE vocabulary, special tokens, streaming decode.

A tokenizer is four things, and nothing else: the split pattern, the id of each of the 256 bytes,
the ordered merges (left id, right id) -> new id, and the special tokens (string -> id). Everything
else is derived. Byte ids need not be 0..255 (GPT-2's are a permutation of them; a Hugging Face
tokenizer may put special tokens first), and every token's bytes are distinct.

Encoding is split (pretokenize.py), then BPE per chunk (bpe.py). Text repeats its words, so each
distinct chunk is encoded once and kept in a cache; a hit costs one dict lookup, run from C through
`map(cache.__getitem__, chunks)`, with `dict.__missing__` handling a miss. A short text encodes a
new chunk on the spot. A long one (or a batch) first notes all its new chunks, then encodes them
together with numpy (bpe.encode_chunks_batch), which is what makes a first pass over a corpus fast.
The cache is cleared when it holds CACHE_LIMIT chunks, which bounds its memory (about 30 MB).
Tokenizers can be shared between threads: the cache only ever holds finished entries. Long texts
are encoded with Python's cyclic garbage collector paused (see bpe.gc_paused: it cost up to 40%).

Special tokens follow tiktoken: `encode(text)` raises ValueError if text contains a special token's
string, because text from users must never turn into a control token by accident (a document that
mentions "<|endoftext|>" must not end the document). `allowed_special={"<|endoftext|>"}` (or "all")
encodes those strings as their ids; `encode_ordinary(text)` encodes them as plain text.

Text with lone surrogates (not valid Unicode, but possible in a Python str) has them replaced by
U+FFFD before encoding, as tiktoken does. `encode_bytes` takes arbitrary bytes, valid UTF-8 or not,
and `decode_bytes(encode_bytes(b)) == b` always.
"""

from __future__ import annotations

import codecs
import sys
import time
from collections.abc import Iterable
from itertools import chain

import regex

from minillm.tokenizer import parallel
from minillm.tokenizer.bpe import PairTable, encode_chunk, encode_chunks_batch, gc_paused, render
from minillm.tokenizer.pretokenize import PATTERNS, Splitter
from minillm.tokenizer.train import count_chunks, train_bpe

TOKENIZER_FILE = "tokenizer.bpe"  # its name inside checkpoint folders and prepare.py outputs
EOT = "<|endoftext|>"
CACHE_LIMIT = 1 << 17  # distinct chunks kept before the cache is cleared
PARALLEL_MIN_CHARS = 1 << 20  # encode_batch(num_workers=None) stays in-process below this much text
DEFER_MIN_CHUNKS = 512  # from this many chunks on, new chunks are collected and encoded together
BATCH_MIN_NEW = 64  # ... with numpy when there are at least this many of them
BATCH_MAX_BYTES = 64  # longer new chunks are encoded one at a time


class _ChunkCache(dict):
    """chunk text -> its token ids (a tuple), shared by all calls; a missing chunk is encoded on the
    spot. (Tuples of ints drop out of the garbage collector's sight; lists would be rescanned.)"""

    def __init__(self, byte_ids, ranks, results):
        super().__init__()
        self.byte_ids, self.ranks, self.results = byte_ids, ranks, results
        # bytes.translate maps bytes to ids in C when every byte id fits in a byte (GPT-2, tiktoken, ours)
        self.byte_table = bytes(byte_ids) if max(byte_ids) < 256 else None

    def encode(self, data: bytes) -> list[int]:
        ids = list(data.translate(self.byte_table)) if self.byte_table else [self.byte_ids[b] for b in data]
        return encode_chunk(ids, self.ranks, self.results)

    def __missing__(self, chunk: str) -> tuple[int, ...]:
        ids = tuple(self.encode(chunk.encode("utf-8")))
        if len(self) >= CACHE_LIMIT:
            self.clear()
        self[chunk] = ids
        return ids


class _NewChunks(dict):
    """One call's view of the cache: a chunk the cache lacks gets an empty list, to be filled in
    once all of the call's new chunks are known (they are then encoded together). Only this call
    sees the unfilled lists, so the shared cache stays correct for other threads."""

    def __init__(self, cache: _ChunkCache):
        super().__init__()
        self.cache = cache
        self.new_chunks: list[str] = []
        self.new_ids: list[list[int]] = []

    def __missing__(self, chunk: str):
        ids = self.cache.get(chunk)
        if ids is None:
            ids = []
            self.new_chunks.append(chunk)
            self.new_ids.append(ids)
        self[chunk] = ids
        return ids


class InvalidTokenError(ValueError):
    """A byte, merge or special token that cannot be defined. `where` says which: ("byte", byte value),
    ("merge", rank) or ("special", token string), so a file loader can name the line that holds it."""

    def __init__(self, message: str, where: tuple | None = None):  # where has a default: it pickles
        super().__init__(message)
        self.where = where


class Tokenizer:
    """A byte-level BPE tokenizer. Build one with `train`, `load` or one of the importers."""

    def __init__(
        self,
        pattern: str,
        byte_ids: Iterable[int],
        merges: Iterable[tuple[int, int, int]],
        special_tokens: dict[str, int] | None = None,
    ):
        """pattern: "gpt2", "cl100k" or a regex; byte_ids: the id of byte 0..255;
        merges: (left id, right id, new id) in rank order; special_tokens: string -> id."""
        self._splitter = Splitter(pattern)
        self.pattern = self._splitter.pattern
        self.byte_ids = tuple(int(i) for i in byte_ids)
        self.merges = tuple((int(a), int(b), int(c)) for a, b, c in merges)
        self.special_tokens = dict(special_tokens or {})
        if len(self.byte_ids) != 256:
            raise ValueError(f"byte_ids must give an id for each of the 256 bytes, got {len(self.byte_ids)}")
        vocab: dict[int, bytes] = {}
        owner: dict[bytes, int] = {}  # the bytes of each ordinary token -> its id

        def define(token_id: int, data: bytes, what: str, where: tuple, ordinary: bool = True) -> None:
            if token_id < 0:
                raise InvalidTokenError(f"{what}: token id {token_id} is negative", where)
            if token_id in vocab:
                raise InvalidTokenError(f"{what}: token id {token_id} is already {render(vocab[token_id])}", where)
            if ordinary and data in owner:
                raise InvalidTokenError(f"{what}: its bytes {render(data)} are already token {owner[data]}; "
                                        f"every token needs its own bytes", where)
            vocab[token_id] = data
            if ordinary:
                owner[data] = token_id

        for byte, token_id in enumerate(self.byte_ids):
            define(token_id, bytes([byte]), f"byte {byte:#04x}", ("byte", byte))
        for rank, (a, b, new) in enumerate(self.merges):
            if a not in vocab or b not in vocab:
                missing = a if a not in vocab else b
                raise InvalidTokenError(f"merge {rank} ({a} + {b} -> {new}) uses token {missing}, which no earlier "
                                        f"byte or merge made", ("merge", rank))
            define(new, vocab[a] + vocab[b], f"merge {rank} ({a} + {b} -> {new})", ("merge", rank))
        for token, token_id in list(self.special_tokens.items()):
            if not isinstance(token, str) or not token:
                raise ValueError(f"special tokens must be non-empty strings, got {token!r}")
            self.special_tokens[token] = int(token_id)
            define(int(token_id), token.encode("utf-8"), f"special token {token!r}", ("special", token), ordinary=False)
        self.vocab_size = max(vocab) + 1
        self._vocab: list[bytes | None] = [vocab.get(i) for i in range(self.vocab_size)]
        self._ranks = {(a, b): rank for rank, (a, b, _) in enumerate(self.merges)}
        self._results = [new for _, _, new in self.merges]
        self._cache = _ChunkCache(self.byte_ids, self._ranks, self._results)
        self._pair_table: PairTable | None = None  # built on first use by _encode_new
        specials = sorted(self.special_tokens, key=len, reverse=True)  # longest first: "<|a|>b" before "<|a|>"
        self._special_cut = regex.compile("|".join(map(regex.escape, specials))) if specials else None

    # ----- building -------------------------------------------------------------------------------

    @classmethod
    def train(
        cls,
        texts: str | Iterable[str],
        vocab_size: int,
        *,
        pattern: str = "gpt2",
        special_tokens: Iterable[str] = (EOT,),
        verbose: bool = False,
        num_workers: int | None = None,
    ) -> "Tokenizer":
        """Learn a vocabulary of `vocab_size` ids (256 bytes + merges + special tokens) from `texts`:
        one string, or an iterable of documents (streamed, never held all at once)."""
        specials = list(dict.fromkeys(special_tokens))
        if not all(isinstance(token, str) and token for token in specials):
            raise ValueError(f"special tokens must be non-empty strings, got {specials!r}")
        if not isinstance(vocab_size, int) or vocab_size < 256 + len(specials):
            raise ValueError(f"vocab_size must be an integer of at least 256 + {len(specials)} special tokens, got {vocab_size!r}")
        start = time.perf_counter()
        counts = count_chunks(texts, pattern, specials, num_workers=num_workers, verbose=verbose)
        merges = train_bpe(counts, vocab_size - 256 - len(specials), verbose=verbose)
        n = len(merges)
        tokenizer = cls(
            pattern,
            range(256),
            [(a, b, 256 + i) for i, (a, b) in enumerate(merges)],
            {token: 256 + n + i for i, token in enumerate(specials)},
        )
        if verbose:
            print(
                f"trained {tokenizer!r} on {sum(counts.values()):,} chunks ({len(counts):,} distinct) "
                f"in {time.perf_counter() - start:.1f}s",
                file=sys.stderr,
            )
        return tokenizer

    # The file modules build Tokenizers, so they import this module; it imports them when called.

    @classmethod
    def load(cls, path) -> "Tokenizer":
        """Read our own format (bpe_file.py); a damaged file or unknown version raises TokenizerFileError."""
        from minillm.tokenizer.bpe_file import load_bpe

        return load_bpe(path)

    def save(self, path) -> None:
        from minillm.tokenizer.bpe_file import save_bpe

        save_bpe(self, path)

    @classmethod
    def from_gpt2_files(cls, encoder_json, vocab_bpe, *, pattern: str = "gpt2") -> "Tokenizer":
        """GPT-2's encoder.json + vocab.bpe, which are also Hugging Face's vocab.json + merges.txt."""
        from minillm.tokenizer.formats import load_gpt2_files

        return load_gpt2_files(encoder_json, vocab_bpe, pattern=pattern)

    def save_gpt2_files(self, folder) -> None:
        """Write vocab.json + merges.txt (Hugging Face's names for GPT-2's two files) into `folder`."""
        from minillm.tokenizer.formats import save_gpt2_files

        save_gpt2_files(self, folder)

    @classmethod
    def from_tiktoken_file(cls, path, *, pattern: str, special_tokens: dict[str, int] | None = None) -> "Tokenizer":
        """A tiktoken rank file; it stores neither the split pattern nor the special tokens."""
        from minillm.tokenizer.formats import load_tiktoken

        return load_tiktoken(path, pattern=pattern, special_tokens=special_tokens)

    def save_tiktoken_file(self, path) -> None:
        from minillm.tokenizer.formats import save_tiktoken

        save_tiktoken(self, path)

    @classmethod
    def from_hf_tokenizer_json(cls, path, *, pattern: str | None = None) -> "Tokenizer":
        """A Hugging Face tokenizer.json holding a byte-level BPE model."""
        from minillm.tokenizer.formats import load_hf_tokenizer_json

        return load_hf_tokenizer_json(path, pattern=pattern)

    def vocab_dump(self) -> str:
        """Every token, one per line, with its bytes as text and the merge that made it."""
        from minillm.tokenizer.formats import vocab_dump

        return vocab_dump(self)

    # ----- encoding -------------------------------------------------------------------------------

    def encode(self, text: str, *, allowed_special: str | Iterable[str] = "none") -> list[int]:
        """Text -> ids. A special token's string in `text` is an error unless `allowed_special`
        ("all", or a set of token strings) allows it; allowed ones become their special ids."""
        allowed = self._allowed(allowed_special)
        for token, token_id in self.special_tokens.items():
            if token not in allowed and token in text:
                raise ValueError(
                    f"text contains the special token {token!r} at character {text.find(token)}; "
                    f"pass allowed_special={{{token!r}}} (or 'all') to encode it as token {token_id}, "
                    "or call encode_ordinary() to encode it as plain text"
                )
        if not allowed:
            return self.encode_ordinary(text)
        cut = self._special_cut if len(allowed) == len(self.special_tokens) else regex.compile(
            "|".join(map(regex.escape, sorted(allowed, key=len, reverse=True)))
        )
        ids: list[int] = []
        start = 0
        for match in cut.finditer(text):
            ids += self.encode_ordinary(text[start:match.start()])
            ids.append(self.special_tokens[match.group()])
            start = match.end()
        ids += self.encode_ordinary(text[start:])
        return ids

    def encode_ordinary(self, text: str) -> list[int]:
        """Text -> ids, with special-token strings encoded as the plain text they are."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__} (use encode_bytes for bytes)")
        chunks = self._splitter.split(text)
        try:
            if len(chunks) < DEFER_MIN_CHUNKS:
                return list(chain.from_iterable(map(self._cache.__getitem__, chunks)))
            return self._encode_chunk_lists([chunks])[0]
        except UnicodeEncodeError:  # lone surrogates; rare, so handled here rather than checked for
            return self.encode_ordinary(text.encode("utf-16", "surrogatepass").decode("utf-16", "replace"))

    def _encode_chunk_lists(self, chunk_lists: list[list[str]]) -> list[list[int]]:
        """The ids of each list of chunks. A pass through a per-call view of the cache (the lookups
        run in C, via map) collects each chunk's ids, an empty list for each chunk the cache lacks;
        those are then encoded together and their lists filled in place before flattening."""
        with gc_paused():
            view = _NewChunks(self._cache)
            looked_up = [list(map(view.__getitem__, chunks)) for chunks in chunk_lists]
            if view.new_chunks:
                self._encode_new(view.new_chunks, view.new_ids)
            return [list(chain.from_iterable(parts)) for parts in looked_up]

    def _encode_new(self, chunks: list[str], ids: list[list[int]]) -> None:
        """Fill in the ids of new chunks (numpy for many short ones), then add them to the cache."""
        data = [chunk.encode("utf-8") for chunk in chunks]
        batch = [i for i, d in enumerate(data) if len(d) <= BATCH_MAX_BYTES] if len(chunks) >= BATCH_MIN_NEW else []
        if batch:
            if self._pair_table is None:
                self._pair_table = PairTable.build(self._ranks, self._results, self.byte_ids)
            for i, encoded in zip(batch, encode_chunks_batch([data[i] for i in batch], self._pair_table)):
                ids[i].extend(encoded)
        for chunk_ids, d in zip(ids, data):
            if not chunk_ids:  # not batched (chunks are never empty, so an empty list is still unfilled)
                chunk_ids.extend(self._cache.encode(d))
        cache = self._cache
        if len(cache) + len(chunks) > CACHE_LIMIT:
            cache.clear()
        cache.update(zip(chunks, map(tuple, ids)))

    def encode_bytes(self, data: bytes) -> list[int]:
        """Any bytes -> ids; invalid UTF-8 is split like punctuation and encoded byte-exactly."""
        data = bytes(data)
        try:
            return self.encode_ordinary(data.decode("utf-8"))
        except UnicodeDecodeError:
            pass
        ids: list[int] = []
        for chunk in self._splitter.split(data.decode("utf-8", "surrogateescape")):
            try:
                ids += self._cache[chunk]
            except UnicodeEncodeError:  # holds escaped raw bytes: encode it without the cache
                ids += self._cache.encode(chunk.encode("utf-8", "surrogateescape"))
        return ids

    def encode_batch(self, texts: list[str], *, num_workers: int | None = None) -> list[list[int]]:
        """`encode_ordinary` for many documents, spread over `num_workers` processes (None: all
        CPUs, but in-process when the batch is under PARALLEL_MIN_CHARS characters)."""
        texts = list(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"encode_batch expects strings; item {i} is {type(text).__name__}")
        workers = min(parallel.resolve_workers(num_workers), len(texts))
        small = num_workers is None and sum(map(len, texts)) < PARALLEL_MIN_CHARS
        if workers <= 1 or small:
            return self._encode_many(texts)
        return parallel.encode_in_processes(self, texts, workers)

    def encoding_workers(self, num_workers: int | None = None) -> parallel.EncodingWorkers:
        """Worker processes for encoding many batches in turn, each worker's cache kept warm between
        them: `with tok.encoding_workers(2) as pool: ids = pool.encode(texts)`. `pool.encode`
        returns what `encode_batch` would; this process encodes a share of each batch itself."""
        return parallel.EncodingWorkers(self, parallel.resolve_workers(num_workers))

    def _encode_many(self, texts: list[str]) -> list[list[int]]:
        """`encode_ordinary` of each text, the new chunks of all of them encoded together."""
        try:
            return self._encode_chunk_lists([self._splitter.split(text) for text in texts])
        except UnicodeEncodeError:  # a text with lone surrogates: let encode_ordinary handle each
            return [self.encode_ordinary(text) for text in texts]

    # ----- decoding -------------------------------------------------------------------------------

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Ids -> the bytes they stand for (special tokens as their UTF-8 strings)."""
        ids = ids.tolist() if hasattr(ids, "tolist") else ids if isinstance(ids, list) else list(ids)
        try:
            if ids and min(ids) < 0:
                raise IndexError
            return b"".join(map(self._vocab.__getitem__, ids))
        except (IndexError, TypeError):
            for i, token_id in enumerate(ids):
                if not isinstance(token_id, int) or not 0 <= token_id < self.vocab_size or self._vocab[token_id] is None:
                    raise ValueError(
                        f"token id {token_id!r} at position {i} is not in this tokenizer's vocabulary (0..{self.vocab_size - 1})"
                    ) from None
            raise

    def decode(self, ids: Iterable[int], errors: str = "replace") -> str:
        """Ids -> text. Bytes that are not valid UTF-8 become U+FFFD; errors="strict" raises instead."""
        return self.decode_bytes(ids).decode("utf-8", errors)

    def incremental_decoder(self, errors: str = "replace") -> "IncrementalDecoder":
        return IncrementalDecoder(self, errors)

    # ----- inspecting -----------------------------------------------------------------------------

    @property
    def eot_id(self) -> int | None:
        return self.special_tokens.get(EOT)

    @property
    def pattern_name(self) -> str:
        """"gpt2" or "cl100k" for the built-in patterns, else the regex itself."""
        return next((name for name, p in PATTERNS.items() if p == self.pattern), self.pattern)

    def token_bytes(self, token_id: int) -> bytes:
        return self.decode_bytes([token_id])

    def _allowed(self, allowed_special) -> set[str]:
        if allowed_special == "all":
            return set(self.special_tokens)
        if allowed_special == "none":
            return set()
        if isinstance(allowed_special, str):
            raise ValueError(
                f"allowed_special must be 'none', 'all' or a set of strings, got the string {allowed_special!r} "
                f"(write {{{allowed_special!r}}})"
            )
        allowed = set(allowed_special)
        unknown = allowed - set(self.special_tokens)
        if unknown:
            raise ValueError(
                f"allowed_special names {sorted(unknown)}, which are not special tokens here ({sorted(self.special_tokens)})"
            )
        return allowed

    def __eq__(self, other) -> bool:
        return isinstance(other, Tokenizer) and self.__getstate__() == other.__getstate__()

    def __getstate__(self) -> dict:  # what pickling (for spawned workers) and equality use: the four parts
        return {
            "pattern": self.pattern, "byte_ids": self.byte_ids, "merges": self.merges, "special_tokens": self.special_tokens,
        }

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, merges={len(self.merges)}, "
            f"special_tokens={len(self.special_tokens)}, pattern={self.pattern_name!r})"
        )


class IncrementalDecoder:
    """Decode a stream of ids into text, emitting only whole characters.

    A character's UTF-8 bytes may span tokens (an emoji is often 2-4 byte tokens); `push` holds back
    an incomplete character until the rest arrives, so streamed text never shows broken characters.
    The concatenated output of the pushes and a final `flush()` equals `decode` of all the ids.
    """

    def __init__(self, tokenizer: Tokenizer, errors: str = "replace"):
        self.tokenizer = tokenizer
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors)

    def push(self, ids: int | Iterable[int]) -> str:
        return self._decoder.decode(self.tokenizer.decode_bytes([ids] if isinstance(ids, int) else ids))

    def flush(self) -> str:
        """The held-back bytes of an unfinished character (as U+FFFD), and a reset for reuse."""
        text = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        return text
