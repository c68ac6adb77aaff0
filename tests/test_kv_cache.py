"""The KV cache: logits from cached decoding equal a full recompute (fp32, 1e-5), for any chunking,
rows of different lengths, subsets of rows, and past the block size (the sliding window)."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from minillm import ops
from minillm.config import GPTConfig
from minillm.generate import SamplingConfig, decode_step, generate, prefill, window_start
from minillm.kv_cache import KVCache
from minillm.model import GPT

ATOL = 1e-5


def random_model(seed: int, n_layer=2, n_head=2, head_size=4, block_size=12, vocab_size=23) -> GPT:
    torch.manual_seed(seed)
    config = GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_head,
                       n_embd=n_head * head_size, impl="torch")
    model = GPT(config).eval()
    with torch.no_grad():  # away from the initialisation's near-zero biases and unit norms
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def full_logits(model: GPT, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([tokens]))[0][0]  # (T, V)


def assert_close(actual, expected, what=""):
    err = (actual - expected).abs()
    assert err.max() <= ATOL, f"{what}: max error {err.max():.3g} at {divmod(int(err.argmax()), err.shape[-1])}, mean {err.mean():.3g}"


@given(seed=st.integers(0, 10_000), batch=st.integers(1, 3), n_layer=st.integers(1, 2), n_head=st.integers(1, 3),
       head_size=st.sampled_from([2, 3, 8]), block_size=st.integers(2, 12), data=st.data())
def test_chunked_cached_forward_equals_full_recompute(seed, batch, n_layer, n_head, head_size, block_size, data):
    """Feeding a sequence in chunks of any sizes through the cache gives every position's full-pass logits."""
    model = random_model(seed, n_layer, n_head, head_size, block_size)
    length = data.draw(st.integers(1, block_size), label="length")
    chunks = []
    while sum(chunks) < length:
        chunks.append(data.draw(st.integers(1, length - sum(chunks)), label="chunk"))
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, model.config.vocab_size, (batch, length), generator=g)
    cache = KVCache.for_model(model, batch)
    with torch.no_grad():
        expected, _ = model(idx)
        start, pieces = 0, []
        for size in chunks:
            logits, _ = model(idx[:, start : start + size], cache=cache)
            pieces.append(logits)
            start += size
    assert cache.lengths == [length] * batch
    assert_close(torch.cat(pieces, dim=1), expected, f"chunks {chunks}")


@given(seed=st.integers(0, 10_000), lengths=st.lists(st.integers(1, 7), min_size=1, max_size=3),
       steps=st.integers(1, 4))
def test_rows_of_different_lengths_decode_like_each_alone(seed, lengths, steps):
    """Right-padded prefill, then one token per row per step at each row's own position."""
    model = random_model(seed)
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, model.config.vocab_size, (n + steps,), generator=g).tolist() for n in lengths]
    cache = KVCache.for_model(model, len(lengths))
    with torch.no_grad():
        logits = prefill(model, cache, [s[:n] for s, n in zip(seqs, lengths)])
        for step in range(steps + 1):
            for row, (seq, n) in enumerate(zip(seqs, lengths)):
                assert_close(logits[row], full_logits(model, seq[: n + step])[-1], f"row {row} step {step}")
            if step < steps:
                logits = decode_step(model, cache, [s[n + step] for s, n in zip(seqs, lengths)])
    assert cache.lengths == [n + steps for n in lengths]


def test_a_subset_of_rows_in_any_order_decodes_alone():
    """What continuous batching does: prefill rows one at a time, decode some rows, leave others be."""
    model = random_model(1)
    seqs = [[1, 2, 3, 4, 5, 6], [7, 8], [9, 10, 11, 12], [13]]
    cache = KVCache.for_model(model, 4)
    with torch.no_grad():
        for row in (2, 0, 3):  # requests arriving one by one; row 1 stays free
            prefill(model, cache, [seqs[row][:-1] if len(seqs[row]) > 1 else seqs[row]], [row])
        logits = decode_step(model, cache, [seqs[2][-1], seqs[0][-1]], [2, 0])  # non-consecutive, reversed
        assert_close(logits[0], full_logits(model, seqs[2])[-1], "row 2")
        assert_close(logits[1], full_logits(model, seqs[0])[-1], "row 0")
        logits = prefill(model, cache, [[5, 4, 3]], [1])  # a new request joins in the free row
        assert_close(logits[0], full_logits(model, [5, 4, 3])[-1], "row 1")
        logits = decode_step(model, cache, [6, 7], [0, 1])  # consecutive rows: read as a slice
        assert_close(logits[0], full_logits(model, seqs[0] + [6])[-1], "row 0 again")
        assert_close(logits[1], full_logits(model, [5, 4, 3, 7])[-1], "row 1 again")
        logits = decode_step(model, cache, [8, 9], [2, 1])  # equal lengths, rows out of order: one slice write each
        assert_close(logits[0], full_logits(model, seqs[2] + [8])[-1], "row 2, uniform")
        assert_close(logits[1], full_logits(model, [5, 4, 3, 7, 9])[-1], "row 1, uniform")
    assert cache.lengths == [7, 5, 5, 1]


def test_a_full_row_is_a_clear_error():
    model = random_model(2, block_size=6)
    cache = KVCache.for_model(model, 2, max_len=5)
    with torch.no_grad():
        model(torch.zeros(2, 5, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="row 0 holds 5 tokens and cannot take 1 more: its capacity is 5"):
            model(torch.zeros(2, 1, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="max_len must be in \\[1, block_size=6\\]"):
        KVCache(model.config, 1, max_len=7)
    with pytest.raises(ValueError, match="model computes in torch.float64"):
        with torch.no_grad():
            model.double()(torch.zeros(1, 1, dtype=torch.long), cache=KVCache(model.config, 1))
    with pytest.raises(ValueError, match="rows must be distinct"):
        cache.select([0, 0])


def test_window_start_worked_example():
    """The docstring's example, block 8 and shift 3, derived by hand: the window moves only when the
    sequence no longer fits, by whole shifts."""
    expected = {1: 0, 8: 0, 9: 3, 10: 3, 11: 3, 12: 6, 14: 6, 15: 9}
    assert {n: window_start(n, 8, 3) for n in expected} == expected
    assert all(n - window_start(n, 8, s) <= 8 for n in range(1, 40) for s in range(1, 9))


@pytest.mark.parametrize("shift", [1, 3, 8])
def test_decoding_past_the_block_size_equals_recompute_on_the_window(shift):
    """Greedy generation far past block_size: each token's log-probability equals a full recompute over
    the tokens the sliding window holds (shift 1 = nanoGPT's crop to the last block_size tokens)."""
    model = random_model(3, block_size=8)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11, 12, 13]]  # the second is longer than the block already
    config = SamplingConfig(temperature=0, max_new_tokens=20, context_shift=shift)
    for completion in generate(model, prompts, config):
        seq = list(completion.prompt_tokens)
        for token, logprob in zip(completion.tokens, completion.logprobs):
            window = seq[window_start(len(seq), 8, shift):]
            expected = torch.log_softmax(full_logits(model, window)[-1], dim=-1)
            assert token == int(expected.argmax())
            assert abs(logprob - float(expected[token])) <= ATOL
            seq.append(token)
        assert len(completion.tokens) == 20 and completion.finish_reason == "length"


def test_attention_with_an_explicit_mask_matches_softmax_written_out():
    torch.manual_seed(4)
    q, k, v = torch.randn(2, 3, 2, 4), torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4)
    mask = torch.tensor([[[True, True, False, False, False], [True, True, True, False, False]],
                         [[True, True, True, True, False], [True, True, True, True, True]]])[:, None]  # (B, 1, Tq, Tk)
    scores = (q @ k.transpose(-1, -2)) / 2.0 + torch.where(mask, 0.0, float("-inf"))
    expected = torch.softmax(scores, dim=-1) @ v
    assert torch.allclose(ops.attention(q, k, v, causal=False, mask=mask, impl="torch"), expected, atol=1e-6)
    with pytest.raises(ValueError, match="causal=False with an explicit mask"):
        ops.attention(q, k, v, mask=mask)
    with pytest.raises(ValueError, match="impl='triton' cannot run this input: an explicit mask"):
        ops.attention(q, k, v, causal=False, mask=mask, impl="triton")
