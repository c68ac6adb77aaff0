"""The dispatch point `minillm.ops` with the Triton kernels behind it, and the model running on them.

`impl="triton"` must be the kernel (bit for bit) or a clear error; `impl="auto"` the kernel for CUDA
tensors and PyTorch otherwise; and a whole GPT on the kernels must compute what it computes on
PyTorch's ops, logits and every parameter gradient.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from kernel_report import DEVICE, assert_close

from kernels.attention import flash_attention
from kernels.layernorm import MAX_WIDTH, layer_norm
from minillm import ops
from minillm.config import GPTConfig
from minillm.model import GPT

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_layer_norm_dispatch():
    x, w, b = torch.randn(4, 5, 24, device=DEVICE), torch.randn(24, device=DEVICE), torch.randn(24, device=DEVICE)
    kernel = layer_norm(x, w, b, use_triton=True)
    assert torch.equal(ops.layer_norm(x, w, b, impl="triton"), kernel)
    torch_out = F.layer_norm(x, (24,), w, b)
    assert torch.equal(ops.layer_norm(x, w, b, impl="torch"), torch_out)
    assert torch.equal(ops.layer_norm(x, w, b, impl="auto"), kernel if DEVICE == "cuda" else torch_out)
    with pytest.raises(ValueError, match="layernorm impl='triton' cannot run this input: row width"):
        ops.layer_norm(torch.randn(1, MAX_WIDTH + 1, device=DEVICE), torch.ones(MAX_WIDTH + 1, device=DEVICE),
                       None, impl="triton")


def test_attention_dispatch():
    q, k, v = (torch.randn(2, 2, 9, 16, device=DEVICE) for _ in range(3))
    kernel = flash_attention(q, k, v, causal=True, use_triton=True)
    assert torch.equal(ops.attention(q, k, v, impl="triton"), kernel)
    torch_out = ops.attention(q, k, v, impl="torch")
    assert torch.equal(ops.attention(q, k, v, impl="auto"), kernel if DEVICE == "cuda" else torch_out)
    # Tq < Tk through the dispatch point: the kernel's end-aligned mask equals the torch path's
    assert_close("decode", ops.attention(q[:, :, -3:], k, v, impl="triton"), ops.attention(q[:, :, -3:], k, v, impl="torch"), 1e-5, 1e-5)


def test_attention_dropout_is_torch_only():
    q = torch.randn(1, 2, 8, 16, device=DEVICE)
    with pytest.raises(ValueError, match="attention impl='triton' cannot run this input: dropout_p=0.1"):
        ops.attention(q, q, q, dropout_p=0.1, impl="triton")
    assert ops.attention(q, q, q, dropout_p=0.1, impl="auto").shape == q.shape  # falls back to torch


def test_triton_on_cpu_without_the_interpreter_is_a_clear_error():
    """A fresh process without TRITON_INTERPRET: CPU tensors cannot run the kernels, and say why."""
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA (here the kernels run on the GPU)")
    code = (
        "import torch\nfrom minillm import ops\nx = torch.randn(2, 8)\n"
        "assert torch.equal(ops.layer_norm(x, torch.ones(8), None, impl='auto'), torch.nn.functional.layer_norm(x, (8,)))\n"
        "try:\n    ops.layer_norm(x, torch.ones(8), None, impl='triton')\nexcept ValueError as e:\n    print(e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO_ROOT)
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "layernorm impl='triton' cannot run this input: tensors are on cpu" in run.stdout
    assert "TRITON_INTERPRET=1" in run.stdout


@pytest.mark.parametrize("bias", [True, False])
def test_gpt_on_kernels_matches_gpt_on_torch(bias):
    """Logits, loss and every parameter gradient of a tiny fp32 GPT agree between the two paths."""
    config = dict(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=32, bias=bias)
    torch.manual_seed(0)
    ref_model = GPT(GPTConfig(**config, impl="torch")).to(DEVICE)
    model = GPT(GPTConfig(**config, impl="triton")).to(DEVICE)
    model.load_state_dict(ref_model.state_dict())
    idx = torch.randint(0, 64, (2, 17), device=DEVICE)
    targets = torch.randint(0, 64, (2, 17), device=DEVICE)
    outputs = []
    for m in (model, ref_model):
        logits, loss = m(idx, targets)
        loss.backward()
        outputs.append((logits, loss, {n: p.grad for n, p in m.named_parameters()}))
    (logits, loss, grads), (ref_logits, ref_loss, ref_grads) = outputs
    assert_close("logits", logits, ref_logits, 1e-5, 1e-5)
    assert_close("loss", loss, ref_loss, 1e-6, 1e-6)
    for name, g in grads.items():
        assert_close(f"grad of {name}", g, ref_grads[name], 1e-4, 1e-5)


def test_bench_script_without_a_gpu_says_so_and_checks_the_kernels():
    if torch.cuda.is_available():
        pytest.skip("with a GPU bench/kernels.py runs the full benchmark (minutes): run it by hand")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "kernels.py")], env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "No CUDA device on this machine" in run.stdout
    assert "interpreter smoke check:" in run.stdout and run.stdout.rstrip().endswith("ok")
