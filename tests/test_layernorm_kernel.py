"""The fused LayerNorm kernel against a float64 PyTorch reference: forward, dx, dweight, dbias.

On a machine without CUDA the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1);
with a GPU the same tests run compiled on it. The reference is `F.layer_norm` in float64 on the very
same (already rounded) inputs, so the only differences left are the kernel's own arithmetic and the
final rounding to the output dtype; tolerances are keyed by that dtype.
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from kernel_report import DEVICE, assert_close
from torch.autograd import gradcheck

from kernels.layernorm import MAX_WIDTH, layer_norm

# (rtol, atol as a fraction of the largest reference value): a few half-ulps of each dtype
TOLERANCE = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def make_inputs(lead, n, dtype, bias, seed, scale=1.0, shift=0.0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, n, generator=gen) * scale + shift
    w = 1.0 + 0.5 * torch.randn(n, generator=gen)
    b = torch.randn(n, generator=gen) if bias else None
    dy = torch.randn(*lead, n, generator=gen)
    cast = lambda t: None if t is None else t.to(device=DEVICE, dtype=dtype)  # noqa: E731
    return cast(x), cast(w), cast(b), cast(dy)


def check_against_reference(x, w, b, dy, eps=1e-5, max_programs=None):
    """Kernel output and gradients vs F.layer_norm in float64 on the same values."""
    params = [w] + ([b] if b is not None else [])
    ins = [t.detach().clone().requires_grad_(True) for t in [x] + params]
    y = layer_norm(ins[0], ins[1], ins[2] if b is not None else None, eps, use_triton=True, max_programs=max_programs)
    grads = torch.autograd.grad(y, ins, dy)
    ref_ins = [t.detach().double().requires_grad_(True) for t in [x] + params]
    y_ref = F.layer_norm(ref_ins[0], (x.shape[-1],), ref_ins[1], ref_ins[2] if b is not None else None, eps)
    ref_grads = torch.autograd.grad(y_ref, ref_ins, dy.double())
    rtol, atol = TOLERANCE[x.dtype]
    assert y.dtype == x.dtype and y.shape == x.shape
    assert_close("y", y, y_ref, rtol, atol)
    for name, g, g_ref in zip(["dx", "dweight", "dbias"], grads, ref_grads):
        assert g.dtype == x.dtype, f"{name} has dtype {g.dtype}, expected {x.dtype}"
        assert_close(name, g, g_ref, rtol, atol)


@given(
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    lead=st.lists(st.integers(1, 6), min_size=1, max_size=2),
    n=st.one_of(st.integers(1, 80), st.sampled_from([127, 384, 768, 1000, 1600])),
    bias=st.booleans(),
    max_programs=st.sampled_from([None, 1, 2, 3]),
    scale=st.sampled_from([0.1, 1.0, 30.0]),
    shift=st.sampled_from([0.0, 3.0]),
    seed=st.integers(0, 2**16),
)
def test_matches_float64_reference(dtype, lead, n, bias, max_programs, scale, shift, seed):
    x, w, b, dy = make_inputs(lead, n, dtype, bias, seed, scale, shift)
    check_against_reference(x, w, b, dy, max_programs=max_programs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lead,n", [((1,), 1), ((1, 97), 17), ((2,), MAX_WIDTH)])
def test_odd_and_widest_shapes(lead, n, dtype):
    """Width 1 (every row is its own mean), batch 1 with 97 rows, and the widest rows promised."""
    x, w, b, dy = make_inputs(lead, n, dtype, True, seed=n)
    check_against_reference(x, w, b, dy)


def test_strided_input_and_gradient():
    """A transposed x and a non-contiguous dy are read through their strides (or copied), not misread."""
    x, w, b, _ = make_inputs((33,), 20, torch.float32, True, seed=1)
    x_t = x.t().contiguous().t()  # (20, 33) storage read as (33, 20): column stride 33
    dy = torch.randn(20, 33, device=DEVICE).t()
    assert not x_t.is_contiguous() and not dy.is_contiguous()
    check_against_reference(x_t, w, b, dy)


def test_strided_weight_and_bias_views():
    """weight and bias that are columns of matrices (stride 2) or expanded scalars (stride 0)."""
    x, _, _, dy = make_inputs((5,), 12, torch.float32, True, seed=3)
    table = torch.randn(12, 2, device=DEVICE, requires_grad=True)
    scalar = torch.tensor(0.25, device=DEVICE, requires_grad=True)
    w, b = table[:, 0], scalar.expand(12)
    assert w.stride() == (2,) and b.stride() == (0,)
    y = layer_norm(x, w, b, use_triton=True)
    grads = torch.autograd.grad(y, (table, scalar), dy)
    y_ref = F.layer_norm(x.double(), (12,), w.double(), b.double())
    ref_grads = torch.autograd.grad(y_ref, (table, scalar), dy.double())
    assert_close("y", y, y_ref, 1e-5, 1e-5)
    for name, g, g_ref in zip(["dtable", "dscalar"], grads, ref_grads):
        assert_close(name, g, g_ref, 1e-5, 1e-5)


def test_gradcheck_float64():
    """The hand-written backward is the derivative of the kernel's own forward (finite differences)."""
    x, w, b, _ = make_inputs((2, 3), 7, torch.float64, True, seed=2)
    ins = tuple(t.requires_grad_(True) for t in (x, w, b))
    assert gradcheck(lambda x, w, b: layer_norm(x, w, b, use_triton=True, max_programs=2), ins)


def test_backward_is_bitwise_deterministic():
    """Partial sums per program, then a fixed-order sum: two backward passes give identical bits."""
    x, w, b, dy = make_inputs((150,), 100, torch.float32, True, seed=3)
    ins = [t.requires_grad_(True) for t in (x, w, b)]
    runs = [torch.autograd.grad(layer_norm(*ins, use_triton=True, max_programs=7), ins, dy) for _ in range(2)]
    for name, first, second in zip(["dx", "dweight", "dbias"], *runs):
        assert torch.equal(first, second), f"{name} differs between two identical backward passes"


@given(
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    rows=st.integers(1, 5),
    n=st.integers(2, 300),
    scale=st.floats(0.5, 100.0),
    shift=st.floats(-50.0, 50.0),
    seed=st.integers(0, 2**16),
)
def test_unit_weight_gives_mean_zero_variance_one(dtype, rows, n, scale, shift, seed):
    """Property: with weight 1 and bias 0 each output row has mean 0 and (biased) variance 1.

    Exactly, the variance is var(x) / (var(x) + eps): eps matters when a row barely varies (16-bit
    rounding of a large shift can even flatten it to a constant, whose output is all zeros).
    """
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, n, generator=gen) * scale + shift).to(device=DEVICE, dtype=dtype)
    ones, zeros = torch.ones(n, device=DEVICE, dtype=dtype), torch.zeros(n, device=DEVICE, dtype=dtype)
    y = layer_norm(x, ones, zeros, eps=1e-5, use_triton=True).double()
    var_x = x.double().var(dim=-1, unbiased=False)
    tol = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    mean, var = y.mean(dim=-1), y.var(dim=-1, unbiased=False)
    assert mean.abs().max() <= tol, f"row means {mean.tolist()} are not 0 within {tol}"
    expected = var_x / (var_x + 1e-5)
    assert (var - expected).abs().max() <= 2 * tol, f"row variances {var.tolist()}, expected {expected.tolist()}"


def test_refuses_what_it_cannot_run():
    x = torch.randn(2, MAX_WIDTH + 1, device=DEVICE)
    w = torch.ones(MAX_WIDTH + 1, device=DEVICE)
    with pytest.raises(ValueError, match=f"row width {MAX_WIDTH + 1}"):
        layer_norm(x, w, None, use_triton=True)
    with pytest.raises(ValueError, match="weight"):
        layer_norm(torch.randn(3, 8, device=DEVICE), torch.ones(7, device=DEVICE), None, use_triton=True)
    with pytest.raises(ValueError, match="int64"):
        layer_norm(torch.ones(3, 8, dtype=torch.long, device=DEVICE), torch.ones(8, device=DEVICE), None, use_triton=True)
    # without use_triton=True the same inputs take the reference instead of failing
    assert layer_norm(x, w, None).shape == x.shape

