"""Load test of serve.py on loopback: 1, 4 and 16 concurrent clients, each sending the same fixed
streaming completion requests one after another; requests/s, generated tokens/s, p50/p99 latency and
time to first token, and errors (which must be 0). The figure that matters is the ratio of total
tokens/s at 16 clients to 1 client: continuous batching should make it >= 4x on a CPU with a small model.

    python bench/serve.py                                   # random "small" model (12M), 64 new tokens
    python bench/serve.py --ckpt runs/demo --max_tokens 128 # a real checkpoint
    python bench/serve.py --clients 1,2,4,8,16,32 --requests_per_client 4 --max_batch 32

The server runs as its own process (`python serve.py ... --port 0`), as it would in use, so the load
generator's threads do not share its interpreter. Without --ckpt a model with random weights is built
(the preset's shape, a BPE tokenizer trained on minillm's own source files) in a temporary folder.
Requests: prompts from a fixed list, `max_tokens` tokens each with `ignore_eos` (so every request
generates exactly that many), temperature 0.8, a fixed seed per request, streamed, usage included.
Latency is from sending the request to its last event, time to first token to the first text event.
Each level starts with one warm-up request per client that is not counted. The levels run
`rounds` times in turns and each reports its best round (the machine may be shared); errors are
counted over every round.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from minillm import cli  # noqa: E402

PROMPTS = [
    "The quick brown fox jumps over the lazy dog, and then",
    "Once upon a time, in a land far away, there lived",
    "To build a language model from scratch, first",
    "The server answers each request with",
    "In the beginning the tokenizer splits the text into",
    "A KV cache keeps the keys and values of",
    "Continuous batching lets new requests join",
    "def generate(model, prompt):",
]


@dataclass
class BenchConfig:
    ckpt: str = ""  # a checkpoint or run folder to serve; "" = a random model of --preset
    preset: str = "small"  # GPTConfig preset of the random model (tiny, mini, small, gpt2, ...)
    clients: str = "1,4,16"  # concurrency levels, comma-separated
    requests_per_client: int = 8  # timed requests each client sends, one after another
    max_tokens: int = 64  # tokens generated per request (ignore_eos: exactly this many)
    max_batch: int = 16  # the server's --max_batch
    threads: int = 0  # torch threads in the server (0 = torch's default)
    rounds: int = 2  # the levels run this many times, in turns; each level reports its best round
    target: float = 4.0  # wanted ratio of tokens/s at the highest level to the lowest

    def __post_init__(self) -> None:
        levels = [c for c in self.clients.split(",") if c.strip()]
        if not levels or not all(c.strip().isdigit() and int(c) > 0 for c in levels):
            raise ValueError(f"BenchConfig.clients must be positive integers, comma-separated, got {self.clients!r}")
        for name in ("requests_per_client", "max_tokens", "max_batch", "rounds"):
            if getattr(self, name) < 1:
                raise ValueError(f"BenchConfig.{name} must be at least 1")


def random_checkpoint(preset: str, folder: Path) -> Path:
    """A model of `preset`'s shape with random weights and a tokenizer trained on minillm's sources."""
    import torch

    from minillm.checkpoint import save_checkpoint
    from minillm.config import GPTConfig
    from minillm.model import GPT
    from minillm.tokenizer import TOKENIZER_FILE, Tokenizer

    text = "\n".join(p.read_text(encoding="utf-8") for p in sorted((REPO / "minillm").rglob("*.py")))
    config = GPTConfig.from_preset(preset)
    tokenizer = Tokenizer.train(text, vocab_size=min(config.vocab_size, 2048))
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset(preset, vocab_size=tokenizer.vocab_size))
    save_checkpoint(folder, 0, model, writers={TOKENIZER_FILE: tokenizer.save})
    return folder


def start_server(cfg: BenchConfig, ckpt: str) -> tuple[subprocess.Popen, str, int]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("MINILLM_API_KEY", None)
    if cfg.threads:
        env["OMP_NUM_THREADS"] = str(cfg.threads)
    proc = subprocess.Popen([sys.executable, str(REPO / "serve.py"), "--ckpt", ckpt, "--port", "0",
                             "--max_batch", str(cfg.max_batch), "--queue_size", "256", "--no-log_requests"],
                            env=env, stderr=subprocess.PIPE, text=True)
    lines = []
    while True:
        line = proc.stderr.readline()
        if not line:
            raise SystemExit("bench/serve.py: the server did not start:\n" + "".join(lines))
        lines.append(line)
        if line.startswith("minillm checkpoint") or line.startswith("Hugging Face"):
            print(line.rstrip())
        found = re.search(r"serving \S+ on http://([\d.]+):(\d+)", line)
        if found:
            threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep the pipe drained
            return proc, found.group(1), int(found.group(2))


def one_request(host: str, port: int, body: dict) -> tuple[float, float, int, str]:
    """(latency s, time to first token s, tokens generated, error or "") for one streamed completion."""
    start = time.perf_counter()
    first, tokens = None, 0
    conn = http.client.HTTPConnection(host, port, timeout=300)
    try:
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            return time.perf_counter() - start, 0.0, 0, f"HTTP {response.status}: {response.read()[:200]!r}"
        done = False
        for line in response:
            if not line.startswith(b"data: "):
                continue
            data = line[6:].strip()
            if data == b"[DONE]":
                done = True
                break
            event = json.loads(data)
            if "error" in event:
                return time.perf_counter() - start, 0.0, 0, event["error"]["message"]
            if first is None and event["choices"] and event["choices"][0]["text"]:
                first = time.perf_counter() - start
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
        if not done:
            return time.perf_counter() - start, 0.0, 0, "the stream ended without [DONE]"
    except (OSError, ValueError) as err:
        return time.perf_counter() - start, 0.0, 0, f"{type(err).__name__}: {err}"
    finally:
        conn.close()
    return time.perf_counter() - start, first or 0.0, tokens, ""


def run_level(host: str, port: int, clients: int, cfg: BenchConfig) -> dict:
    results: list[tuple[float, float, int, str]] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients + 1)

    def client(c: int) -> None:
        def body(r: int) -> dict:
            return {"prompt": PROMPTS[(c + r) % len(PROMPTS)], "max_tokens": cfg.max_tokens, "temperature": 0.8,
                    "seed": 1000 * c + r, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        one_request(host, port, body(-1))  # warm-up, not counted
        barrier.wait()
        for r in range(cfg.requests_per_client):
            outcome = one_request(host, port, body(r))
            with lock:
                results.append(outcome)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    ok = [r for r in results if not r[3]]
    return {"clients": clients, "requests": len(results), "errors": len(results) - len(ok), "seconds": seconds,
            "req_s": len(ok) / seconds, "tok_s": sum(r[2] for r in ok) / seconds,
            "lat": sorted(r[0] for r in ok), "ttft": sorted(r[1] for r in ok),
            "first_error": next((r[3] for r in results if r[3]), "")}


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile by the nearest-rank method (values sorted)."""
    if not values:
        return float("nan")
    return values[min(len(values) - 1, max(0, round(q / 100 * len(values) + 0.5) - 1))]


def main(argv: list[str] | None = None) -> int:
    cfg = cli.parse_args(sys.argv[1:] if argv is None else argv, BenchConfig(), prog="bench/serve.py",
                         description=__doc__.split("\n\n")[0])
    levels = [int(c) for c in cfg.clients.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = cfg.ckpt or str(random_checkpoint(cfg.preset, Path(tmp) / f"random-{cfg.preset}"))
        proc, host, port = start_server(cfg, ckpt)
        try:
            load = os.getloadavg()[0]
            print(f"serve.py load test | {os.cpu_count()} CPUs, load average {load:.1f} before | max_batch {cfg.max_batch} "
                  f"| {cfg.requests_per_client} requests per client | {cfg.max_tokens} tokens each | streamed "
                  f"| best of {cfg.rounds} rounds (errors: all rounds)")
            print("| clients | requests | errors | req/s | gen tokens/s | p50 latency | p99 latency | p50 TTFT | p99 TTFT |")
            print("| ------- | -------- | ------ | ----- | ------------ | ----------- | ----------- | -------- | -------- |")
            runs = {clients: [] for clients in levels}
            for _ in range(cfg.rounds):  # in turns, so a burst of load from elsewhere hits every level alike
                for clients in levels:
                    runs[clients].append(run_level(host, port, clients, cfg))
            rows = []
            for clients in levels:
                row = max(runs[clients], key=lambda r: (r["errors"] == 0, r["tok_s"]))
                row["errors"] = sum(r["errors"] for r in runs[clients])  # errors count from every round
                rows.append(row)
                ms = lambda values, q: f"{percentile(values, q) * 1000:.0f} ms"  # noqa: E731
                print(f"| {clients:7d} | {row['requests']:8d} | {row['errors']:6d} | {row['req_s']:5.1f} | {row['tok_s']:12.0f} "
                      f"| {ms(row['lat'], 50):>11} | {ms(row['lat'], 99):>11} | {ms(row['ttft'], 50):>8} | {ms(row['ttft'], 99):>8} |",
                      flush=True)
                if row["errors"]:
                    print(f"  first error: {row['first_error']}")
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    errors = sum(r["errors"] for r in rows)
    ratio = rows[-1]["tok_s"] / rows[0]["tok_s"] if rows[0]["tok_s"] else float("nan")
    met = ratio >= cfg.target
    print(f"tokens/s at {levels[-1]} clients / at {levels[0]}: {ratio:.2f}x (target >= {cfg.target:g}x: "
          f"{'met' if met else 'MISSED'}) | errors: {errors} (must be 0) | load average {os.getloadavg()[0]:.1f} after")
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
