"""Training throughput: minillm's GPT against Hugging Face transformers' GPT2LMHeadModel.

Both models are built from the same shape (no download), get the same random batches, and run the
same full training step (forward, loss, backward, AdamW step, zero_grad) in one process, alternating
so drift in the machine's speed hits both alike. Prints tokens/s for each and the ratio, plus MFU on
GPUs in the peak-FLOPs table.

    python bench/train.py                                  # CPU: the `mini` shape, fp32
    python bench/train.py --model=small --batch_size=8     # CPU: a larger shape
    python bench/train.py --model=gpt2 --device=cuda --dtype=bf16 --batch_size=16 --seq_len=1024

transformers is an optional benchmark dependency (`pip install transformers`).
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from minillm import cli  # noqa: E402
from minillm.config import GPTConfig  # noqa: E402
from minillm.model import GPT  # noqa: E402
from minillm.runlog import peak_flops  # noqa: E402


@dataclass
class BenchConfig:
    model: str = "mini"  # GPTConfig preset giving the shape
    vocab_size: int = 4096  # vocabulary size for both models
    batch_size: int = 16  # sequences per step
    seq_len: int = 256  # tokens per sequence
    steps: int = 10  # timed steps per model (after warmup)
    warmup: int = 3  # untimed steps per model first
    device: str = "cpu"  # cpu or cuda
    dtype: str = "fp32"  # fp32, or bf16 autocast
    threads: int = 0  # torch CPU threads (0: torch's default)


def build_hf(config: GPTConfig):
    from transformers import GPT2Config, GPT2LMHeadModel

    hf_config = GPT2Config(
        vocab_size=config.vocab_size, n_positions=config.block_size, n_embd=config.n_embd, n_layer=config.n_layer,
        n_head=config.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, activation_function="gelu_new",
        bos_token_id=config.vocab_size - 1, eos_token_id=config.vocab_size - 1,
    )
    return GPT2LMHeadModel(hf_config)


def main(argv: list[str]) -> None:
    bench = cli.parse_args(argv, BenchConfig(), description=__doc__)
    if bench.threads:
        torch.set_num_threads(bench.threads)
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise SystemExit("bench/train.py needs the optional `transformers` package: pip install transformers")
    device = torch.device(bench.device)
    config = GPTConfig.from_preset(bench.model, vocab_size=bench.vocab_size, block_size=bench.seq_len, dropout=0.0)
    torch.manual_seed(0)
    ours, theirs = GPT(config).to(device), build_hf(config).to(device)
    models = {"minillm": ours, "transformers": theirs}
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True) for name, m in models.items()}  # the same for both
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bench.dtype == "bf16")
    x = torch.randint(0, config.vocab_size, (bench.batch_size, bench.seq_len), device=device)
    y = torch.randint(0, config.vocab_size, (bench.batch_size, bench.seq_len), device=device)

    def step(name: str) -> float:
        model, optimizer = models[name], optimizers[name]
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with autocast:
            # transformers shifts labels inside; minillm takes targets already shifted
            loss = model(x, y)[1] if name == "minillm" else model(input_ids=x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for _ in range(bench.warmup):
        for name in models:
            step(name)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(bench.steps):
        for name in models:
            times[name].append(step(name))
    tokens = bench.batch_size * bench.seq_len
    peak = peak_flops(device, torch.bfloat16 if bench.dtype == "bf16" else torch.float32)
    flops = ours.flops_per_token(bench.seq_len)
    print(f"shape: {bench.model} ({ours.num_params() / 1e6:.2f}M params), batch {bench.batch_size} x {bench.seq_len}, "
          f"{bench.dtype} on {device} ({torch.get_num_threads()} threads), median of {bench.steps} steps")
    rates = {}
    for name in models:
        median = statistics.median(times[name])
        rates[name] = tokens / median
        mfu = f" | MFU {100 * flops * rates[name] / peak:.1f}%" if peak else ""
        print(f"{name:>12}: {1000 * median:8.1f} ms/step | {rates[name]:10,.0f} tok/s{mfu}")
    print(f"ratio minillm / transformers: {rates['minillm'] / rates['transformers']:.2f}x")


if __name__ == "__main__":
    main(sys.argv[1:])
