"""Benchmark the Triton kernels against PyTorch's own ops, on one GPU, in one process.

    python bench/kernels.py                          # attention, layernorm, copy bandwidth, gpt2 step
    python bench/kernels.py --only=attention         # or layernorm, train
    python bench/kernels.py --seq_lens=2048,4096 --head_sizes=128
    python bench/kernels.py --compile_report         # no GPU needed: compile every kernel for sm_90

What it measures (medians of `triton.testing.do_bench`, bf16, one process, same inputs for both):
- attention, causal, batch * T = 16384 tokens and heads * head size = 2048 (FlashAttention's own
  benchmark setup): forward, backward and forward+backward against
  `F.scaled_dot_product_attention` restricted to its flash backend, in TFLOP/s by FlashAttention's
  convention (forward 4 * B * nh * T^2 * hs / 2 for causal; backward 2.5x that; both 3.5x) and as
  the ratio ours / torch (> 1 means ours is faster);
- layernorm forward and forward+backward against `F.layer_norm`, in GB/s of the bytes each must
  move at least (forward: read x, write y; backward: read x and dy, write dx), next to the measured
  device-to-device copy bandwidth;
- a gpt2 (124M) training step, bf16 autocast, AdamW, with `impl="triton"` and `impl="torch"`.

Without a CUDA device it says so, runs a tiny correctness check of both kernels in Triton's
interpreter (seconds), and exits 0. `--compile_report` compiles every kernel configuration the
launchers can pick for a compute capability (default 9.0) without a GPU, and prints registers,
spilled bytes and shared memory per kernel: a kernel that spills or needs more shared memory than
the GPU has shows up here before any GPU time is spent.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class BenchConfig:
    only: str = "all"  # which benchmark: all, attention, layernorm or train
    seq_lens: tuple[int, ...] = (512, 1024, 2048, 4096, 8192, 16384)  # attention sequence lengths
    head_sizes: tuple[int, ...] = (64, 128)  # attention head sizes
    tokens: int = 16384  # batch * sequence length of each attention call
    hidden: int = 2048  # heads * head size of each attention call
    ln_rows: int = 16384  # rows (batch * tokens) of each layernorm call
    ln_widths: tuple[int, ...] = (768, 1024, 1600, 2048, 4096, 8192)  # layernorm row widths
    train_batch: int = 8  # sequences of 1024 tokens per gpt2 training step
    train_steps: int = 20  # timed gpt2 steps per path, after 3 warm-up steps
    compile_report: bool = False  # compile every kernel configuration for `arch` (no GPU needed) and stop
    arch: int = 90  # compute capability for --compile_report, as major*10+minor (90 = H100)

    def __post_init__(self) -> None:
        if self.only not in ("all", "attention", "layernorm", "train"):
            raise ValueError(f"BenchConfig.only must be all, attention, layernorm or train; got {self.only!r}")
        for name in ("tokens", "hidden", "ln_rows", "train_batch", "train_steps", "arch"):
            if getattr(self, name) < 1:
                raise ValueError(f"BenchConfig.{name} must be positive, got {getattr(self, name)}")


def bench_ms(fn, grad_to_none=None) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median")


def attention_table(cfg: BenchConfig) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from kernels.attention import flash_attention

    def torch_flash(q, k, v):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def ours(q, k, v):
        return flash_attention(q, k, v, causal=True, use_triton=True)

    print("\nattention, bf16, causal: TFLOP/s ours / torch flash (ratio)")
    print(f"{'T':>6} {'hs':>4} {'B x nh':>8} | {'forward':^22} | {'backward':^22} | {'fwd+bwd':^22} | max|diff|")
    for hs in cfg.head_sizes:
        for T in cfg.seq_lens:
            B, H = max(1, cfg.tokens // T), max(1, cfg.hidden // hs)
            q, k, v, do = (torch.randn(B, H, T, hs, device="cuda", dtype=torch.bfloat16) for _ in range(4))
            for t in (q, k, v):
                t.requires_grad_(True)
            flops_fwd = 4 * B * H * T * T * hs / 2  # causal: half the score matrix
            cells = []
            for kind, mult in (("fwd", 1.0), ("bwd", 2.5), ("both", 3.5)):
                times = []
                for fn in (ours, torch_flash):
                    if kind == "fwd":
                        with torch.no_grad():
                            times.append(bench_ms(lambda: fn(q, k, v)))
                    elif kind == "bwd":
                        out = fn(q, k, v)
                        times.append(bench_ms(lambda: out.backward(do, retain_graph=True), grad_to_none=[q, k, v]))
                    else:
                        times.append(bench_ms(lambda: fn(q, k, v).backward(do), grad_to_none=[q, k, v]))
                tf = [mult * flops_fwd / (ms * 1e-3) / 1e12 for ms in times]
                cells.append(f"{tf[0]:6.1f} / {tf[1]:6.1f} ({times[1] / times[0]:4.2f}x)")
            with torch.no_grad():
                diff = (ours(q, k, v).float() - torch_flash(q, k, v).float()).abs().max().item()
            print(f"{T:>6} {hs:>4} {f'{B}x{H}':>8} | " + " | ".join(cells) + f" | {diff:.1e}", flush=True)
            del q, k, v, do


def copy_bandwidth_gbs() -> float:
    """Device-to-device copy of 1 GiB: bytes read plus bytes written, per second."""
    src = torch.empty(2**29, device="cuda", dtype=torch.bfloat16).normal_()
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


def layernorm_table(cfg: BenchConfig) -> None:
    from kernels.layernorm import layer_norm

    copy = copy_bandwidth_gbs()
    print(f"\nlayernorm, bf16, {cfg.ln_rows} rows: GB/s ours / torch (ratio); device copy bandwidth {copy:.0f} GB/s")
    print(f"{'N':>6} | {'forward':^22} | {'fwd+bwd':^22} | fwd+bwd % of copy")
    for n in cfg.ln_widths:
        x, dy = (torch.randn(cfg.ln_rows, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        w, b = (torch.randn(n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        params = [x, w, b]
        for t in params:
            t.requires_grad_(True)
        tensor_bytes = x.numel() * x.element_size()
        impls = (lambda: layer_norm(x, w, b, use_triton=True), lambda: F.layer_norm(x, (n,), w, b))
        cells, both_gbs = [], []
        for kind, nbytes in (("fwd", 2 * tensor_bytes), ("both", 5 * tensor_bytes)):
            times = []
            for fn in impls:
                if kind == "fwd":
                    with torch.no_grad():
                        times.append(bench_ms(fn))
                else:
                    times.append(bench_ms(lambda: fn().backward(dy), grad_to_none=params))
            gbs = [nbytes / (ms * 1e-3) / 1e9 for ms in times]
            both_gbs = gbs
            cells.append(f"{gbs[0]:6.0f} / {gbs[1]:6.0f} ({times[1] / times[0]:4.2f}x)")
        print(f"{n:>6} | " + " | ".join(cells) + f" | {100 * both_gbs[0] / copy:5.1f}%", flush=True)
        del x, dy, w, b, params


def train_table(cfg: BenchConfig) -> None:
    from minillm.config import GPTConfig
    from minillm.model import GPT

    print(f"\ngpt2 (124M) training step, batch {cfg.train_batch} x 1024 tokens, bf16 autocast, fused AdamW")
    results = {}
    for impl in ("triton", "torch"):
        torch.manual_seed(0)
        model = GPT(GPTConfig.from_preset("gpt2", impl=impl)).cuda()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        idx, targets = (torch.randint(0, 50257, (cfg.train_batch, 1024), device="cuda") for _ in range(2))
        times, losses = [], []
        for step in range(3 + cfg.train_steps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                _, loss = model(idx, targets)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())  # synchronises
            if step >= 3:
                times.append((time.perf_counter() - t0) * 1e3)
        results[impl] = statistics.median(times)
        tok_s = cfg.train_batch * 1024 / (results[impl] / 1e3)
        print(f"impl={impl:<6} {results[impl]:8.1f} ms/step  {tok_s:10,.0f} tokens/s  loss {losses[0]:.3f} -> {losses[-1]:.3f}")
        del model, opt
        torch.cuda.empty_cache()
    print(f"ratio torch / triton time: {results['torch'] / results['triton']:.3f}x (> 1: the kernels are faster)")


def smoke_check() -> None:
    """Without CUDA: both kernels on small CPU tensors in Triton's interpreter, against the references."""
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of `kernels.*`
    from kernels.attention import attention_reference, flash_attention
    from kernels.layernorm import layer_norm, layer_norm_reference

    q, k, v = (torch.randn(1, 2, 33, 16, requires_grad=True) for _ in range(3))
    err = (flash_attention(q, k, v, causal=True, use_triton=True) - attention_reference(q, k, v)).abs().max()
    x, w, b = torch.randn(5, 100), torch.randn(100), torch.randn(100)
    err_ln = (layer_norm(x, w, b, use_triton=True) - layer_norm_reference(x, w, b)).abs().max()
    ok = err < 1e-5 and err_ln < 1e-5
    print(f"interpreter smoke check: attention max error {err:.1e}, layernorm max error {err_ln:.1e}: "
          f"{'ok' if ok else 'FAILED'}")
    if not ok:
        raise SystemExit(1)


def compile_report(cfg: BenchConfig) -> None:
    """Compile each kernel configuration for `cfg.arch` with the installed Triton; print its resources."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import kernels.attention as A
    import kernels.layernorm as L

    if A.INTERPRETED:
        raise SystemExit("--compile_report needs TRITON_INTERPRET unset (the interpreter compiles nothing)")
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    target = GPUTarget("cuda", cfg.arch, 32)
    names = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}
    print(f"Triton {triton.__version__}, target sm_{cfg.arch}: shared memory, registers, spilled (stack) bytes")

    def report(label, kernel, pointers, consts, warps, stages):
        # what the launcher's specialisation gives at run time: unit channel strides become constants,
        # pointers and the other strides are known to be multiples of 16
        sig, attrs = {}, {}
        for i, p in enumerate(kernel.arg_names):
            if p in consts:
                sig[p] = "constexpr"
            elif p.startswith("s") and p.endswith("_d"):
                sig[p], consts = "constexpr", dict(consts, **{p: 1})
            else:
                sig[p] = ("*" + pointers[p]) if p in pointers else ("fp32" if p == "eps" else "i32")
                if sig[p].startswith("*") or p.startswith("s"):
                    attrs[(i,)] = [["tt.divisibility", 16]]
        src = ASTSource(fn=kernel, signature=sig, constexprs={(kernel.arg_names.index(k),): v for k, v in consts.items()}, attrs=attrs)
        compiled = triton.compile(src, target=target, options=dict(num_warps=warps, num_stages=stages))
        usage = "registers ? (no cuobjdump)"
        if cuobjdump.exists():
            with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                f.write(compiled.asm["cubin"])
                f.flush()
                out = subprocess.run([str(cuobjdump), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
            fields = dict(kv.split(":") for kv in out.split() if kv.count(":") == 1 and kv.split(":")[0] in ("REG", "STACK"))
            usage = f"{fields.get('REG', '?'):>3} registers, {fields.get('STACK', '?'):>4} B stack"
        print(f"{label:<58} shared {compiled.metadata.shared:>6} B, {usage}", flush=True)

    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        d = names[dtype]
        acc = "fp64" if dtype == torch.float64 else "fp32"
        for hs in (64, 80, 128):
            block_d = max(16, triton.next_power_of_2(hs))
            consts = dict(CAUSAL=True, HEAD_DIM=hs, BLOCK_D=block_d, ACC_DTYPE=getattr(tl, "float64" if acc == "fp64" else "float32"),
                          DOT_PRECISION="ieee" if dtype in (torch.float32, torch.float64) else "tf32")
            io = dict(Q=d, K=d, V=d, O=d, DO=d, DQ=d, DK=d, DV=d, LSE=acc, DELTA=acc)
            for kind, kernel in (("fwd", A._attn_fwd_kernel), ("dkdv", A._attn_bwd_dkdv_kernel), ("dq", A._attn_bwd_dq_kernel)):
                t = A.choose_tiles(kind, dtype, block_d)
                scales = {k: v for k, v in A._scales(hs).items() if k in kernel.arg_names}  # fwd has no SM_SCALE
                report(f"attention {kind:<4} {d} hs={hs:<3} tiles {t.block_m}x{t.block_n} w{t.num_warps} s{t.num_stages}",
                       kernel, io, dict(consts, **scales, BLOCK_M=t.block_m, BLOCK_N=t.block_n), t.num_warps, t.num_stages)
    for d, acc in (("bf16", "fp32"), ("fp32", "fp32")):
        tl_acc = tl.float32
        for n in (768, 1600, 4096, 16384):
            for kind, kernel, elements in (("fwd", L._ln_fwd_kernel, L.FWD_TILE), ("bwd", L._ln_bwd_kernel, L.BWD_TILE)):
                rows, block_n, warps = L._tile(n, elements)
                io = dict(X=d, W=d, B=d, Y=d, DY=d, DX=d, MEAN=acc, RSTD=acc, DW_PART=acc, DB_PART=acc)
                report(f"layernorm {kind} {d} N={n:<5} tile {rows}x{block_n} w{warps}", kernel, io,
                       dict(HAS_BIAS=True, BLOCK_ROWS=rows, BLOCK_N=block_n, ACC_DTYPE=tl_acc), warps, 1)


def main(argv: list[str] | None = None) -> int:
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))  # `python bench/kernels.py` from a checkout, installed or not
    from minillm.cli import format_config, parse_args

    cfg = parse_args(sys.argv[1:] if argv is None else argv, BenchConfig(), prog="bench/kernels.py", description=__doc__)
    print(format_config(cfg))
    if cfg.compile_report:
        compile_report(cfg)
        return 0
    if not torch.cuda.is_available():
        print("No CUDA device on this machine: the kernel benchmarks time GPU kernels, so there is nothing to "
              "time here (no figures are made up). Checking instead that the kernels run in Triton's "
              "interpreter; `--compile_report` checks that they compile for a GPU.")
        smoke_check()
        return 0
    props = torch.cuda.get_device_properties(0)
    import triton

    print(f"device: {props.name}, {props.multi_processor_count} SMs; torch {torch.__version__}, triton {triton.__version__}")
    if cfg.only in ("all", "attention"):
        attention_table(cfg)
    if cfg.only in ("all", "layernorm"):
        layernorm_table(cfg)
    if cfg.only in ("all", "train"):
        train_table(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
