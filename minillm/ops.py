"""The dispatch point: the two operations that have fused Triton kernels, and the choice between paths.

`layer_norm` and `attention` are the only places in the model where the code path can differ. Both take
an `impl` argument:

- "torch": PyTorch's own ops (`F.layer_norm`, `F.scaled_dot_product_attention`). Runs everywhere, any
  dtype, float64 included, so gradcheck and CPU training use it.
- "triton": the fused kernels in `kernels/`. Raises a clear error when they cannot run the input
  (Triton missing, CPU tensors without TRITON_INTERPRET=1, a dtype or shape outside the kernel's
  spec, attention dropout, which the kernel does not implement).
- "auto": Triton for CUDA tensors when Triton imports and the kernel supports the input, PyTorch
  otherwise. This is the default. CPU tensors always take PyTorch here, even under TRITON_INTERPRET=1:
  the interpreter is a testing tool, far too slow for real work.

The choice is an argument, never a global switch, so two models in one process can differ and a test
can force either path.

Attention takes queries and keys of different lengths: with `causal=True` the mask is aligned to the
*end* of the keys, so query i (of Tq) sees keys 0 .. Tk - Tq + i. For Tq == Tk that is the usual
causal mask; for Tq < Tk it is what decoding with a KV cache needs (the new queries come last). A batch
of sequences of different lengths in one KV cache needs a mask per row instead: pass it as `mask`
(the PyTorch path runs it).
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

from minillm.config import IMPLS


def check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(IMPLS)}; got {impl!r}")


def _kernel(name: str, impl: str, first_tensor: torch.Tensor, reason_args: tuple, extra_reason: str | None = None):
    """The `kernels.<name>` module when `impl` asks for Triton and it can run the input, else None.

    Imported lazily: `impl="torch"` and CPU tensors under "auto" never import Triton. With
    impl="triton", a reason it cannot run becomes a ValueError.
    """
    if impl == "torch" or (impl == "auto" and first_tensor.device.type != "cuda"):
        return None
    reason = extra_reason
    module = None
    if reason is None:
        try:
            module = importlib.import_module(f"kernels.{name}")
        except ImportError as err:  # no triton installed, or a broken install
            reason = f"Triton is not importable ({err})"
        else:
            reason = module.unsupported_reason(*reason_args)
    if reason is None:
        return module
    if impl == "triton":
        raise ValueError(f"{name} impl='triton' cannot run this input: {reason}")
    return None


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float = 1e-5,
    impl: str = "auto",
) -> torch.Tensor:
    """LayerNorm over the last dimension of `x` (..., C) with `weight` and optional `bias` (C,)."""
    check_impl(impl)
    kernel = _kernel("layernorm", impl, x, (x, weight, bias))
    if kernel is not None:
        return kernel.layer_norm(x, weight, bias, eps, use_triton=True)
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    dropout_p: float = 0.0,
    impl: str = "auto",
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention: q (B, nh, Tq, hs), k and v (B, nh, Tk, hs) -> (B, nh, Tq, hs).

    The softmax scale is 1/sqrt(hs). `dropout_p` applies to the attention weights (training only;
    pass 0.0 in eval mode). `mask`, a bool tensor broadcastable to (B, nh, Tq, Tk) that is True where
    a query may see a key, replaces the causal mask (pass causal=False with it); every query must see
    at least one key. The PyTorch path runs it (the fused kernel is causal-only).
    """
    check_impl(impl)
    if q.dim() != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"attention expects q (B, nh, Tq, hs) and k, v (B, nh, Tk, hs); got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    t_q, t_k = q.shape[2], k.shape[2]
    if causal and t_q > t_k:
        raise ValueError(f"causal attention needs at least as many keys as queries; got Tq={t_q}, Tk={t_k}")
    if mask is not None:
        if causal:
            raise ValueError("attention: pass causal=False with an explicit mask (the mask replaces the causal one)")
        _kernel("attention", impl, q, (q, k, v, causal), "an explicit mask: the kernel is causal-only")  # raises for impl='triton'
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    no_dropout = None if dropout_p == 0.0 else f"dropout_p={dropout_p}: the kernel has no dropout (use impl='torch')"
    kernel = _kernel("attention", impl, q, (q, k, v, causal), no_dropout)
    if kernel is not None:
        return kernel.flash_attention(q, k, v, causal=causal, use_triton=True)
    if not causal or t_q == t_k or t_q == 1:  # one query at the end sees every key: no mask needed
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal and t_q > 1)
    # Tq < Tk: SDPA's is_causal aligns the mask to the start, so build the end-aligned one ourselves
    visible = torch.ones(t_q, t_k, dtype=torch.bool, device=q.device).tril(diagonal=t_k - t_q)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, dropout_p=dropout_p)
