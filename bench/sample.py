"""Decode speed: minillm's generate (KV cache) against the same without a cache and against Hugging
Face transformers' `generate`, on the same random GPT-2-sized weights, in one process.

    python bench/sample.py                                   # gpt2 (124M), fp32, CPU, prompt 64, 64 new tokens
    python bench/sample.py --prompt_len=256 --new_tokens=128 --threads=2
    python bench/sample.py --preset=mini --batch=4           # a small model: per-step overhead dominates

Fairness: one set of weights (a transformers GPT2LMHeadModel built from a config, no download,
copied into minillm's GPT), the same prompt, greedy decoding, exactly `new_tokens` new tokens each
(HF's end-of-text stop is turned off, as ours is), the same dtype and thread count, and the weight
layout each library uses for decoding (`prepare_for_decoding`; transformers' Conv1D), each path warmed
up once. The two cached paths then take turns for `repeats` rounds and each reports its best run, so a
burst of load from elsewhere on a shared machine hits both alike; the no-cache path runs once (it is
slow). Timing covers the whole call, prefill included. The greedy tokens of the two cached paths are compared as a check.
transformers is an optional benchmark dependency; without it only minillm's two paths run.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from minillm import cli  # noqa: E402
from minillm.config import GPTConfig  # noqa: E402
from minillm.generate import SamplingConfig, generate, prepare_for_decoding  # noqa: E402
from minillm.hf import config_to_hf, model_from_state, state_from_hf  # noqa: E402
from minillm.model import GPT  # noqa: E402


@dataclass
class BenchConfig:
    preset: str = "gpt2"  # model size (GPTConfig preset); weights are random
    prompt_len: int = 64  # prompt tokens per sequence
    new_tokens: int = 64  # tokens generated per sequence
    batch: int = 1  # sequences generated at once
    threads: int = 0  # torch CPU threads for every path (0 = torch's default)
    dtype: str = "float32"  # float32 or bfloat16, for every path
    repeats: int = 3  # timed runs of each cached path; the best is reported
    seed: int = 0  # weights and prompt

    def __post_init__(self) -> None:
        for name in ("prompt_len", "new_tokens", "batch", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"BenchConfig.{name} must be at least 1")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"BenchConfig.dtype must be float32 or bfloat16, got {self.dtype!r}")


def best_times(runs: dict, repeats: int) -> dict[str, tuple[float, object]]:
    """name -> (best seconds, last output) for each callable in `runs`, timed in turns."""
    best = {name: (float("inf"), None) for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            out = run()
            best[name] = (min(best[name][0], time.perf_counter() - start), out)
    return best


def no_cache_generate(model: GPT, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy decoding the way it is done without a cache: the whole sequence again for every token."""
    idx = prompt
    with torch.inference_mode():
        for _ in range(new_tokens):
            hidden = model.hidden_states(idx[:, -model.config.block_size:])  # (B, T, C), all of it again
            logits = model.lm_head(hidden[:, -1])  # only the last position is scored, as generate does
            idx = torch.cat([idx, logits.argmax(-1, keepdim=True)], dim=1)
    return idx[:, prompt.shape[1]:]


def main(argv: list[str] | None = None) -> None:
    cfg = cli.parse_args(sys.argv[1:] if argv is None else argv, BenchConfig(), prog="bench/sample.py",
                         description=__doc__.split("\n\n")[0])
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dtype = getattr(torch, cfg.dtype)
    config = GPTConfig.from_preset(cfg.preset, impl="torch")
    if cfg.prompt_len + cfg.new_tokens > config.block_size:
        raise SystemExit(f"prompt_len + new_tokens must fit the block size {config.block_size}")
    torch.manual_seed(cfg.seed)
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        GPT2LMHeadModel = None
        print("transformers is not installed: comparing minillm with and without the cache only")
    if GPT2LMHeadModel is not None:
        hf = GPT2LMHeadModel(GPT2Config(**config_to_hf(config))).eval()
        hf = hf.to(dtype)
        hf.generation_config.eos_token_id = None  # exactly new_tokens tokens, as minillm here (no stop token)
        hf.generation_config.pad_token_id = 0
        state = state_from_hf(hf.state_dict(), config)  # the very same weights
        model = model_from_state(config, {k: v.clone() for k, v in state.items()}, dtype=dtype)
    else:
        model = GPT(config).to(dtype).eval()
    prepare_for_decoding(model)  # what sample.py and the server do: the layout transformers' Conv1D has
    prompt = torch.randint(0, config.vocab_size, (cfg.batch, cfg.prompt_len))
    prompts = prompt.tolist()
    sampling = SamplingConfig(temperature=0, max_new_tokens=cfg.new_tokens, stop_at_eot=False)
    n_tokens = cfg.batch * cfg.new_tokens

    print(f"minillm sampling benchmark | {cfg.preset} ({model.num_params() / 1e6:.1f}M params) | {cfg.dtype} | cpu | "
          f"threads {torch.get_num_threads()} | batch {cfg.batch} | prompt {cfg.prompt_len} | new {cfg.new_tokens} | greedy")
    runs = {"minillm generate (KV cache)": lambda: generate(model, prompts, sampling)}
    if GPT2LMHeadModel is not None:
        attention = torch.ones_like(prompt)
        kwargs = dict(attention_mask=attention, max_new_tokens=cfg.new_tokens, do_sample=False, use_cache=True)

        def hf_generate():
            with torch.inference_mode():
                return hf.generate(prompt, **kwargs)

        runs["HF transformers generate (KV cache)"] = hf_generate
    best_times(runs, 1)  # warm-up
    timed = best_times(runs, cfg.repeats)
    timed["minillm, no cache (full recompute)"] = best_times({"": lambda: no_cache_generate(model, prompt, cfg.new_tokens)}, 1)[""]
    rows = [(name, seconds) for name, (seconds, _) in timed.items()]
    ours_time, ours = timed["minillm generate (KV cache)"]
    plain_time, plain = timed["minillm, no cache (full recompute)"]
    hf_time, theirs = timed.get("HF transformers generate (KV cache)", (None, None))

    print(f"| {'method':<36} | {'tokens/s':>9} | {'ms/token':>9} | {'vs HF generate':>14} |")
    print(f"| {'-' * 36} | {'-' * 9} | {'-' * 9} | {'-' * 14} |")
    for name, seconds in rows:
        ratio = f"{hf_time / seconds:.2f}x" if hf_time else "n/a"
        print(f"| {name:<36} | {n_tokens / seconds:9.1f} | {1000 * seconds / n_tokens:9.2f} | {ratio:>14} |")
    print(f"KV cache speedup over full recompute: {plain_time / ours_time:.2f}x")
    ours_tokens = [c.tokens for c in ours]
    print(f"greedy tokens, cache vs no cache: {'identical' if ours_tokens == plain.tolist() else 'DIFFERENT'}")
    if theirs is not None:
        same = ours_tokens == theirs[:, cfg.prompt_len:].tolist()
        print(f"greedy tokens, minillm vs HF: {'identical' if same else 'DIFFERENT (near-ties in random weights, or a bug)'}")


if __name__ == "__main__":
    main()
