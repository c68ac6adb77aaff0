"""Where a kernel can run: the device checks every kernel file shares.

A Triton kernel runs on a CUDA device of compute capability 8.0 or newer (bf16 and the tensor-core
layouts our tiles assume), or on CPU tensors when Triton's interpreter was chosen with
TRITON_INTERPRET=1 before the kernel was defined (how CI tests kernels without a GPU).
"""

from __future__ import annotations

import torch


def is_interpreted(kernel) -> bool:
    """Whether `@triton.jit` gave an interpreted function (TRITON_INTERPRET=1 at definition time)."""
    return type(kernel).__name__ == "InterpretedFunction"


def device_reason(tensors: list[torch.Tensor], names: str, interpreted: bool) -> str | None:
    """Why these tensors cannot go to a kernel (different devices, a CPU without the interpreter, an
    old GPU), or None when they can. `names` says what they are in messages, e.g. "q, k, v"."""
    device = tensors[0].device
    if any(t.device != device for t in tensors):
        return f"{names} are on different devices ({', '.join(str(t.device) for t in tensors)})"
    if device.type != "cuda" and not (interpreted and device.type == "cpu"):
        return (f"tensors are on {device}: the kernels need a CUDA device, or CPU tensors with "
                f"TRITON_INTERPRET=1 set before `kernels` is imported (Triton's interpreter)")
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0):
        return f"needs a GPU of compute capability 8.0 or newer (bf16, tensor-core layouts); {device} is older"
    return None
