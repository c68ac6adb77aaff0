"""Sample text from a model: a minillm checkpoint (or a run folder: its newest checkpoint) or a
Hugging Face GPT-2 folder. The text streams to the terminal as it is generated.

    python sample.py --ckpt runs/demo --prompt "Once upon a time"
    python sample.py --ckpt runs/demo --prompt-file prompt.txt --num-samples 3 --temperature 0.9 --top_k 50
    echo "To be, or not to be" | python sample.py --ckpt runs/demo --max_new_tokens 100
    python sample.py --ckpt runs/demo --temperature 0 --stop '\\n\\n'          # greedy, stop at a blank line
    python sample.py --ckpt path/to/gpt2 --prompt "Hello, I'm a language model," --seed 42
    python sample.py --ckpt runs/instruct --interactive                      # chat with an instruction model

The prompt comes from --prompt, else --prompt-file, else standard input when it is a pipe; with none,
sampling starts from <|endoftext|> (unconditional). Each sample prints the prompt and then its
continuation; a line on stderr gives the seed, the token count, the speed and why it stopped. Sample
i uses seed + i, so `--seed 42 --num-samples 3` reproduces exactly, and its second sample equals
`--seed 43` alone. `--stop` takes comma-separated strings in which \\n and \\t stand for a newline and
a tab.

Interactive mode reads one line at a time. For a checkpoint finetuned on instructions (one that
stored its prompt template) it keeps the conversation: each line is an instruction, rendered with
the earlier turns in the template the model was trained with, and the oldest turns are dropped when
the context fills up. For other models each line is a fresh prompt to continue. `/reset` forgets the
conversation; `/quit` or end of input (Ctrl-D) leaves. `--help` lists every setting.
"""

from __future__ import annotations

import random
import re
import sys
import time
from dataclasses import dataclass, replace

import torch

from minillm import cli
from minillm.generate import SamplingConfig, encode_prompt, generate, generate_iter, prepare_for_decoding
from minillm.hf import load_pretrained, resolve_device_and_dtype


@dataclass
class SampleConfig:
    """What to load, where to run it, and what to ask it."""

    ckpt: str = ""  # a minillm checkpoint or run folder, or a Hugging Face GPT-2 folder (required)
    prompt: str = ""  # text to continue (else --prompt-file, else piped standard input, else <|endoftext|>)
    prompt_file: str = ""  # read the prompt from this file (UTF-8)
    num_samples: int = 1  # samples drawn from the prompt; sample i uses seed + i
    interactive: bool = False  # read prompts line by line; keeps the conversation for instruction models
    stream: bool = True  # print text as it is generated; --no-stream generates all samples as one batch first
    echo: bool = True  # print the prompt before each continuation
    device: str = "auto"  # cpu, cuda, cuda:1, ... or auto (cuda when available)
    dtype: str = "auto"  # float32, bfloat16, float16, or auto (bfloat16 on a GPU that has it, else float32)
    impl: str = "auto"  # attention/layernorm path: auto, torch or triton

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ValueError(f"SampleConfig.num_samples must be at least 1, got {self.num_samples}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"SampleConfig.dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")


def unescape(text: str) -> str:
    """\\n, \\t and \\\\ in a command-line string become a newline, a tab and a backslash."""
    return re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m.group(1)], text)


def pick_device_and_dtype(cfg: SampleConfig) -> tuple[str, torch.dtype]:
    return resolve_device_and_dtype(cfg.device, cfg.dtype)


def read_prompt(cfg: SampleConfig) -> str:
    if cfg.prompt:
        return cfg.prompt
    if cfg.prompt_file:
        try:
            with open(cfg.prompt_file, encoding="utf-8") as f:
                return f.read()
        except (OSError, UnicodeDecodeError) as err:
            raise SystemExit(f"sample.py: cannot read --prompt-file {cfg.prompt_file}: {err}") from None
    if not sys.stdin.isatty():
        return sys.stdin.read()
    return ""


def run_one(pretrained, prompt: str, sampling: SamplingConfig, echo: bool) -> str:
    """Stream one sample to stdout; returns its text. A summary line goes to stderr."""
    if echo:
        print(prompt, end="", flush=True)
    start, tokens, text, reason = time.perf_counter(), 0, [], ""
    for chunk in generate_iter(pretrained.model, [prompt], sampling, tokenizer=pretrained.tokenizer):
        tokens += chunk.token is not None
        text.append(chunk.text)
        print(chunk.text, end="", flush=True)
        reason = chunk.finish_reason or reason
    seconds = time.perf_counter() - start
    print(flush=True)
    print(f"[seed {sampling.seed} | {tokens} tokens in {seconds:.2f}s, {tokens / seconds:.1f} tokens/s | stopped: {reason}]",
          file=sys.stderr, flush=True)
    return "".join(text)


def interact(pretrained, sampling: SamplingConfig) -> None:
    """The prompt loop: a conversation in the model's template, or fresh prompts for a base model."""
    template, tokenizer, block = pretrained.template, pretrained.tokenizer, pretrained.model.config.block_size
    if template is not None:
        sampling = replace(sampling, stop=tuple(sampling.stop) + template.stop_strings())
        print("instruction mode: the conversation is kept (/reset forgets it, /quit leaves)", file=sys.stderr)
    else:
        print("this model has no prompt template: each line is a prompt to continue (/quit leaves)", file=sys.stderr)
    history: list[tuple[str, str]] = []
    turn = 0
    while True:
        print(">>> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "/quit":
            print(flush=True)
            return
        line = line.rstrip("\n")
        if line.strip() == "/reset":
            history.clear()
            print("(conversation cleared)", file=sys.stderr)
            continue
        if not line.strip():
            continue
        turn_sampling = replace(sampling, seed=sampling.seed + turn)
        turn += 1
        if template is None:
            run_one(pretrained, line, turn_sampling, echo=True)
            continue
        # drop the oldest turns until the prompt leaves room for the answer inside the block; at most
        # half the block is held for it (subtle: with max_new_tokens >= block, reserving all of it would
        # drop every earlier turn; generate slides its window if a long answer runs past the block)
        reply_room = min(sampling.max_new_tokens, block // 2)
        while history and len(encode_prompt(template.render_conversation(history, line), tokenizer)) + reply_room > block:
            history.pop(0)
        answer = run_one(pretrained, template.render_conversation(history, line), turn_sampling, echo=False)
        history.append((line, answer.strip()))


def main(argv: list[str] | None = None) -> None:
    cfg, sampling = cli.parse_args(sys.argv[1:] if argv is None else argv, SampleConfig(), SamplingConfig(),
                                   prog="sample.py", description=__doc__.split("\n\n")[0])
    if not cfg.ckpt:
        raise SystemExit("sample.py: error: --ckpt is required (a minillm checkpoint or run folder, or a Hugging Face GPT-2 folder)")
    seed = sampling.seed if sampling.seed is not None else random.SystemRandom().randrange(2**31)
    sampling = replace(sampling, seed=seed, stop=tuple(unescape(s) for s in sampling.stop))
    device, dtype = pick_device_and_dtype(cfg)
    try:
        pretrained = load_pretrained(cfg.ckpt, device, dtype, impl=cfg.impl)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"sample.py: error: {err}") from None
    prepare_for_decoding(pretrained.model)  # a weight layout that decodes faster; values unchanged
    if pretrained.tokenizer is None:
        raise SystemExit(f"sample.py: error: {pretrained.source} has no tokenizer; sample.py needs one to read and write text")
    print(f"{pretrained.source}: {pretrained.model.num_params() / 1e6:.2f}M parameters, {device}, {str(dtype).removeprefix('torch.')}",
          file=sys.stderr)
    print(cli.format_config(cfg, sampling), file=sys.stderr)
    if cfg.interactive:
        interact(pretrained, sampling)
        return
    prompt = read_prompt(cfg)
    if not prompt:
        print("(no prompt given: sampling unconditionally, from <|endoftext|>)", file=sys.stderr)
    if cfg.stream:
        for i in range(cfg.num_samples):
            if cfg.num_samples > 1:
                print(f"---------- sample {i + 1} of {cfg.num_samples} ----------", flush=True)
            run_one(pretrained, prompt, replace(sampling, seed=seed + i), cfg.echo)
        return
    start = time.perf_counter()
    completions = generate(pretrained.model, [prompt] * cfg.num_samples, sampling, tokenizer=pretrained.tokenizer)
    for c in completions:
        if cfg.num_samples > 1:
            print(f"---------- sample {c.index + 1} of {cfg.num_samples} ----------")
        print((prompt if cfg.echo else "") + c.text)
        print(f"[seed {c.seed} | {len(c.tokens)} tokens | stopped: {c.finish_reason}]", file=sys.stderr)
    total = sum(len(c.tokens) for c in completions)
    print(f"[{total} tokens in {time.perf_counter() - start:.2f}s for {cfg.num_samples} samples in one batch]", file=sys.stderr)


if __name__ == "__main__":
    main()
