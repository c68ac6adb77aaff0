"""Generation on token ids: the sampling filters (worked examples and properties), seeds, batching,
stop tokens, max_new_tokens, the config's validation. Text-level behaviour is in test_generate_text.py."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from minillm.generate import (
    SamplingConfig,
    TokenSampler,
    apply_repetition_penalty,
    generate,
    generate_iter,
    prepare_for_decoding,
    draw,
    top_p_filter,
)
from tests.test_kv_cache import full_logits, random_model

def test_repetition_penalty_worked_example():
    """Seen tokens 0 and 1 with penalty 2: the positive logit 2 halves to 1, the negative -2 doubles
    to -4 (both less likely); unseen token 2 keeps its logit."""
    out = apply_repetition_penalty(torch.tensor([2.0, -2.0, 1.0]), torch.tensor([True, True, False]), 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0]


def test_draw_follows_the_probabilities_and_skips_zeros():
    """5000 draws from (0, 0.1, 0, 0.2, 0.7, 0): the zeros never come up, the rest within 3 standard
    deviations (at most 0.02 here) of their probability."""
    g = torch.Generator().manual_seed(0)
    probs = torch.tensor([0.0, 0.1, 0.0, 0.2, 0.7, 0.0])
    counts = torch.bincount(torch.tensor([draw(probs, g) for _ in range(5000)]), minlength=6) / 5000
    assert counts[[0, 2, 5]].tolist() == [0.0, 0.0, 0.0]
    assert torch.allclose(counts, probs, atol=0.02)


def test_top_p_worked_example():
    """Probabilities 0.5, 0.3, 0.15, 0.05: the probability ranked above each is 0, 0.5, 0.8, 0.95, so
    p=0.7 keeps the first two (0.5 < 0.7, 0.8 >= 0.7 drops the third), p=0.5 only the first, and
    p=0.81 three."""
    logits = torch.log(torch.tensor([0.15, 0.5, 0.05, 0.3]))
    kept = lambda p: torch.isfinite(top_p_filter(logits, p)).nonzero().flatten().tolist()  # noqa: E731
    assert kept(0.7) == [1, 3]
    assert kept(0.5) == [1]
    assert kept(0.81) == [0, 1, 3]
    assert kept(1.0) == [0, 1, 2, 3]


@given(seed=st.integers(0, 2**20), k=st.integers(1, 12), p=st.floats(0.05, 1.0), temperature=st.floats(0.1, 3.0))
def test_sampled_tokens_stay_inside_the_filters(seed, k, p, temperature):
    """Every draw is among the k most likely tokens and inside their nucleus, computed here in plain
    Python: renormalise over the top k, then take tokens by probability until the total reaches p."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(12, generator=g, dtype=torch.float64) * 3).tolist()
    top = sorted(range(12), key=lambda i: -logits[i])[:k]
    weights = {i: math.exp((logits[i] - logits[top[0]]) / temperature) for i in top}
    nucleus, total = set(), 0.0
    for i in top:
        nucleus.add(i)
        total += weights[i] / sum(weights.values())
        if total >= p + 1e-6:  # the slack keeps float rounding at the boundary on the generous side
            break
    sampler = TokenSampler(SamplingConfig(temperature=temperature, top_k=k, top_p=p), 12, [], seed)
    drawn = {sampler(torch.tensor(logits)) for _ in range(20)}
    assert drawn <= nucleus
    if k == 1:
        assert drawn == {top[0]}


def test_greedy_ignores_the_seed_and_picks_the_argmax():
    model = random_model(5)
    prompt = [3, 1, 4, 1, 5]
    runs = [generate(model, [prompt], SamplingConfig(temperature=0, max_new_tokens=6, seed=s))[0].tokens for s in (1, 2)]
    assert runs[0] == runs[1]
    seq = list(prompt)
    for _ in range(6):
        seq.append(int(full_logits(model, seq)[-1].argmax()))
    assert runs[0] == seq[len(prompt):]


def test_a_seed_reproduces_a_sample_and_sample_i_uses_seed_plus_i():
    model = random_model(6)
    prompts = [[1, 2, 3], [4, 5], [6]]
    config = SamplingConfig(temperature=1.5, top_k=None, max_new_tokens=12, seed=100)
    first = [c.tokens for c in generate(model, prompts, config)]
    assert first == [c.tokens for c in generate(model, prompts, config)]
    other = [c.tokens for c in generate(model, prompts, SamplingConfig(**{**config.__dict__, "seed": 101}))]
    assert other != first  # 36 tokens from a 23-token vocabulary at temperature 1.5: a different seed differs
    for i, prompt in enumerate(prompts):  # alone, with seed 100 + i, sample i comes out the same
        alone = generate(model, [prompt], SamplingConfig(**{**config.__dict__, "seed": 100 + i}))[0]
        assert alone.tokens == first[i] and alone.seed == 100 + i


def test_batched_prompts_of_different_lengths_give_the_same_greedy_tokens_as_alone():
    model = random_model(7)
    prompts = [[1], [2, 3, 4, 5, 6, 7, 8], [9, 10, 11], [12, 13]]
    config = SamplingConfig(temperature=0, max_new_tokens=9, repetition_penalty=1.3)
    batched = generate(model, prompts, config)
    for prompt, completion in zip(prompts, batched):
        alone = generate(model, [prompt], config)[0]
        assert completion.tokens == alone.tokens and completion.prompt_tokens == prompt
        assert max(abs(a - b) for a, b in zip(completion.logprobs, alone.logprobs)) <= 1e-5


def test_stop_tokens_end_a_sample_without_being_part_of_it():
    model = random_model(8)
    config = SamplingConfig(temperature=0, max_new_tokens=8)
    free = generate(model, [[1, 2], [3]], config)
    stop = free[0].tokens[3]
    first = free[0].tokens.index(stop)  # the stop token may occur before position 3 too
    stopped = generate(model, [[1, 2], [3]], SamplingConfig(temperature=0, max_new_tokens=8, stop_tokens=(stop,)))
    assert stopped[0].tokens == free[0].tokens[:first] and stopped[0].finish_reason == "stop"
    expected = free[1].tokens[: free[1].tokens.index(stop)] if stop in free[1].tokens else free[1].tokens
    assert stopped[1].tokens == expected  # the other row stops on its own schedule


def test_max_new_tokens_and_the_stream_of_chunks():
    model = random_model(9)
    chunks = list(generate_iter(model, [[1, 2, 3], [4]], SamplingConfig(max_new_tokens=5, seed=0, stop_at_eot=False)))
    for i in (0, 1):
        mine = [c for c in chunks if c.index == i]
        assert [c.token is None for c in mine] == [False] * 5 + [True]
        assert mine[-1].finish_reason == "length" and all(c.finish_reason is None for c in mine[:-1])
        assert all(c.logprob <= 0 and math.isfinite(c.logprob) for c in mine[:-1])


def test_generation_restores_training_mode_and_checks_its_input():
    model = random_model(10).train()
    generate(model, [[1]], SamplingConfig(max_new_tokens=2, seed=0))
    assert model.training
    with pytest.raises(ValueError, match="token id 99 is outside the vocabulary"):
        generate(model, [[99]], SamplingConfig(max_new_tokens=2))
    with pytest.raises(ValueError, match="text prompt needs a tokenizer"):
        generate(model, ["hello"], SamplingConfig(max_new_tokens=2))
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        generate(model, [[1]], SamplingConfig(stop=("x",)))
    with pytest.raises(ValueError, match="empty prompt"):
        generate(model, [[]], SamplingConfig(max_new_tokens=2))
    with pytest.raises(ValueError, match="context_shift 13 is larger than the block size 12"):
        generate(model, [[1]], SamplingConfig(context_shift=13))


@pytest.mark.parametrize("field,value", [
    ("max_new_tokens", 0), ("temperature", -0.1), ("temperature", float("nan")), ("top_k", 0), ("top_p", 0.0),
    ("top_p", 1.5), ("repetition_penalty", 0.0), ("stop", ("",)), ("stop_tokens", (-1,)), ("context_shift", 0),
])
def test_sampling_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"SamplingConfig.{field}"):
        SamplingConfig(**{field: value})


def test_the_decoding_layout_changes_memory_order_only():
    model = random_model(11)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    expected = generate(model, [[1, 2, 3]], SamplingConfig(temperature=0, max_new_tokens=5))[0]
    weight = model.transformer.h[0].mlp.c_fc.weight
    assert prepare_for_decoding(model) is model
    assert weight.stride() == (1, weight.shape[0]) and model.lm_head.weight is model.transformer.wte.weight
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    got = generate(model, [[1, 2, 3]], SamplingConfig(temperature=0, max_new_tokens=5))[0]
    assert got.tokens == expected.tokens
    assert max(abs(a - b) for a, b in zip(got.logprobs, expected.logprobs)) <= 1e-5


def test_the_caller_keeps_its_grad_mode_between_chunks():
    """generate_iter yields mid-generation; the code that consumes it must not run in inference mode."""
    model = random_model(12)
    for _ in generate_iter(model, [[1, 2]], SamplingConfig(max_new_tokens=3, seed=0)):
        assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()


def test_generation_under_autocast_caches_in_the_autocast_dtype():
    """A mixed-precision training loop may sample for a progress report inside torch.autocast."""
    model = random_model(13)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        [c] = generate(model, [[1, 2, 3]], SamplingConfig(temperature=0, max_new_tokens=4))
    assert len(c.tokens) == 4
