"""Fused LayerNorm in Triton: forward, and a backward that gives dx, dweight and dbias.

Spec
----
`layer_norm(x, weight, bias, eps)` normalises each row of x (..., N) over its last dimension:

    y = (x - mean) * rstd * weight + bias,   mean = sum(x) / N,   rstd = 1 / sqrt(sum((x - mean)^2) / N + eps)

(the biased variance, as `torch.nn.functional.layer_norm`). `bias` may be None.

Algorithm:
- forward: one program normalises BLOCK_ROWS whole rows held in registers (one read of x, one write
  of y); it saves mean and rstd per row for the backward pass. Two passes over the registers (mean,
  then the centred sum of squares) rather than a one-pass E[x^2] - E[x]^2, which cancels badly.
- backward: with xhat = (x - mean) * rstd and g = weight * dy, per row
      dx = rstd * (g - mean(g * xhat) * xhat - mean(g)),   dweight = sum_rows(dy * xhat),   dbias = sum_rows(dy).
  Each of P programs takes a contiguous range of rows, writes their dx, and keeps its own fp32 partial
  sums of dweight and dbias; a second kernel adds the P partials column by column in a fixed order.
  No atomics and no locks: results are bitwise reproducible run to run on the same device (P depends
  on the device's multiprocessor count, so two different GPUs may round differently).

Dtypes: x in fp16, bf16, fp32 or fp64 (fp64 for gradcheck); weight and bias in any of those (they are
read as fp32). y and dx take x's dtype, dweight/dbias their parameter's. Statistics, partial sums and
all arithmetic are fp32 (fp64 for fp64 x), whatever the input dtype.

Shapes: any number of leading dimensions (flattened to M rows), any row width 1 <= N <= 16384 (masks,
not multiples of the block size), any row stride. Wider rows are refused: a whole row must fit in
one program's registers (from N = 8192 the backward already spills some to local memory: correct,
a little slower).

Runs on CUDA tensors (compute capability 8.0 or newer), or on CPU tensors under TRITON_INTERPRET=1
(Triton's interpreter; for tests). Written for Triton 3.6 to 3.9.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import triton
import triton.language as tl

from kernels.placement import device_reason, is_interpreted

MAX_WIDTH = 16384
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------------------------------
# 1. PyTorch reference: the formula, in fp32 (fp64 for fp64 inputs).
# ----------------------------------------------------------------------------------------------------


def layer_norm_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float = 1e-5) -> torch.Tensor:
    """The spec's formula written out; autograd differentiates it."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(acc)
    mean = xf.mean(dim=-1, keepdim=True)
    var = ((xf - mean) ** 2).mean(dim=-1, keepdim=True)  # biased, as F.layer_norm
    y = (xf - mean) * torch.rsqrt(var + eps) * weight.to(acc)
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype)


# ----------------------------------------------------------------------------------------------------
# 2. Triton kernels. A tile is (BLOCK_ROWS, BLOCK_N): whole rows, padded to a power of two and masked.
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _ln_fwd_kernel(X, W, B, Y, MEAN, RSTD,  # X (M, N) row stride stride_x; Y (M, N) contiguous;
                   # W, B (N,); MEAN, RSTD (M,) in ACC_DTYPE
                   stride_x, M, N, eps, HAS_BIAS: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                   BLOCK_N: tl.constexpr, ACC_DTYPE: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < M, cols < N
    ok = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)  # subtle: M * N can pass 2^31 elements; int32 offsets would wrap
    x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=ok, other=0.0).to(ACC_DTYPE)
    mean = tl.sum(x, 1) / N  # (BLOCK_ROWS,)
    xc = tl.where(ok, x - mean[:, None], 0.0)  # padding must not enter the variance
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 1) / N + eps)
    y = xc * rstd[:, None] * tl.load(W + cols, mask=col_ok, other=0.0).to(ACC_DTYPE)[None, :]
    if HAS_BIAS:
        y += tl.load(B + cols, mask=col_ok, other=0.0).to(ACC_DTYPE)[None, :]
    tl.store(Y + rows64[:, None] * N + cols[None, :], y.to(Y.dtype.element_ty), mask=ok)
    tl.store(MEAN + rows, mean, mask=row_ok)
    tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def _ln_bwd_kernel(X, W, DY, DX, MEAN, RSTD, DW_PART, DB_PART,  # X (M, N) row stride stride_x; DY (M, N)
                   # row stride stride_dy; DX (M, N) contiguous; W (N,); MEAN, RSTD (M,);
                   # DW_PART, DB_PART (P, N) in ACC_DTYPE, one row per program
                   stride_x, stride_dy, M, N, rows_per_program, HAS_BIAS: tl.constexpr,
                   BLOCK_ROWS: tl.constexpr, BLOCK_N: tl.constexpr, ACC_DTYPE: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(ACC_DTYPE)
    dw = tl.zeros([BLOCK_ROWS, BLOCK_N], dtype=ACC_DTYPE)  # this program's partial sums
    db = tl.zeros([BLOCK_ROWS, BLOCK_N], dtype=ACC_DTYPE)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    for r in range(row_start, row_end, BLOCK_ROWS):
        rows = r + tl.arange(0, BLOCK_ROWS)
        row_ok = rows < row_end
        ok = row_ok[:, None] & col_ok[None, :]
        rows64 = rows.to(tl.int64)
        x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=ok, other=0.0).to(ACC_DTYPE)
        dy = tl.load(DY + rows64[:, None] * stride_dy + cols[None, :], mask=ok, other=0.0).to(ACC_DTYPE)
        mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        xhat = tl.where(ok, (x - mean[:, None]) * rstd[:, None], 0.0)
        g = dy * w[None, :]  # zero in the padding, because dy was loaded as 0 there
        c1 = tl.sum(g * xhat, 1) / N
        c2 = tl.sum(g, 1) / N
        dx = (g - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        tl.store(DX + rows64[:, None] * N + cols[None, :], dx.to(DX.dtype.element_ty), mask=ok)
        dw += dy * xhat
        if HAS_BIAS:
            db += dy
    tl.store(DW_PART + pid * N + cols, tl.sum(dw, 0), mask=col_ok)
    if HAS_BIAS:
        tl.store(DB_PART + pid * N + cols, tl.sum(db, 0), mask=col_ok)


@triton.jit
def _ln_bwd_reduce_kernel(PART, OUT,  # PART (P, N) partial sums in ACC dtype; OUT (N,) in the parameter's dtype
                          P, N, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    acc = tl.zeros([BLOCK_P, BLOCK_N], dtype=PART.dtype.element_ty)
    for p in range(0, P, BLOCK_P):  # always the same order: the sum is reproducible bit for bit
        parts = p + tl.arange(0, BLOCK_P)
        acc += tl.load(PART + parts[:, None] * N + cols[None, :], mask=(parts[:, None] < P) & col_ok[None, :], other=0.0)
    tl.store(OUT + cols, tl.sum(acc, 0).to(OUT.dtype.element_ty), mask=col_ok)


# ----------------------------------------------------------------------------------------------------
# 3. Launchers: tile shape and warps from the row width; the number of backward programs.
# ----------------------------------------------------------------------------------------------------

INTERPRETED = is_interpreted(_ln_fwd_kernel)  # TRITON_INTERPRET=1 at import
# elements per tile: the backward holds five row tiles at once (x, dy, xhat, and two partial sums)
FWD_TILE, BWD_TILE = 4096, 2048


def _tile(n: int, elements: int) -> tuple[int, int, int]:
    """(BLOCK_ROWS, BLOCK_N, num_warps) for rows of width n: whole rows, about `elements` per tile.

    Narrow rows are packed several to a tile so that each program still moves enough bytes to hide
    memory latency; a tile gets one warp per 256 elements (4 to 16 warps), 8 or so per thread.
    """
    block_n = triton.next_power_of_2(n)
    block_rows = max(1, min(16, elements // block_n))
    num_warps = min(16, max(4, block_rows * block_n // 256))
    return block_rows, block_n, num_warps


def _acc_dtype(x: torch.Tensor):
    return (tl.float64, torch.float64) if x.dtype == torch.float64 else (tl.float32, torch.float32)


def layer_norm_forward(x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float):
    """y (M, N) contiguous in x's dtype, and per-row mean and rstd (M,) in fp32 (fp64 for fp64 x)."""
    M, N = x2d.shape
    block_rows, block_n, num_warps = _tile(N, FWD_TILE)
    tl_acc, torch_acc = _acc_dtype(x2d)
    y = torch.empty((M, N), dtype=x2d.dtype, device=x2d.device)
    mean = torch.empty(M, dtype=torch_acc, device=x2d.device)
    rstd = torch.empty(M, dtype=torch_acc, device=x2d.device)
    _ln_fwd_kernel[(triton.cdiv(M, block_rows),)](
        x2d, weight, bias if bias is not None else weight, y, mean, rstd, x2d.stride(0), M, N, eps,
        HAS_BIAS=bias is not None, BLOCK_ROWS=block_rows, BLOCK_N=block_n, ACC_DTYPE=tl_acc, num_warps=num_warps)
    return y, mean, rstd


def layer_norm_backward(dy2d, x2d, weight, bias, mean, rstd, max_programs: int | None = None):
    """dx (M, N) contiguous, dweight, dbias (None without a bias); `max_programs` caps P (tests)."""
    M, N = x2d.shape
    block_rows, block_n, num_warps = _tile(N, BWD_TILE)
    tl_acc, torch_acc = _acc_dtype(x2d)
    if max_programs is None:
        # a few programs per multiprocessor keeps every SM busy; more would only add partial rows
        max_programs = 4 if INTERPRETED else 4 * torch.cuda.get_device_properties(x2d.device).multi_processor_count
    rows_per_program = triton.cdiv(triton.cdiv(M, max(1, max_programs)), block_rows) * block_rows
    programs = triton.cdiv(M, rows_per_program)
    dx = torch.empty((M, N), dtype=x2d.dtype, device=x2d.device)
    dw_part = torch.empty((programs, N), dtype=torch_acc, device=x2d.device)
    db_part = torch.empty((programs, N), dtype=torch_acc, device=x2d.device) if bias is not None else dw_part
    _ln_bwd_kernel[(programs,)](
        x2d, weight, dy2d, dx, mean, rstd, dw_part, db_part, x2d.stride(0), dy2d.stride(0), M, N, rows_per_program,
        HAS_BIAS=bias is not None, BLOCK_ROWS=block_rows, BLOCK_N=block_n, ACC_DTYPE=tl_acc, num_warps=num_warps)
    sums = []
    for part, param in ((dw_part, weight), (db_part, bias)):
        if param is None:
            sums.append(None)
            continue
        out = torch.empty(N, dtype=param.dtype, device=x2d.device)
        _ln_bwd_reduce_kernel[(triton.cdiv(N, 256),)](part, out, programs, N, BLOCK_P=32, BLOCK_N=256, num_warps=4)
        sums.append(out)
    return dx, sums[0], sums[1]


# ----------------------------------------------------------------------------------------------------
# 4. autograd.Function: rows flattened to (M, N); saves x, weight, bias and the statistics.
# ----------------------------------------------------------------------------------------------------


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., N) -> (M, N) with unit column stride; a view when the layout allows, else a copy."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


class LayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps: float, max_programs: int | None):
        x2d = _rows(x)
        with torch.cuda.device(x.device) if x.is_cuda else nullcontext():
            y, mean, rstd = layer_norm_forward(x2d, weight, bias, eps)
        ctx.save_for_backward(x2d, weight, bias, mean, rstd)
        ctx.max_programs = max_programs
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2d, weight, bias, mean, rstd = ctx.saved_tensors
        with torch.cuda.device(x2d.device) if x2d.is_cuda else nullcontext():
            dx, dw, db = layer_norm_backward(_rows(dy), x2d, weight, bias, mean, rstd, ctx.max_programs)
        return dx.view(dy.shape), dw, db, None, None


# ----------------------------------------------------------------------------------------------------
# 5. Public function.
# ----------------------------------------------------------------------------------------------------


def unsupported_reason(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> str | None:
    """Why the Triton kernel cannot run these inputs, or None when it can."""
    n = x.shape[-1] if x.dim() else 0
    if x.dim() == 0 or weight.shape != (n,) or (bias is not None and bias.shape != (n,)):
        return (f"expects x (..., N) with weight and bias (N,); got x {tuple(x.shape)}, weight "
                f"{tuple(weight.shape)}, bias {None if bias is None else tuple(bias.shape)}")
    tensors = [x, weight] + ([bias] if bias is not None else [])
    if any(t.dtype not in DTYPES for t in tensors):
        return f"supports fp16, bf16, fp32, fp64; got {', '.join(str(t.dtype) for t in tensors)}"
    reason = device_reason(tensors, "x, weight and bias", INTERPRETED)
    if reason:
        return reason
    if not 1 <= n <= MAX_WIDTH:
        return f"row width {n} is outside the supported 1..{MAX_WIDTH} (a row must fit in one program)"
    if x.numel() == 0:
        return f"empty input {tuple(x.shape)}"
    return None


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, eps: float = 1e-5,
               use_triton: bool | None = None, max_programs: int | None = None) -> torch.Tensor:
    """LayerNorm of x (..., N) over its last dimension; see the module spec.

    `use_triton`: True runs the kernel (ValueError when it cannot run the input), False the PyTorch
    reference, None the kernel when it can and the reference otherwise. `max_programs` caps the
    number of backward programs, hence of partial sums (tests use it to force several).
    """
    if use_triton is False:
        return layer_norm_reference(x, weight, bias, eps)
    reason = unsupported_reason(x, weight, bias)
    if reason is not None:
        if use_triton:
            raise ValueError(f"layer_norm (Triton) cannot run this input: {reason}")
        return layer_norm_reference(x, weight, bias, eps)
    # the kernels read weight and bias with unit stride: a strided view (a column of a matrix, an
    # expanded scalar) is copied first; autograd carries the gradient back through the copy
    weight = weight.contiguous()
    bias = bias.contiguous() if bias is not None else None
    return LayerNormFunction.apply(x, weight, bias, float(eps), max_programs)
