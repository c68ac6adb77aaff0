"""The flash attention kernel against a float64 reference, with PyTorch's own error as the yardstick.

The rule FlashAttention's tests use: on the same inputs, the kernel's error against a float64
reference may be at most twice PyTorch's error (`F.scaled_dot_product_attention` in the same dtype,
our "torch" path) against that reference, or a small floor of a few ulps when PyTorch happens to be
nearly exact. That holds for the output and for dq, dk and dv.

On a machine without CUDA the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1)
in fp32 and fp16; bf16 matmuls only on a GPU (the interpreter gets bf16 tl.dot wrong, see SKIP_BF16).
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from kernel_report import DEVICE, assert_within
from torch.autograd import gradcheck

from kernels.attention import Tiles, attention_reference, flash_attention
from minillm import ops

# the error allowed even where PyTorch happens to be nearly exact, at the reference's scale (at least 1):
# about one ulp at 1.0 for 16-bit types, 16 for fp32. Why: a gradient that is zero analytically
# (dk when each query sees a single key) comes out as rounding noise of length-hs dot products.
FLOOR = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
SKIP_BF16 = pytest.mark.skipif(
    DEVICE == "cpu",
    reason="Triton's interpreter computes tl.dot on bf16 operands from their raw bits (triton-lang/triton "
    "#11584), so bf16 attention is tested on a GPU only",
)
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def make_inputs(b, h, t_q, t_k, hs, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, t, hs, generator=gen) for t in (t_q, t_k, t_k))
    do = torch.randn(b, h, t_q, hs, generator=gen)
    return [t.to(device=DEVICE, dtype=dtype) for t in (q, k, v, do)]


def forward_backward(fn, q, k, v, do, dtype):
    """fn's output and (dq, dk, dv) for inputs and output gradient cast to `dtype`."""
    ins = [t.detach().to(dtype).requires_grad_(True) for t in (q, k, v)]
    out = fn(*ins)
    return [out, *torch.autograd.grad(out, ins, do.to(dtype))]


def check_against_reference(q, k, v, do, causal, tiles=None):
    dtype = q.dtype
    ref = forward_backward(lambda q, k, v: attention_reference(q, k, v, causal), q, k, v, do, torch.float64)
    ours = forward_backward(lambda q, k, v: flash_attention(q, k, v, causal, use_triton=True, tiles=tiles),
                            q, k, v, do, dtype)
    peer = forward_backward(lambda q, k, v: ops.attention(q, k, v, causal=causal, impl="torch"), q, k, v, do, dtype)
    for name, got, want, torch_out in zip(["out", "dq", "dk", "dv"], ours, ref, peer):
        assert got.dtype == dtype and got.shape == want.shape
        torch_err = (torch_out.double() - want).abs().max().item()
        floor = FLOOR[dtype] * max(1.0, want.abs().max().item())
        assert_within(f"{name} (torch's own error {torch_err:.3g})", got, want, max(2 * torch_err, floor))


@st.composite
def attention_case(draw):
    causal = draw(st.booleans())
    t_q = draw(st.one_of(st.sampled_from([1, 17]), st.integers(1, 70)))
    if causal or draw(st.booleans()):
        t_k = t_q + draw(st.sampled_from([0, 0, 1, draw(st.integers(0, 40))]))  # Tq <= Tk, often equal
    else:
        t_k = draw(st.integers(1, 70))  # non-causal attention allows Tq > Tk too
    return dict(
        b=draw(st.integers(1, 2)), h=draw(st.integers(1, 2)), t_q=t_q, t_k=t_k, causal=causal,
        hs=draw(st.sampled_from([4, 16, 24, 32, 64, 80])),
        dtype=draw(st.sampled_from(DTYPES)),
        tiles=draw(st.sampled_from([None, Tiles(16, 16), Tiles(16, 32), Tiles(32, 16)])),
        seed=draw(st.integers(0, 2**16)),
    )


@given(case=attention_case())
def test_matches_float64_reference_within_twice_torch_error(case):
    q, k, v, do = make_inputs(case["b"], case["h"], case["t_q"], case["t_k"], case["hs"], case["dtype"], case["seed"])
    check_against_reference(q, k, v, do, case["causal"], case["tiles"])


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("t_q,t_k", [(1, 1), (17, 17), (97, 97), (1, 97), (17, 97)])
def test_odd_lengths_and_kv_cache_shapes(t_q, t_k, causal):
    """Sequence lengths 1, 17, 97, batch 1, and short query blocks against a long key cache."""
    q, k, v, do = make_inputs(1, 2, t_q, t_k, 80, torch.float32, seed=t_q * 1000 + t_k)
    check_against_reference(q, k, v, do, causal)


@pytest.mark.parametrize("hs", [16, 64])
def test_fp16_long_causal(hs):
    q, k, v, do = make_inputs(1, 1, 97, 97, hs, torch.float16, seed=hs)
    check_against_reference(q, k, v, do, causal=True, tiles=Tiles(16, 32))


@SKIP_BF16
@pytest.mark.parametrize("hs", [16, 64, 80, 128])
@pytest.mark.parametrize("t_q,t_k", [(1, 1), (97, 97), (17, 97), (1025, 1025)])
def test_bf16_on_gpu(t_q, t_k, hs):
    q, k, v, do = make_inputs(2, 3, t_q, t_k, hs, torch.bfloat16, seed=hs + t_q)
    check_against_reference(q, k, v, do, causal=True)


def test_strided_inputs_as_the_model_passes_them():
    """q, k, v as views of one (B, T, 3C) projection, heads transposed out; dO non-contiguous too."""
    B, T, nh, hs = 2, 23, 3, 16
    qkv = torch.randn(B, T, 3 * nh * hs, device=DEVICE)
    q, k, v = (t.view(B, T, nh, hs).transpose(1, 2) for t in qkv.split(nh * hs, dim=2))
    do = torch.randn(B, T, nh, hs, device=DEVICE).transpose(1, 2)
    assert not (q.is_contiguous() or do.is_contiguous())
    check_against_reference(q, k, v, do, causal=True, tiles=Tiles(16, 16))
    # out.sum().backward() hands the kernel an expanded dO whose strides are all 0
    check_against_reference(q, k, v, torch.ones(1, 1, 1, 1, device=DEVICE).expand_as(q), causal=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_backward_is_bitwise_deterministic(dtype):
    """One program per key block for dK/dV, one per query block for dQ: no atomics, identical bits."""
    q, k, v, do = make_inputs(1, 2, 70, 70, 32, dtype, seed=5)
    runs = [forward_backward(lambda q, k, v: flash_attention(q, k, v, True, use_triton=True, tiles=Tiles(16, 16)),
                             q, k, v, do, dtype) for _ in range(2)]
    for name, first, second in zip(["out", "dq", "dk", "dv"], *runs):
        assert torch.equal(first, second), f"{name} differs between two identical runs"


@pytest.mark.parametrize("causal,t_q,t_k", [(True, 3, 3), (True, 2, 5), (False, 4, 3)])
def test_gradcheck_float64(causal, t_q, t_k):
    """The hand-written backward is the derivative of the kernel's own forward (finite differences)."""
    q, k, v, _ = make_inputs(1, 1, t_q, t_k, 5, torch.float64, seed=6)
    ins = tuple(t.requires_grad_(True) for t in (q, k, v))
    assert gradcheck(lambda q, k, v: flash_attention(q, k, v, causal, use_triton=True), ins, fast_mode=True)


def test_refuses_what_it_cannot_run():
    q = torch.randn(1, 1, 4, 160, device=DEVICE)
    with pytest.raises(ValueError, match="head size 160"):
        flash_attention(q, q, q, use_triton=True)
    q = torch.randn(1, 1, 4, 16, device=DEVICE)
    with pytest.raises(ValueError, match="Tq <= Tk"):
        flash_attention(q, q[:, :, :2], q[:, :, :2], causal=True, use_triton=True)
    with pytest.raises(ValueError, match="one dtype"):
        flash_attention(q, q.half(), q, use_triton=True)
    # without use_triton=True the head size the kernel refuses goes to the reference instead
    big = torch.randn(1, 1, 4, 160, device=DEVICE)
    assert flash_attention(big, big, big).shape == big.shape
