"""Serve a model over HTTP with OpenAI's API: completions, chat, streaming, a chat page at /.

    python serve.py --ckpt runs/demo                                   # http://127.0.0.1:8000
    python serve.py --ckpt runs/instruct --port 8080 --max_batch 16    # chat uses the finetuning template
    MINILLM_API_KEY=secret python serve.py --ckpt runs/demo --host 0.0.0.0   # on the network: with a key
    python serve.py --ckpt path/to/gpt2 --cors_origins http://localhost:3000 # a web app on another origin
    python serve.py --help                                             # every setting

    curl http://127.0.0.1:8000/v1/completions -H "Content-Type: application/json" \\
         -d '{"prompt": "ROMEO:", "max_tokens": 30, "temperature": 0}'

It prints what it loaded, the resolved settings (the API key shown only as "(set)") and the address,
then one line per request on stderr. Ctrl-C stops it. The API key comes from --api_key or, better
(command lines are visible to other users of the machine), the MINILLM_API_KEY environment variable.
"""

from __future__ import annotations

import gc
import os
import sys
from dataclasses import replace

from minillm import cli
from minillm.generate import prepare_for_decoding
from minillm.hf import load_pretrained, resolve_device_and_dtype
from minillm.server import API_KEY_ENV, Server, ServerConfig, is_loopback


def load(cfg: ServerConfig):
    """The model to serve, in the inference weight layout; SystemExit with one line if it cannot load."""
    device, dtype = resolve_device_and_dtype(cfg.device, cfg.dtype)
    try:
        pretrained = load_pretrained(cfg.ckpt, device, dtype, impl=cfg.impl)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"serve.py: error: {err}") from None
    if pretrained.tokenizer is None:
        raise SystemExit(f"serve.py: error: {pretrained.source} has no tokenizer; the server needs one to read and write text")
    prepare_for_decoding(pretrained.model)  # faster one-token steps; values unchanged
    print(f"{pretrained.source}: {pretrained.model.num_params() / 1e6:.2f}M parameters, {device}, "
          f"{str(dtype).removeprefix('torch.')}, context window {pretrained.model.config.block_size}, "
          f"chat: {'its prompt template' if pretrained.template else 'plain transcript (no template stored)'}",
          file=sys.stderr)
    return pretrained


def main(argv: list[str] | None = None) -> None:
    cfg = cli.parse_args(sys.argv[1:] if argv is None else argv, ServerConfig(), prog="serve.py",
                         description=__doc__.split("\n\n")[0])
    if not cfg.ckpt:
        raise SystemExit("serve.py: error: --ckpt is required (a minillm checkpoint or run folder, or a Hugging Face GPT-2 folder)")
    cfg = replace(cfg, api_key=cfg.api_key or os.environ.get(API_KEY_ENV, ""))
    pretrained = load(cfg)
    # subtle: the model, tokenizer and their caches are millions of long-lived objects that every full
    # garbage collection would scan again; decoding allocates many small ones, so collections come
    # often. Freezing what exists now keeps them out of every later collection (~20% of a decode step
    # on a small model went to the collector).
    gc.freeze()
    print(cli.format_config(replace(cfg, api_key="(set)" if cfg.api_key else "")), file=sys.stderr)
    try:
        server = Server(pretrained, cfg)
    except OSError as err:
        raise SystemExit(f"serve.py: error: cannot listen on {cfg.host}:{cfg.port}: {err.strerror or err}") from None
    if not is_loopback(cfg.host) and not cfg.api_key:
        print(f"serve.py: warning: listening on {cfg.host} without an API key: anyone who can reach it can use it",
              file=sys.stderr)
    cache = server.engine.cache
    cache_mb = sum(t.numel() * t.element_size() for t in cache.keys + cache.values) / 2**20
    print(f"batch: up to {cache.batch_size} sequences at once, KV cache {cache_mb:.1f} MiB "
          f"({cache.max_len} positions each); up to {cfg.queue_size} requests wait for a slot", file=sys.stderr)
    print(f"serving {server.served.name} on {server.url} (chat page: {server.url}/, API: {server.url}/v1, "
          f"auth: {'bearer key' if cfg.api_key else 'none'}); Ctrl-C stops", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    finally:
        gc.unfreeze()  # let shutdown reclaim everything (native bindings report what is never freed)


if __name__ == "__main__":
    main()
