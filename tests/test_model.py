"""The GPT model: gradients against finite differences, causality, size, initial loss, learning, errors."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.autograd import gradcheck
from torch.func import functional_call

from minillm import ops
from minillm.config import GPTConfig
from minillm.model import GPT, IGNORE_INDEX, MLP, Block, CausalSelfAttention, LayerNorm

TINY = GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8)


def float64_model(module_cls, config=TINY, seed=0):
    torch.manual_seed(seed)
    return module_cls(config).double()


def gradcheck_module(module, *inputs):
    """gradcheck of a module's output with respect to its inputs *and* every parameter."""
    names = [n for n, _ in module.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for _, p in module.named_parameters())

    def run(*args):
        inputs_, params_ = args[: len(inputs)], args[len(inputs) :]
        out = functional_call(module, dict(zip(names, params_)), inputs_)
        return out[1] if isinstance(out, tuple) else out  # the GPT's loss, or the module's output

    assert gradcheck(run, tuple(inputs) + params, eps=1e-6, atol=1e-5, rtol=1e-4)


def test_gradcheck_layernorm():
    torch.manual_seed(0)
    ln = LayerNorm(7, bias=True, eps=1e-5, impl="torch").double()
    with torch.no_grad():  # away from the identity initialisation so every term matters
        ln.weight.normal_()
        ln.bias.normal_()
    x = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)
    gradcheck_module(ln, x)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("t_q,t_k", [(5, 5), (2, 6), (1, 4)])
def test_gradcheck_attention(causal, t_q, t_k):
    torch.manual_seed(1)
    q = torch.randn(2, 3, t_q, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 3, t_k, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 3, t_k, 4, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda q, k, v: ops.attention(q, k, v, causal=causal, impl="torch"), (q, k, v))


@pytest.mark.parametrize("t_q,t_k", [(6, 6), (3, 6), (1, 6)])
def test_attention_matches_explicit_softmax(t_q, t_k):
    """The end-aligned causal mask, checked against softmax(q k^T / sqrt(hs) + mask) v written out."""
    torch.manual_seed(2)
    q, k, v = (torch.randn(2, 3, t, 5, dtype=torch.float64) for t in (t_q, t_k, t_k))
    scores = q @ k.transpose(-2, -1) / math.sqrt(5)  # (B, nh, Tq, Tk)
    for i in range(t_q):
        scores[..., i, t_k - t_q + i + 1 :] = float("-inf")  # query i sees keys up to Tk - Tq + i
    expected = torch.softmax(scores, dim=-1) @ v
    got = ops.attention(q, k, v, causal=True, impl="torch")
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_attention_rejects_more_queries_than_keys():
    q, k = torch.randn(1, 1, 4, 8), torch.randn(1, 1, 3, 8)
    with pytest.raises(ValueError, match="at least as many keys as queries"):
        ops.attention(q, k, k, causal=True)


def test_gradcheck_attention_module():
    attn = float64_model(CausalSelfAttention)
    gradcheck_module(attn, torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True))


def test_gradcheck_mlp():
    mlp = float64_model(MLP)
    gradcheck_module(mlp, torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True))


def test_gradcheck_block():
    block = float64_model(Block)
    gradcheck_module(block, torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True))


@pytest.mark.parametrize("tie_embeddings", [True, False])
def test_gradcheck_whole_gpt(tie_embeddings):
    """The loss of a whole tiny GPT against every parameter, tied and untied heads."""
    config = GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8, tie_embeddings=tie_embeddings)
    model = float64_model(GPT, config)
    torch.manual_seed(3)
    idx = torch.randint(0, 11, (2, 6))
    targets = torch.randint(0, 11, (2, 6))
    targets[0, :2] = IGNORE_INDEX  # the ignored positions must drop out of the gradient as well
    gradcheck_module(model, idx, targets)


@given(
    tokens=st.lists(st.integers(0, TINY.vocab_size - 1), min_size=2, max_size=TINY.block_size),
    data=st.data(),
)
def test_causality(tokens, data):
    """Changing the tokens after position t never changes the logits at positions <= t."""
    model = float64_model(GPT).eval()
    t = data.draw(st.integers(0, len(tokens) - 2), label="t")
    changed = tokens[: t + 1] + data.draw(
        st.lists(st.integers(0, TINY.vocab_size - 1), min_size=len(tokens) - t - 1, max_size=len(tokens) - t - 1),
        label="new suffix",
    )
    with torch.no_grad():
        a, _ = model(torch.tensor([tokens]))
        b, _ = model(torch.tensor([changed]))
    torch.testing.assert_close(a[0, : t + 1], b[0, : t + 1], rtol=0, atol=1e-12)


def test_causality_can_fail_without_mask():
    """The causality check bites: a model without the mask does see the future."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 1, 4, 8) for _ in range(3))
    k2, v2 = k.clone(), v.clone()
    k2[..., 3, :] += 1.0
    v2[..., 3, :] += 1.0
    masked = ops.attention(q, k, v, causal=True) - ops.attention(q, k2, v2, causal=True)
    unmasked = ops.attention(q, k, v, causal=False) - ops.attention(q, k2, v2, causal=False)
    assert masked[..., :3, :].abs().max() == 0
    assert unmasked[..., :3, :].abs().max() > 1e-3


def test_gpt2_parameter_count():
    with torch.device("meta"):  # shapes only: no 500 MB allocation
        model = GPT(GPTConfig.from_preset("gpt2"))
    assert model.num_params() == 124_439_808
    assert model.num_params(non_embedding=True) == 124_439_808 - 1024 * 768


def test_untied_model_counts_its_head():
    tied = GPT(GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=16))
    untied = GPT(GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=16, tie_embeddings=False))
    assert untied.num_params() - tied.num_params() == 50 * 16
    assert tied.lm_head.weight is tied.transformer.wte.weight


def test_flops_per_token_matches_counted_matmuls():
    """The formula against torch's FLOP counter, forward and forward+backward, attention included.

    The counter sees attention's matmuls only on SDPA's math backend. It counts matmuls alone, so
    the formula's 2 FLOPs per bias and LayerNorm parameter (1.7% at this size, far less at scale)
    is the gap the tolerance allows.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    config = GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=32, impl="torch")
    model = GPT(config)
    idx = torch.randint(0, 64, (1, 32))
    forward_counter, training_counter = FlopCounterMode(display=False), FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH):
        with forward_counter, torch.no_grad():
            model(idx)
        with training_counter:
            model(idx, idx)[1].backward()
    assert model.flops_per_token(32, training=False) == pytest.approx(forward_counter.get_total_flops() / 32, rel=0.03)
    assert model.flops_per_token(32) == pytest.approx(training_counter.get_total_flops() / 32, rel=0.03)


def test_gpt2_naming():
    names = set(dict(GPT(TINY).named_parameters()))
    for expected in ("transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.ln_1.weight",
                     "transformer.h.0.attn.c_attn.weight", "transformer.h.1.attn.c_proj.bias",
                     "transformer.h.1.mlp.c_fc.weight", "transformer.h.1.mlp.c_proj.weight",
                     "transformer.h.0.ln_2.bias", "transformer.ln_f.weight"):
        assert expected in names, expected


def test_residual_projections_are_scaled_down():
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=64, block_size=16, n_layer=8, n_head=4, n_embd=128)
    model = GPT(config)
    fc_std = model.transformer.h[0].mlp.c_fc.weight.std().item()
    proj_std = torch.cat([b.mlp.c_proj.weight.flatten() for b in model.transformer.h]).std().item()
    assert fc_std == pytest.approx(0.02, rel=0.05)
    assert proj_std == pytest.approx(0.02 / math.sqrt(16), rel=0.05)


def test_initial_loss_near_uniform():
    """A fresh model's logits start near uniform, so its loss is close to ln(vocab_size)."""
    torch.manual_seed(0)
    config = GPTConfig.from_preset("tiny")
    model = GPT(config)
    idx = torch.randint(0, config.vocab_size, (8, config.block_size))
    targets = torch.randint(0, config.vocab_size, (8, config.block_size))
    with torch.no_grad():
        _, loss = model(idx, targets)
    assert abs(loss.item() - math.log(config.vocab_size)) < 0.2


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=64)
    model = GPT(config)
    idx = torch.randint(0, 64, (4, 32))
    targets = torch.randint(0, 64, (4, 32))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for step in range(400):
        _, loss = model(idx, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if loss.item() < 0.05:
            break
    assert loss.item() < 0.05, f"loss {loss.item():.3f} after {step + 1} steps"


@pytest.mark.parametrize(
    "make_idx,error,match",
    [
        (lambda: torch.zeros(2, 4), TypeError, "integer token ids"),
        (lambda: [[1, 2, 3]], TypeError, "torch.Tensor"),
        (lambda: torch.zeros(4, dtype=torch.long), ValueError, r"shape \(batch, time\)"),
        (lambda: torch.zeros(1, 2, 4, dtype=torch.long), ValueError, r"shape \(batch, time\)"),
        (lambda: torch.zeros(2, 9, dtype=torch.long), ValueError, "longer than the block size 8"),
        (lambda: torch.zeros(2, 0, dtype=torch.long), ValueError, "no tokens"),
        (lambda: torch.tensor([[1, 11]]), ValueError, r"token id 11 is outside the vocabulary \[0, 11\)"),
        (lambda: torch.tensor([[-1, 2]]), ValueError, "token id -1 is outside"),
    ],
)
def test_bad_inputs_raise_clear_errors(make_idx, error, match):
    model = GPT(TINY)
    with pytest.raises(error, match=match):
        model(make_idx())


def test_bad_targets_raise_clear_errors():
    model = GPT(TINY)
    idx = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="targets shape"):
        model(idx, torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="target ids must be in"):
        model(idx, torch.full((2, 4), 11))
    with pytest.raises(TypeError, match="targets must be an integer tensor"):
        model(idx, torch.zeros(2, 4))
    _, loss = model(idx, torch.full((2, 4), IGNORE_INDEX).index_fill_(1, torch.tensor([0]), 3))
    assert torch.isfinite(loss)
