"""Fused Triton kernels (flash attention, layernorm), each with a PyTorch reference path.

`minillm.ops` is the one place the model calls into these; importing this package does not import
Triton, so the library works on machines without it.
"""
