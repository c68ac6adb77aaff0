"""What a training run tells its user: one line per step, a JSONL metrics log, and MFU.

The step line, `|`-separated and fixed in order so logs can be grepped and compared:

    step 120/2000 | loss 3.4512 | lr 5.97e-04 | 212.4 ms | 19,288 tok/s | MFU 41.2% | ETA 6m39s

MFU (model FLOPs utilisation) is achieved model FLOPs per second over the device's peak. The peak
comes from `PEAK_FLOPS`, dense bf16/fp16 tensor-core figures from the vendors' datasheets, matched
against the device name; an unknown device or a CPU gets no MFU column rather than a wrong one.

`metrics.jsonl` gets one JSON object per logged step (`"kind": "train"`) and per evaluation
(`"kind": "val"`); the loss-curve picture and the report card read it back.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from minillm.progress import format_duration

# (substring of torch.cuda.get_device_name(), dense bf16 FLOP/s). More specific names first.
PEAK_FLOPS: list[tuple[str, float]] = [
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM
    ("GH200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10", 125e12),  # A10 and A10G
    ("A6000", 155e12),  # RTX A6000
    ("V100", 125e12),  # fp16 tensor cores (no bf16)
]


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """Peak dense FLOP/s of `device` in `dtype`, or None when unknown (CPU, fp32, unlisted GPU)."""
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_FLOPS:
        if key in name:
            return flops
    return None


def format_step(
    step: int, total: int, loss: float, lr: float, ms: float, tokens_per_s: float,
    mfu: float | None, eta_s: float | None, note: str = "",
) -> str:
    """The one-line summary of an optimizer step (see the module docstring)."""
    parts = [f"step {step}/{total}", f"loss {loss:.4f}", f"lr {lr:.2e}", f"{ms:.1f} ms", f"{tokens_per_s:,.0f} tok/s"]
    if mfu is not None:
        parts.append(f"MFU {100 * mfu:.1f}%")
    if eta_s is not None:
        parts.append(f"ETA {format_duration(eta_s)}")
    if note:
        parts.append(note)
    return " | ".join(parts)


class MetricsLog:
    """Appends records to `metrics.jsonl`; on resume, first drops what came after the checkpoint."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled

    def truncate_after(self, step: int) -> None:
        """Forget records past `step`: a killed run may have logged steps its checkpoint does not hold."""
        if not self.enabled or not self.path.exists():
            return
        kept = [line for line in read_metrics(self.path) if line["step"] <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(record) + "\n" for record in kept))
        os.replace(tmp, self.path)

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def read_metrics(path: Path) -> list[dict]:
    """Every record of a metrics.jsonl; a torn last line (a crash mid-write) is ignored."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
