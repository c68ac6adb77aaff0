"""Flash attention (FlashAttention-2 style) in Triton: forward and backward, causal or not.

Spec
----
`flash_attention(q, k, v, causal)` computes softmax(q k^T / sqrt(hs) + mask) v for
q (B, nh, Tq, hs) and k, v (B, nh, Tk, hs), any strides, returning a contiguous (B, nh, Tq, hs) tensor
in q's dtype. With `causal=True` the mask is aligned to the END of the keys: query i sees keys
0 .. i + (Tk - Tq), which is the usual causal mask when Tq == Tk and what decoding with a KV cache
needs when Tq < Tk (the new queries are the last ones). Non-causal attention allows any Tq and Tk.

Algorithm (Dao 2023, "FlashAttention-2"). The (Tq, Tk) score matrix is never stored:
- forward: one program per (query block of BLOCK_M rows, head, batch) walks the key blocks, keeping a
  running row maximum m, a running denominator l and an unnormalised output acc; each new block
  rescales them by exp(m_old - m_new) (the online softmax). It stores O = acc / l and the row
  log-sum-exp lse = m + log(l). Exponentials are exp2 of scores pre-multiplied by log2(e).
- backward: delta_i = rowsum(dO_i * O_i), then two kernels that recompute P = exp(S - lse) from q, k
  and the saved lse: one program per KEY block accumulates dV = P^T dO and dK = dS^T Q (dS = P * (dP -
  delta), dP = dO V^T) over the query blocks that see it; one program per QUERY block accumulates
  dQ = dS K over its key blocks. Every output element is written by exactly one program, summing in
  a fixed order: no atomics, so gradients are bitwise reproducible run to run on the same device.
- causal blocks wholly below the diagonal skip the mask; only the blocks that straddle the diagonal
  (or the sequence end) pay for it. Blocks wholly above the diagonal are never visited.

Dtypes: fp16, bf16 and fp32, plus fp64 (for gradcheck; slow). q, k and v share one
dtype. Matmuls accumulate in fp32 (fp64 for fp64); m, l, lse and delta are fp32 (fp64 for fp64);
P and dS are rounded to the input dtype before their matmuls, as FlashAttention does. fp32 inputs use
IEEE fp32 products (not tf32), matching PyTorch's default accuracy.

Shapes: any B, nh, Tq >= 1, Tk >= 1 (masks, not multiples of the block size); head size 1 to 128,
padded to a power of two >= 16 inside the kernel (80 runs as 128 with the extra columns masked).
Larger heads are refused: their tiles would not fit the on-chip memory our block sizes assume.

Limits: no dropout, no attention bias, no grouped-query heads; softmax scale fixed at 1/sqrt(hs).
Runs on CUDA tensors (compute capability 8.0 or newer), or on CPU tensors under TRITON_INTERPRET=1
(Triton's interpreter; for tests, and fp32/fp16 only: the interpreter multiplies bf16 tiles wrongly,
triton-lang/triton #11584). Written for Triton 3.6 to 3.9: plain pointer arithmetic, no block
pointers or TMA descriptors; `python bench/kernels.py --compile_report` compiles every tile
configuration for sm_90 without a GPU and shows registers, spills and shared memory.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from kernels.placement import device_reason, is_interpreted

MAX_HEAD_SIZE = 128
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
LN2 = math.log(2.0)
LOG2E = 1.0 / LN2


# ----------------------------------------------------------------------------------------------------
# 1. PyTorch reference: the definition, written out.
# ----------------------------------------------------------------------------------------------------


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """softmax(q k^T / sqrt(hs) + end-aligned causal mask) v, in the inputs' own dtype."""
    t_q, t_k = q.shape[-2], k.shape[-2]
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))  # (B, nh, Tq, Tk)
    if causal:
        visible = torch.ones(t_q, t_k, dtype=torch.bool, device=q.device).tril(diagonal=t_k - t_q)
        scores = scores.masked_fill(~visible, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v  # (B, nh, Tq, hs)


# ----------------------------------------------------------------------------------------------------
# 2. Triton kernels. Grid axes: 0 = block of rows (queries or keys), 1 = head, 2 = batch.
#    Every 4-d tensor comes with its own (batch, head, time, channel) strides.
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _key_range(pid_m, T_Q, T_K, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(full, end) for query block pid_m: keys [0, full) are visible to all its rows (no mask needed),
    [full, end) straddle the diagonal or the end of the keys (masked), keys from `end` on are hidden."""
    if CAUSAL:
        # query i sees keys j <= i + (T_K - T_Q)
        end = tl.minimum(T_K, (pid_m + 1) * BLOCK_M + T_K - T_Q)
        full = tl.minimum(T_K, pid_m * BLOCK_M + T_K - T_Q + 1) // BLOCK_N * BLOCK_N
    else:
        end = T_K
        full = T_K // BLOCK_N * BLOCK_N  # only the last, partial block needs the mask
    return full, end


@triton.jit
def _fwd_inner(acc, m_i, l_i, q, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
               offs_m, offs_d, lo, hi, T_K, causal_offset, qk_scale: tl.constexpr, MASKED: tl.constexpr,
               CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Fold key blocks [lo, hi) into one query block's running (acc, m_i, l_i)."""
    d_ok = offs_d < HEAD_DIM  # (BLOCK_D,) false in the padding of a head size that is not a power of 2
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < T_K
        kt = tl.load(k_base + offs_n[None, :] * stride_kt + offs_d[:, None] * stride_kd,
                     mask=n_ok[None, :] & d_ok[:, None], other=0.0)  # K^T (BLOCK_D, BLOCK_N)
        v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)  # V (BLOCK_N, BLOCK_D)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION, out_dtype=acc.dtype) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
        if MASKED:
            visible = n_ok[None, :]
            if CAUSAL:
                visible = visible & (offs_n[None, :] <= offs_m[:, None] + causal_offset)
            s = tl.where(visible, s, float("-inf"))
        # subtle: key 0 is in the first block visited and every row sees it, so m_new is finite from
        # then on and a masked score becomes exp2(-inf - m_new) = 0, never a NaN
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])  # (BLOCK_M, BLOCK_N)
        alpha = tl.exp2(m_i - m_new)  # rescales what was summed under the old maximum
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION, out_dtype=acc.dtype)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _attn_fwd_kernel(Q, K, V, O, LSE,  # Q, O (B, nh, Tq, hs); K, V (B, nh, Tk, hs); LSE (B, nh, Tq) contiguous
                     sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_t, sk_d, sv_b, sv_h, sv_t, sv_d,
                     so_b, so_h, so_t, so_d, N_HEAD, T_Q, T_K,
                     CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_D: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                     QK_SCALE: tl.constexpr):
    pid_m, h, b = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_m[:, None] < T_Q) & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_t + offs_d[None, :] * sq_d, mask=ok, other=0.0)
    k_base, v_base = K + b * sk_b + h * sk_h, V + b * sv_b + h * sv_h
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC_DTYPE)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC_DTYPE)
    l_i = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
    causal_offset = T_K - T_Q  # query i sees keys j <= i + causal_offset
    full, end = _key_range(pid_m, T_Q, T_K, CAUSAL, BLOCK_M, BLOCK_N)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, k_base, v_base, sk_t, sk_d, sv_t, sv_d, offs_m, offs_d, 0,
                               full, T_K, causal_offset, QK_SCALE, False, CAUSAL, HEAD_DIM, BLOCK_N, DOT_PRECISION)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, k_base, v_base, sk_t, sk_d, sv_t, sv_d, offs_m, offs_d, full,
                               end, T_K, causal_offset, QK_SCALE, True, CAUSAL, HEAD_DIM, BLOCK_N, DOT_PRECISION)
    out = acc / l_i[:, None]
    tl.store(O + b * so_b + h * so_h + offs_m[:, None] * so_t + offs_d[None, :] * so_d,
             out.to(O.dtype.element_ty), mask=ok)
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453  # from log2 back to natural-log units
    tl.store(LSE + (b * N_HEAD + h) * T_Q + offs_m, lse, mask=offs_m < T_Q)


@triton.jit
def _attn_bwd_delta_kernel(O, DO, DELTA,  # O, DO (B, nh, Tq, hs); DELTA (B, nh, Tq) contiguous
                           so_b, so_h, so_t, so_d, sdo_b, sdo_h, sdo_t, sdo_d, N_HEAD, T_Q,
                           HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                           ACC_DTYPE: tl.constexpr):
    pid_m, h, b = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_m[:, None] < T_Q) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(O + b * so_b + h * so_h + offs_m[:, None] * so_t + offs_d[None, :] * so_d, mask=ok, other=0.0)
    do = tl.load(DO + b * sdo_b + h * sdo_h + offs_m[:, None] * sdo_t + offs_d[None, :] * sdo_d, mask=ok, other=0.0)
    delta = tl.sum(o.to(ACC_DTYPE) * do.to(ACC_DTYPE), 1)  # (BLOCK_M,) = rowsum(dO * O) = rowsum(P * dP)
    tl.store(DELTA + (b * N_HEAD + h) * T_Q + offs_m, delta, mask=offs_m < T_Q)


@triton.jit
def _dkdv_inner(dk, dv, k, v, q_base, do_base, LSE, DELTA, sq_t, sq_d, sdo_t, sdo_d, offs_n, offs_d,
                lo, hi, T_Q, causal_offset, qk_scale: tl.constexpr, MASKED: tl.constexpr, HEAD_DIM: tl.constexpr,
                BLOCK_M: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Add query blocks [lo, hi) to one key block's dK, dV accumulators (BLOCK_N, BLOCK_D)."""
    d_ok = offs_d < HEAD_DIM
    # subtle: padded query rows (>= T_Q) load q = dO = lse = delta = 0, so they add exactly 0 to dK and
    # dV; padded key rows compute values that are never stored. Only the causal mask matters here.
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < T_Q
        qt = tl.load(q_base + offs_m[None, :] * sq_t + offs_d[:, None] * sq_d,
                     mask=m_ok[None, :] & d_ok[:, None], other=0.0)  # Q^T (BLOCK_D, BLOCK_M)
        do = tl.load(do_base + offs_m[:, None] * sdo_t + offs_d[None, :] * sdo_d,
                     mask=m_ok[:, None] & d_ok[None, :], other=0.0)  # dO (BLOCK_M, BLOCK_D)
        lse = tl.load(LSE + offs_m, mask=m_ok, other=0.0) * 1.4426950408889634  # (BLOCK_M,), log2 units
        delta = tl.load(DELTA + offs_m, mask=m_ok, other=0.0)  # (BLOCK_M,)
        st = tl.dot(k, qt, input_precision=DOT_PRECISION, out_dtype=dk.dtype) * qk_scale  # S^T (BLOCK_N, BLOCK_M)
        if MASKED:
            st = tl.where(offs_n[:, None] <= offs_m[None, :] + causal_offset, st, float("-inf"))
        pt = tl.exp2(st - lse[None, :])  # P^T, recomputed from the saved log-sum-exp
        dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=DOT_PRECISION, out_dtype=dv.dtype)
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION, out_dtype=dk.dtype)  # dP^T (BLOCK_N, BLOCK_M)
        dst = pt * (dpt - delta[None, :])  # dS^T: the softmax's backward
        dk = tl.dot(dst.to(qt.dtype), tl.trans(qt), dk, input_precision=DOT_PRECISION, out_dtype=dk.dtype)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV,  # Q, DO (B, nh, Tq, hs); K, V (B, nh, Tk, hs);
                          # LSE, DELTA (B, nh, Tq); DK, DV (B, nh, Tk, hs); the last four contiguous
                          sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_t, sk_d, sv_b, sv_h, sv_t, sv_d,
                          sdo_b, sdo_h, sdo_t, sdo_d, N_HEAD, T_Q, T_K,
                          CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ACC_DTYPE: tl.constexpr,
                          DOT_PRECISION: tl.constexpr, QK_SCALE: tl.constexpr, SM_SCALE: tl.constexpr):
    pid_n, h, b = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_n[:, None] < T_K) & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(K + b * sk_b + h * sk_h + offs_n[:, None] * sk_t + offs_d[None, :] * sk_d, mask=ok, other=0.0)
    v = tl.load(V + b * sv_b + h * sv_h + offs_n[:, None] * sv_t + offs_d[None, :] * sv_d, mask=ok, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC_DTYPE)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC_DTYPE)
    q_base, do_base = Q + b * sq_b + h * sq_h, DO + b * sdo_b + h * sdo_h
    stats = (b * N_HEAD + h) * T_Q
    causal_offset = T_K - T_Q
    if CAUSAL:
        # key j is first seen by query j - causal_offset: skip the query blocks before that; blocks
        # from `full` on see every key of this block, those in [lo, full) straddle the diagonal
        lo = tl.maximum(pid_n * BLOCK_N - causal_offset, 0) // BLOCK_M * BLOCK_M
        full = tl.cdiv(tl.maximum(pid_n * BLOCK_N + BLOCK_N - 1 - causal_offset, 0), BLOCK_M) * BLOCK_M
        full = tl.minimum(full, T_Q)
    else:
        lo = 0
        full = 0
    dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, LSE + stats, DELTA + stats, sq_t, sq_d, sdo_t, sdo_d,
                         offs_n, offs_d, lo, full, T_Q, causal_offset, QK_SCALE, True, HEAD_DIM, BLOCK_M,
                         DOT_PRECISION)
    dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, LSE + stats, DELTA + stats, sq_t, sq_d, sdo_t, sdo_d,
                         offs_n, offs_d, full, T_Q, T_Q, causal_offset, QK_SCALE, False, HEAD_DIM, BLOCK_M,
                         DOT_PRECISION)
    out = (b * N_HEAD + h) * T_K * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DK + out, (dk * SM_SCALE).to(DK.dtype.element_ty), mask=ok)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=ok)


@triton.jit
def _dq_inner(dq, q, do, lse, delta, k_base, v_base, sk_t, sk_d, sv_t, sv_d, offs_m, offs_d, lo, hi, T_K,
              causal_offset, qk_scale: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr,
              BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Add key blocks [lo, hi) to one query block's dQ accumulator (BLOCK_M, BLOCK_D)."""
    d_ok = offs_d < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < T_K
        kt = tl.load(k_base + offs_n[None, :] * sk_t + offs_d[:, None] * sk_d,
                     mask=n_ok[None, :] & d_ok[:, None], other=0.0)  # K^T (BLOCK_D, BLOCK_N)
        vt = tl.load(v_base + offs_n[None, :] * sv_t + offs_d[:, None] * sv_d,
                     mask=n_ok[None, :] & d_ok[:, None], other=0.0)  # V^T (BLOCK_D, BLOCK_N)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION, out_dtype=dq.dtype) * qk_scale  # S (BLOCK_M, BLOCK_N)
        if MASKED:
            visible = n_ok[None, :]
            if CAUSAL:
                visible = visible & (offs_n[None, :] <= offs_m[:, None] + causal_offset)
            s = tl.where(visible, s, float("-inf"))
        p = tl.exp2(s - lse[:, None])
        dp = tl.dot(do, vt, input_precision=DOT_PRECISION, out_dtype=dq.dtype)  # dP (BLOCK_M, BLOCK_N)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(kt.dtype), tl.trans(kt), dq, input_precision=DOT_PRECISION, out_dtype=dq.dtype)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ,  # Q, DO (B, nh, Tq, hs); K, V (B, nh, Tk, hs);
                        # LSE, DELTA (B, nh, Tq); DQ (B, nh, Tq, hs); the last three contiguous
                        sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_t, sk_d, sv_b, sv_h, sv_t, sv_d,
                        sdo_b, sdo_h, sdo_t, sdo_d, N_HEAD, T_Q, T_K,
                        CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ACC_DTYPE: tl.constexpr,
                        DOT_PRECISION: tl.constexpr, QK_SCALE: tl.constexpr, SM_SCALE: tl.constexpr):
    pid_m, h, b = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_m[:, None] < T_Q) & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_t + offs_d[None, :] * sq_d, mask=ok, other=0.0)
    do = tl.load(DO + b * sdo_b + h * sdo_h + offs_m[:, None] * sdo_t + offs_d[None, :] * sdo_d, mask=ok, other=0.0)
    stats = (b * N_HEAD + h) * T_Q
    lse = tl.load(LSE + stats + offs_m, mask=offs_m < T_Q, other=0.0) * 1.4426950408889634  # log2 units
    delta = tl.load(DELTA + stats + offs_m, mask=offs_m < T_Q, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC_DTYPE)
    k_base, v_base = K + b * sk_b + h * sk_h, V + b * sv_b + h * sv_h
    causal_offset = T_K - T_Q
    full, end = _key_range(pid_m, T_Q, T_K, CAUSAL, BLOCK_M, BLOCK_N)  # the forward pass's key ranges
    dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, sk_t, sk_d, sv_t, sv_d, offs_m, offs_d, 0, full, T_K,
                   causal_offset, QK_SCALE, False, CAUSAL, HEAD_DIM, BLOCK_N, DOT_PRECISION)
    dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, sk_t, sk_d, sv_t, sv_d, offs_m, offs_d, full, end, T_K,
                   causal_offset, QK_SCALE, True, CAUSAL, HEAD_DIM, BLOCK_N, DOT_PRECISION)
    out = (b * N_HEAD + h) * T_Q * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DQ + out, (dq * SM_SCALE).to(DQ.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------------------------------
# 3. Launchers: tile sizes per kernel, dtype and head size; the grids; the buffers.
# ----------------------------------------------------------------------------------------------------

INTERPRETED = is_interpreted(_attn_fwd_kernel)  # TRITON_INTERPRET=1 at import


@dataclass(frozen=True)
class Tiles:
    """One kernel's launch shape: query rows and key rows per tile, warps, software-pipeline depth."""

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2


def choose_tiles(kernel: str, dtype: torch.dtype, block_d: int) -> Tiles:
    """Tile sizes for "fwd", "dkdv" or "dq", chosen for an H100 (at most 128 KB of shared memory, so
    they fit an A100 too; `_launch` shrinks them on smaller GPUs).

    16-bit inputs use tensor cores, where large tiles amortise the loads: 128 query rows per forward
    and dQ program, 128 keys per dK/dV program (64 for head size 128). fp32 (IEEE products) and fp64
    run on FMA units, which need far more registers per tile, so their tiles are small. Every entry
    was compiled for sm_90 with Triton 3.6 and 3.9: the 16-bit ones spill no registers to local
    memory, fp32 and fp64 at most 16 bytes. No GPU has timed them yet (see the README).
    The interpreter runs one numpy op per tile op: fewer, larger tiles are faster there.
    """
    if INTERPRETED:
        return Tiles(32, 32)
    big = block_d > 64
    if dtype in (torch.float16, torch.bfloat16):
        return {
            "fwd": Tiles(128, 64, 8, 3) if big else Tiles(128, 64, 4, 3),
            "dkdv": Tiles(32, 64, 8, 2) if big else Tiles(32, 128, 8, 3),
            "dq": Tiles(128, 32, 8, 2) if big else Tiles(128, 32, 4, 3),
        }[kernel]
    if dtype == torch.float32:
        return {
            "fwd": Tiles(16, 16, 4, 2) if big else Tiles(32, 32, 4, 2),
            "dkdv": Tiles(16, 32, 8, 2) if big else Tiles(16, 32, 4, 2),
            "dq": Tiles(16, 16, 4, 2) if big else Tiles(32, 32, 4, 2),
        }[kernel]
    return Tiles(16, 32, 4, 1) if kernel == "fwd" else Tiles(16, 16, 4, 1)  # fp64: for gradcheck only


def _launch(kernel, grid, tiles: Tiles, args, **constants):
    """Launch with `tiles`; if the GPU lacks the shared memory for them, retry shallower, then smaller.

    Why: the tile table is tuned for an H100; a GPU with less shared memory per block (e.g. consumer
    cards) rejects those tiles at launch with OutOfResources rather than running slowly.
    """
    tries = [tiles, replace(tiles, num_stages=1),
             replace(tiles, block_m=max(16, tiles.block_m // 2), block_n=max(16, tiles.block_n // 2), num_stages=1)]
    for i, t in enumerate(tries):
        try:
            return kernel[grid(t)](*args, **constants, BLOCK_M=t.block_m, BLOCK_N=t.block_n,
                                   num_warps=t.num_warps, num_stages=t.num_stages)
        except Exception as err:  # triton.runtime.errors.OutOfResources; its module moved between versions
            if type(err).__name__ != "OutOfResources" or i == len(tries) - 1:
                raise


def _kernel_constants(q: torch.Tensor, causal: bool) -> dict:
    wide = q.dtype in (torch.float32, torch.float64)
    return dict(
        CAUSAL=causal,
        HEAD_DIM=q.shape[-1],
        BLOCK_D=max(16, triton.next_power_of_2(q.shape[-1])),  # tl.dot needs every dimension >= 16
        ACC_DTYPE=tl.float64 if q.dtype == torch.float64 else tl.float32,
        DOT_PRECISION="ieee" if wide else "tf32",  # 16-bit operands ignore it; fp32 must not use tf32
    )


def _scales(head_size: int) -> dict:
    """The softmax scale 1/sqrt(hs), and that times log2(e) for exp2, as compile-time constants:
    a Python float passed as a kernel argument arrives as fp32, which would cap fp64 attention at
    fp32 accuracy; a constexpr is folded into the kernel at the accumulator's precision."""
    sm_scale = 1.0 / math.sqrt(head_size)
    return dict(QK_SCALE=sm_scale * LOG2E, SM_SCALE=sm_scale)


def attention_forward(q, k, v, causal: bool, tiles: Tiles | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Output (B, nh, Tq, hs) in q's dtype, contiguous, and the row log-sum-exp (B, nh, Tq) in fp32
    (fp64 for fp64 inputs), natural-log units."""
    B, H, t_q, hs = q.shape
    t_k = k.shape[2]
    consts = _kernel_constants(q, causal)
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    o = torch.empty((B, H, t_q, hs), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, t_q), dtype=acc_dtype, device=q.device)
    tiles = tiles or choose_tiles("fwd", q.dtype, consts["BLOCK_D"])
    args = (q, k, v, o, lse, *q.stride(), *k.stride(), *v.stride(), *o.stride(), H, t_q, t_k)
    _launch(_attn_fwd_kernel, lambda t: (triton.cdiv(t_q, t.block_m), H, B), tiles, args, **consts,
            QK_SCALE=_scales(hs)["QK_SCALE"])
    return o, lse


def attention_backward(do, q, k, v, o, lse, causal: bool, tiles: Tiles | None = None):
    """dq, dk, dv (contiguous, in q's dtype) for the output gradient `do` (B, nh, Tq, hs), any strides."""
    B, H, t_q, hs = q.shape
    t_k = k.shape[2]
    consts = _kernel_constants(q, causal)
    block_d = consts["BLOCK_D"]
    delta = torch.empty_like(lse)  # (B, nh, Tq)
    _attn_bwd_delta_kernel[(triton.cdiv(t_q, 64), H, B)](
        o, do, delta, *o.stride(), *do.stride(), H, t_q, HEAD_DIM=hs, BLOCK_M=64, BLOCK_D=block_d,
        ACC_DTYPE=consts["ACC_DTYPE"], num_warps=4)
    dq = torch.empty((B, H, t_q, hs), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, H, t_k, hs), dtype=q.dtype, device=q.device)
    dv = torch.empty_like(dk)
    common = (*q.stride(), *k.stride(), *v.stride(), *do.stride(), H, t_q, t_k)
    scales = _scales(hs)
    _launch(_attn_bwd_dkdv_kernel, lambda t: (triton.cdiv(t_k, t.block_n), H, B),
            tiles or choose_tiles("dkdv", q.dtype, block_d), (q, k, v, do, lse, delta, dk, dv, *common),
            **consts, **scales)
    _launch(_attn_bwd_dq_kernel, lambda t: (triton.cdiv(t_q, t.block_m), H, B),
            tiles or choose_tiles("dq", q.dtype, block_d), (q, k, v, do, lse, delta, dq, *common),
            **consts, **scales)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------------
# 4. autograd.Function: saves q, k, v, O and the log-sum-exp; the backward recomputes P from them.
# ----------------------------------------------------------------------------------------------------


class FlashAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal: bool, tiles: Tiles | None):
        with torch.cuda.device(q.device) if q.is_cuda else nullcontext():
            o, lse = attention_forward(q, k, v, causal, tiles)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal, ctx.tiles = causal, tiles
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        with torch.cuda.device(q.device) if q.is_cuda else nullcontext():
            dq, dk, dv = attention_backward(do, q, k, v, o, lse, ctx.causal, ctx.tiles)
        return dq, dk, dv, None, None


# ----------------------------------------------------------------------------------------------------
# 5. Public function.
# ----------------------------------------------------------------------------------------------------


def unsupported_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True) -> str | None:
    """Why the Triton kernel cannot run these inputs, or None when it can."""
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4 or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        return f"expects q (B, nh, Tq, hs), k and v (B, nh, Tk, hs); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in DTYPES:
        return f"needs q, k, v of one dtype among fp16, bf16, fp32, fp64; got {q.dtype}, {k.dtype}, {v.dtype}"
    reason = device_reason([q, k, v], "q, k, v", INTERPRETED)
    if reason:
        return reason
    if not 1 <= q.shape[3] <= MAX_HEAD_SIZE:
        return f"head size {q.shape[3]} is outside the supported 1..{MAX_HEAD_SIZE}"
    if q.shape[2] == 0 or k.shape[2] == 0 or q.shape[0] * q.shape[1] == 0:
        return f"empty input: q {tuple(q.shape)}, k {tuple(k.shape)}"
    if causal and q.shape[2] > k.shape[2]:
        return f"causal attention needs Tq <= Tk; got Tq={q.shape[2]}, Tk={k.shape[2]}"
    if q.shape[0] > 65535 or q.shape[1] > 65535:
        return f"batch {q.shape[0]} or heads {q.shape[1]} exceed the grid limit of 65535"
    return None


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                    use_triton: bool | None = None, tiles: Tiles | None = None) -> torch.Tensor:
    """Attention over q (B, nh, Tq, hs), k, v (B, nh, Tk, hs) -> (B, nh, Tq, hs); see the module spec.

    `use_triton`: True runs the kernel (ValueError when it cannot run the input), False the PyTorch
    reference, None the kernel when it can and the reference otherwise. `tiles` overrides the tile
    sizes of all three kernels (tests use it to cross many tile boundaries on small inputs).
    """
    if use_triton is False:
        return attention_reference(q, k, v, causal)
    reason = unsupported_reason(q, k, v, causal)
    if reason is not None:
        if use_triton:
            raise ValueError(f"flash_attention (Triton) cannot run this input: {reason}")
        return attention_reference(q, k, v, causal)
    return FlashAttentionFunction.apply(q, k, v, causal, tiles)
