"""Evaluation speed: minillm's perplexity pass (`minillm.perplexity.score_stream`) against the same
sliding windows through Hugging Face transformers' GPT2LMHeadModel, on the same random weights and
tokens, in one process; prints tokens scored per second of each, the ratio and both perplexities.

    python bench/eval.py                                  # small preset (12.3M), block 256, stride 128, CPU
    python bench/eval.py --preset=gpt2 --tokens=16384     # GPT-2 small (124M), block 1024, stride 512
    python bench/eval.py --preset=gpt2 --dtype=bfloat16 --device=cuda --batch_size=16

Fairness: one set of weights (a GPT2LMHeadModel built from a config, no download, copied into
minillm's GPT), one token stream, the windows of `minillm.tokenfile.eval_windows` for both, the same
batch size, dtype (autocast for 16-bit) and thread count. Ours reads out only the scored positions'
logits; the peer computes all of them (its forward has no way not to) and takes the cross-entropy of
the scored ones, which is what a user of transformers writes. Each path is warmed up once, then the
two take turns for `repeats` rounds and each reports its best, so load from elsewhere on a shared
machine hits both alike. The perplexities must agree (a check, printed).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from minillm import cli  # noqa: E402
from minillm.config import GPTConfig  # noqa: E402
from minillm.hf import config_to_hf, model_from_state, state_from_hf  # noqa: E402
from minillm.perplexity import score_stream  # noqa: E402
from minillm.scoring import autocast, resolve_device, resolve_dtype  # noqa: E402
from minillm.token_stream import TokenStream  # noqa: E402
from minillm.tokenfile import IGNORE_INDEX, eval_windows  # noqa: E402


@dataclass
class BenchConfig:
    preset: str = "small"  # model size (GPTConfig preset); weights are random
    tokens: int = 8192  # length of the token stream scored
    stride: int | None = None  # window stride; None = half the block
    batch_size: int = 8  # windows per forward pass, both paths
    device: str = "auto"  # cpu, cuda or auto
    dtype: str = "float32"  # float32, bfloat16 or float16 (autocast), both paths
    threads: int = 0  # torch CPU threads (0 = torch's default)
    repeats: int = 3  # timed runs of each path; the best is reported
    seed: int = 0  # weights and tokens

    def __post_init__(self) -> None:
        if self.tokens < 2 or self.batch_size < 1 or self.repeats < 1:
            raise ValueError("BenchConfig: tokens must be >= 2, batch_size and repeats >= 1")


def peer_nll(hf_model, tokens: np.ndarray, batch_size: int, block: int, stride: int, device, dtype) -> float:
    """The transformers way: full logits per window, cross-entropy over the scored targets."""
    total = 0.0
    with torch.inference_mode():
        for x, y in eval_windows(tokens, batch_size, block, stride, device=device):
            with autocast(device, dtype):
                logits = hf_model(input_ids=x).logits
            total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX,
                                     reduction="sum").item()
    return total


def main(argv: list[str] | None = None) -> None:
    cfg = cli.parse_args(sys.argv[1:] if argv is None else argv, BenchConfig(), prog="bench/eval.py",
                         description=__doc__.split("\n\n")[0])
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        raise SystemExit("bench/eval.py: transformers is not installed (pip install transformers): it is the peer") from None
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    config = GPTConfig.from_preset(cfg.preset, impl="auto")
    torch.manual_seed(cfg.seed)
    hf_model = GPT2LMHeadModel(GPT2Config(**config_to_hf(config))).eval()
    ours = model_from_state(config, state_from_hf(hf_model.state_dict(), config), device).eval()
    hf_model.to(device)
    tokens = np.random.default_rng(cfg.seed).integers(0, config.vocab_size, size=cfg.tokens)
    block = config.block_size
    stride = cfg.stride or block // 2
    stream = TokenStream(tokens, np.array([0]), np.array([len(tokens)]), ["random"], "random tokens")
    n_scored = len(tokens) - 1

    def run_ours() -> float:
        return score_stream(ours, stream, None, stride=stride, batch_size=cfg.batch_size, dtype=dtype, progress=False).total.nll

    def run_peer() -> float:
        return peer_nll(hf_model, tokens, cfg.batch_size, block, stride, device, dtype)

    def timed(fn) -> tuple[float, float]:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        value = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, value

    print(f"{cfg.preset}: {ours.num_params():,} parameters, block {block}, stride {stride}, batch {cfg.batch_size}, "
          f"{n_scored:,} tokens scored per pass, {device} {str(dtype)[6:]}, {torch.get_num_threads()} threads")
    runs = {"minillm score_stream": run_ours, "transformers GPT2LMHeadModel": run_peer}
    for fn in runs.values():  # warm up (allocator, kernels, caches)
        fn()
    best = {name: (math.inf, 0.0) for name in runs}
    for _ in range(cfg.repeats):
        for name, fn in runs.items():
            seconds, nll = timed(fn)
            best[name] = min(best[name], (seconds, nll))
    for name, (seconds, nll) in best.items():
        print(f"{name:<30} {n_scored / seconds:>12,.0f} tok/s  ({seconds:.3f}s)  ppl {math.exp(nll / n_scored):.4f}")
    (ours_s, ours_nll), (peer_s, peer_nll_value) = best.values()
    print(f"ratio (minillm / transformers tok/s): {peer_s / ours_s:.2f}x; perplexities differ by "
          f"{abs(ours_nll - peer_nll_value) / n_scored:.2e} nats/token")


if __name__ == "__main__":
    main()
