"""Generation: the one way minillm turns a prompt into more tokens (sample.py, evaluation, finetuning
and the server all call this).

    prompt ids -> prefill: one model call over the prompt fills a KV cache, gives the first logits
               -> loop:   pick a token (repetition penalty, temperature, top-k, top-p; 0 = greedy),
                          stop at a stop token, a stop string or max_new_tokens,
                          else decode_step: one model call on just that token, from the cache

The building blocks are public so a server can batch continuously on top of them (requests joining
and leaving one KV cache): `prefill(model, cache, prompts, rows)` fills some rows of a cache,
`decode_step(model, cache, tokens, rows)` advances some rows by one token, `TokenSampler` holds one
sequence's sampling state and `TextStream` its text, and `SequenceState` ties them together: given
a sequence's next-token logits it picks the token and says what text it released and whether the
sequence ended. `generate_iter` is the batch loop built from them (and `minillm.engine` the server's);
`generate` collects its output and `stream` yields one prompt's text as it is produced.

Batches: prompts of different lengths run together. The prefill right-pads them (the causal mask
keeps every real token from seeing the padding after it) and then cuts each row back to its own
length; from there each row decodes at its own positions with a per-row mask (`minillm.kv_cache`).
A prompt gives the same tokens batched as alone (tested under greedy decoding).

Randomness: sample i of a call draws from its own generator seeded with `seed + i`, so a sample is
reproducible and does not depend on what else was in the batch.

Text: with a tokenizer, each row's tokens go through the tokenizer's incremental decoder, which
releases whole characters only, so streamed text never splits a UTF-8 character. Text that could
still be the start of a stop string is held back until it is known not to be one; the stop string
itself is not part of the output.

Past the block size: GPT-2's learned positions end at `block_size`, and cached keys carry their
absolute positions, so the cache cannot simply be shifted. When a sequence would outgrow the block
size, the oldest `context_shift` tokens are dropped and the rest is prefilled again at positions from
0 (a sliding window, re-encoded once every `context_shift` tokens rather than every token). The
logits then equal a full recompute on exactly the tokens in the window: `window_start` says which.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch

from minillm.kv_cache import KVCache


@dataclass
class SamplingConfig:
    """How to pick tokens and when to stop; one per request (the server) or per run (sample.py)."""

    max_new_tokens: int = 256  # most tokens generated per prompt
    temperature: float = 0.8  # divides the logits: <1 sharper, >1 flatter; 0 = greedy (the most likely token)
    top_k: int | None = 200  # sample only among the k most likely tokens; None = no limit
    top_p: float = 1.0  # nucleus: the fewest most-likely tokens whose probability reaches p; 1.0 = off
    repetition_penalty: float = 1.0  # >1 makes tokens already in the context less likely (CTRL); 1.0 = off
    stop: tuple[str, ...] = ()  # stop strings: the text ends just before the first one (needs a tokenizer)
    stop_tokens: tuple[int, ...] = ()  # token ids that end a sample (not part of the output)
    stop_at_eot: bool = True  # also stop at the tokenizer's <|endoftext|>
    seed: int | None = None  # sample i uses seed + i (reproducible alone or batched); None = a fresh random seed
    context_shift: int | None = None  # tokens dropped from the front when a sequence fills the block size; None = a quarter of it

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"SamplingConfig.max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"SamplingConfig.temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"SamplingConfig.top_k must be a positive integer or None, got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingConfig.top_p must be in (0, 1], got {self.top_p!r}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise ValueError(f"SamplingConfig.repetition_penalty must be positive (1.0 = off), got {self.repetition_penalty!r}")
        self.stop, self.stop_tokens = tuple(self.stop), tuple(self.stop_tokens)
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"SamplingConfig.stop must hold non-empty strings, got {self.stop!r}")
        if not all(isinstance(t, int) and t >= 0 for t in self.stop_tokens):
            raise ValueError(f"SamplingConfig.stop_tokens must be token ids (>= 0), got {self.stop_tokens!r}")
        if self.context_shift is not None and self.context_shift < 1:
            raise ValueError(f"SamplingConfig.context_shift must be a positive integer or None, got {self.context_shift!r}")


# ---- logits -> next token: pure functions, each testable alone ----


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty (Keskar et al. 2019), as Hugging Face applies it: for tokens already in the
    context (`seen`, bool like logits), a positive logit is divided by `penalty`, a negative one
    multiplied, so either way the token gets less likely for penalty > 1."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering (Holtzman et al. 2019): keep the most likely tokens, in order, until their
    probability reaches `p`; the token that crosses p is kept, so at least one always is."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs  # probability of the tokens ranked above each one
    drop_sorted = before >= p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def draw(probs: torch.Tensor, generator: torch.Generator) -> int:
    """One index of `probs` (1-D, summing to about 1) drawn with those probabilities: a uniform number
    located in the cumulative sum (inverse transform sampling).

    Why not torch.multinomial: on a CPU it takes about a millisecond over GPT-2's 50,257 ids, as long
    as a whole decode step of a small model; this takes a few hundredths of that. Ids of probability 0
    are never drawn: searching to the right of equal sums skips their empty intervals.
    """
    cdf = torch.cumsum(probs, dim=0)
    u = torch.rand(1, generator=generator, device=probs.device, dtype=cdf.dtype) * cdf[-1]
    index = int(torch.searchsorted(cdf, u, right=True))
    if index >= probs.numel():  # u * total rounded up to the total itself: take the last possible id
        index = int(torch.nonzero(probs).max())
    return index


def window_start(num_tokens: int, block_size: int, shift: int) -> int:
    """Index of the first token the model sees when the sequence has `num_tokens` tokens: 0 while it
    fits the block, then it moves forward `shift` tokens at a time, just as much as needed to fit.

    E.g. block 8, shift 3: 8 tokens -> 0, 9 -> 3 (tokens 3..8), 11 -> 3, 12 -> 6, 14 -> 6, 15 -> 9.
    """
    if num_tokens <= block_size:
        return 0
    return shift * -(-(num_tokens - block_size) // shift)  # ceil((n - block) / shift) steps of `shift`


class TokenSampler:
    """One sequence's sampling state: its settings, its random generator, the tokens it has seen."""

    def __init__(self, config: SamplingConfig, vocab_size: int, context: Sequence[int], seed: int,
                 device: str | torch.device = "cpu", allowed_vocab: int | None = None):
        self.config = config
        self.allowed_vocab = allowed_vocab  # ids >= this are never picked (e.g. a vocabulary padded past the tokenizer's)
        self.seen = None
        if config.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            self.seen[torch.tensor(list(context), dtype=torch.long, device=device)] = True
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def __call__(self, logits: torch.Tensor) -> int:
        """The next token for this sequence, from its logits (vocab_size,)."""
        cfg = self.config
        logits = logits.float()
        if self.allowed_vocab is not None and self.allowed_vocab < logits.shape[-1]:
            logits = logits.clone()
            logits[self.allowed_vocab:] = float("-inf")
        if self.seen is not None:
            logits = apply_repetition_penalty(logits, self.seen, cfg.repetition_penalty)
        if cfg.temperature == 0:
            token = int(torch.argmax(logits))
        else:
            logits, candidates = logits / cfg.temperature, None  # None: every id is a candidate
            if cfg.top_k is not None and cfg.top_k < logits.shape[-1]:
                logits, candidates = torch.topk(logits, cfg.top_k)  # the k most likely, best first
            index = draw(torch.softmax(top_p_filter(logits, cfg.top_p), dim=-1), self.generator)
            token = index if candidates is None else int(candidates[index])
        if self.seen is not None:
            self.seen[token] = True
        return token


class TextStream:
    """One sequence's text as its tokens arrive: whole characters only, cut before a stop string,
    holding back any tail that might still grow into one."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.decoder = tokenizer.incremental_decoder()
        self.stop = tuple(stop)
        self.text = ""  # everything decoded so far (cut at a stop string once one is found)
        self.emitted = 0  # characters of self.text already handed out
        self.stopped = False

    def push(self, token: int) -> str:
        """Decode one more token; returns the text that is now safe to show (possibly "")."""
        return self._add(self.decoder.push([token]))

    def finish(self) -> str:
        """The rest: bytes of an unfinished character (as U+FFFD) and any text held back."""
        rest = self._add(self.decoder.flush())
        if self.stopped:
            return rest
        rest += self.text[self.emitted:]
        self.emitted = len(self.text)
        return rest

    def _add(self, new: str) -> str:
        if self.stopped or not new:
            return ""
        searched_to = len(self.text)
        self.text += new
        if self.stop:
            longest = max(map(len, self.stop))
            begin = max(0, searched_to - longest + 1)  # a stop string may straddle the old and new text
            found = [i for i in (self.text.find(s, begin) for s in self.stop) if i >= 0]
            if found:
                self.text, self.stopped = self.text[: min(found)], True
                return self._release(len(self.text))
        return self._release(len(self.text) - self._held_back())

    def _held_back(self) -> int:
        """Length of the longest tail of the unreleased text that is a proper prefix of a stop string."""
        pending = self.text[self.emitted:]
        return max((k for s in self.stop for k in range(min(len(s) - 1, len(pending)), 0, -1)
                    if pending.endswith(s[:k])), default=0)

    def _release(self, upto: int) -> str:
        piece = self.text[self.emitted:upto]
        self.emitted = max(self.emitted, upto)
        return piece


# ---- model calls on a KV cache ----


@torch.no_grad()
def prepare_for_decoding(model):
    """Store every Linear weight column-major, in place, and return the model: for inference.

    Why: decoding one token multiplies a single row vector by each weight, and on CPUs that product
    streams a weight stored (in, out) row by row faster (about 15% per token measured for GPT-2 small
    here) than nn.Linear's (out, in): it is the layout of GPT-2's Conv1D, which transformers keeps.
    Values, shapes, names and saved files stay the same; only the memory order changes. Leave it out
    for training (data-parallel wrappers expect contiguous parameters). The tied output head shares
    the token embedding, whose rows must stay contiguous for lookups, so it is left as it is.
    """
    embedding = model.transformer.wte.weight
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module.weight is not embedding:
            module.weight.data = module.weight.data.t().contiguous().t()
    return model



@torch.inference_mode()
def prefill(model, cache: KVCache, prompts: Sequence[Sequence[int]], rows: Sequence[int] | None = None) -> torch.Tensor:
    """Run the prompts into cache rows `rows` (default: rows 0..n-1 = all of the cache), replacing what
    those rows held; returns each prompt's next-token logits (n, vocab_size) in float32."""
    rows = list(range(len(prompts))) if rows is None else list(rows)
    if len(rows) != len(prompts):
        raise ValueError(f"prefill got {len(prompts)} prompts for {len(rows)} cache rows")
    lengths = [len(p) for p in prompts]
    if min(lengths) == 0:
        raise ValueError(f"prompt {lengths.index(0)} is empty: the model needs at least one token to continue")
    device = cache.keys[0].device
    width = max(lengths)
    # right-padding: causal attention keeps each real token from seeing the padding after it
    idx = torch.tensor([list(p) + [0] * (width - len(p)) for p in prompts], dtype=torch.long, device=device)
    cache.reset(rows)
    hidden = model.hidden_states(idx, cache=cache.select(rows))  # (n, width, C)
    for row, length in zip(rows, lengths):
        cache.truncate(row, length)  # the padding's keys stay behind as slack, masked and overwritten
    last = hidden[torch.arange(len(rows), device=device), torch.tensor(lengths, device=device) - 1]  # (n, C)
    return model.lm_head(last).float()


@torch.inference_mode()
def decode_step(model, cache: KVCache, tokens: Sequence[int], rows: Sequence[int] | None = None) -> torch.Tensor:
    """Append one token to each of `rows` (default: all rows of the cache); returns the logits for
    the token after it (n, vocab_size) in float32."""
    rows = list(range(len(tokens))) if rows is None else list(rows)
    idx = torch.tensor(list(tokens), dtype=torch.long, device=cache.keys[0].device)[:, None]  # (n, 1)
    hidden = model.hidden_states(idx, cache=cache.select(rows))  # (n, 1, C)
    return model.lm_head(hidden[:, -1]).float()


# ---- the generation loop ----


@dataclass
class Chunk:
    """One event of `generate_iter`: a new token of sample `index` and the text it released, or (with
    token None) the end of that sample, its last text and why it ended."""

    index: int
    token: int | None
    text: str = ""
    logprob: float | None = None  # the model's log-probability of `token` (before temperature and filters)
    finish_reason: str | None = None  # "length" (max_new_tokens) or "stop" (stop token or string); None while going


@dataclass
class Completion:
    """One finished sample: the tokens generated (a stop token left out), their text and why it ended."""

    index: int
    prompt_tokens: list[int]
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: str | None = None  # None without a tokenizer
    finish_reason: str = ""
    seed: int = 0


def stop_ids_for(config: SamplingConfig, tokenizer=None) -> set[int]:
    """The token ids that end a sample: the config's stop tokens, and <|endoftext|> if it asks."""
    ids = set(config.stop_tokens)
    if config.stop_at_eot and getattr(tokenizer, "eot_id", None) is not None:
        ids.add(tokenizer.eot_id)
    return ids


class SequenceState:
    """One sequence being generated: its tokens so far (prompt included), its sampler, its text and,
    once it has ended, why. `advance` takes the logits for its next token and returns the Chunks
    that token makes; `generate_iter` and the server's scheduler both drive sequences through it,
    so the stop rules live in one place."""

    def __init__(self, index: int, context: list[int], config: SamplingConfig, model, tokenizer=None, seed: int = 0):
        weight = model.transformer.wte.weight
        allowed = tokenizer.vocab_size if tokenizer is not None else None
        self.index, self.context, self.config = index, context, config
        self.sampler = TokenSampler(config, model.config.vocab_size, context, seed, weight.device, allowed)
        self.text = TextStream(tokenizer, config.stop) if tokenizer is not None else None
        self.stop_ids = stop_ids_for(config, tokenizer)
        self.produced = 0  # tokens generated so far (a stop token not counted)
        self.finish_reason: str | None = None  # "stop" or "length" once ended

    def advance(self, logits: torch.Tensor) -> list[Chunk]:
        """Pick the next token from `logits` (vocab_size,): one Chunk for it, plus a closing Chunk
        (token None, finish_reason set) if the sequence ends here."""
        token = self.sampler(logits)
        if token in self.stop_ids:
            return [self._finish("stop")]
        logprob = float(torch.log_softmax(logits, dim=-1)[token])
        self.context.append(token)
        self.produced += 1
        chunks = [Chunk(self.index, token, self.text.push(token) if self.text else "", logprob)]
        if self.text is not None and self.text.stopped:
            chunks.append(self._finish("stop"))
        elif self.produced == self.config.max_new_tokens:
            chunks.append(self._finish("length"))
        return chunks

    def _finish(self, reason: str) -> Chunk:
        self.finish_reason = reason
        rest = self.text.finish() if self.text is not None else ""
        return Chunk(self.index, None, rest, finish_reason=reason)


def encode_prompt(prompt: str | Sequence[int], tokenizer=None) -> list[int]:
    """Token ids of a prompt given as text (needs the tokenizer; special tokens written in it count)
    or as ids. An empty prompt starts from <|endoftext|>, as GPT-2 samples unconditionally."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("a text prompt needs a tokenizer; pass token ids or tokenizer=")
        ids = tokenizer.encode(prompt, allowed_special="all")
    else:
        ids = [int(t) for t in prompt]
    if not ids:
        eot = getattr(tokenizer, "eot_id", None)
        if eot is None:
            raise ValueError("empty prompt and no <|endoftext|> token to start from: give at least one token")
        ids = [eot]
    return ids


def generate_iter(model, prompts: Sequence[str | Sequence[int]], config: SamplingConfig | None = None, *,
                  tokenizer=None) -> Iterator[Chunk]:
    """Generate from several prompts at once, yielding each new token (and text) as it is picked.

    `prompts` are texts (with `tokenizer`) or lists of token ids. Each sample ends with a Chunk whose
    token is None and whose finish_reason is set. The model is put in eval mode for the call.
    """
    config = config or SamplingConfig()
    if config.stop and tokenizer is None:
        raise ValueError("stop strings need a tokenizer (pass tokenizer=), or use stop_tokens")
    contexts = [encode_prompt(p, tokenizer) for p in prompts]
    if not contexts:
        return
    block = model.config.block_size
    shift = config.context_shift or max(1, block // 4)
    if shift > block:
        raise ValueError(f"context_shift {shift} is larger than the block size {block}")
    base_seed = config.seed if config.seed is not None else random.SystemRandom().randrange(2**31)
    states = [SequenceState(i, ctx, config, model, tokenizer, base_seed + i) for i, ctx in enumerate(contexts)]
    starts = [window_start(len(ctx), block, shift) for ctx in contexts]  # first token in the window
    cache = KVCache.for_model(model, len(contexts))
    was_training = model.training
    model.eval()
    # subtle: no inference_mode around this loop; held across a `yield` it would leak into the
    # caller's code. prefill and decode_step enter it themselves.
    try:
        logits = prefill(model, cache, [ctx[s:] for ctx, s in zip(contexts, starts)])
        active = list(range(len(contexts)))
        while active:
            decoding, refilling = [], []
            for j, i in enumerate(active):
                yield from states[i].advance(logits[j])
                if states[i].finish_reason:
                    continue
                if window_start(len(contexts[i]), block, shift) != starts[i]:
                    refilling.append(i)  # the window slides: re-encode what it keeps
                else:
                    decoding.append(i)
            parts = []
            if decoding:
                parts.append(decode_step(model, cache, [contexts[i][-1] for i in decoding], decoding))
            for i in refilling:
                starts[i] = window_start(len(contexts[i]), block, shift)
                parts.append(prefill(model, cache, [contexts[i][starts[i]:]], [i]))
            active = decoding + refilling
            logits = torch.cat(parts) if parts else None
    finally:
        model.train(was_training)


def generate(model, prompts: Sequence[str | Sequence[int]], config: SamplingConfig | None = None, *,
             tokenizer=None) -> list[Completion]:
    """Generate from each prompt (texts with `tokenizer`, or token id lists); one Completion each, in order."""
    config = config or SamplingConfig()
    if config.seed is None:  # fix it here so the completions can report it
        config = replace(config, seed=random.SystemRandom().randrange(2**31))
    results = [Completion(i, encode_prompt(p, tokenizer), text=None if tokenizer is None else "", seed=config.seed + i)
               for i, p in enumerate(prompts)]
    for chunk in generate_iter(model, prompts, config, tokenizer=tokenizer):
        result = results[chunk.index]
        if chunk.token is not None:
            result.tokens.append(chunk.token)
            result.logprobs.append(chunk.logprob)
        if tokenizer is not None:
            result.text += chunk.text
        if chunk.finish_reason:
            result.finish_reason = chunk.finish_reason
    return results


def stream(model, prompt: str | Sequence[int], config: SamplingConfig | None = None, *, tokenizer) -> Iterator[str]:
    """The text generated from one prompt, piece by piece as it is produced (never half a character)."""
    for chunk in generate_iter(model, [prompt], config, tokenizer=tokenizer):
        if chunk.text:
            yield chunk.text
