"""Comparison helpers shared by the kernel tests: a readable report of where two tensors differ.

A kernel test that fails should say which output, how far off, where, and what both sides hold
there, so the first look at a failure tells whether it is one masked edge, a whole tile or rounding.
"""

from __future__ import annotations

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def mismatch_report(name: str, got: torch.Tensor, want: torch.Tensor, bound: torch.Tensor | float) -> str:
    """Max and mean absolute error, how many elements exceed `bound`, and the worst one's index and values."""
    err = (got.double() - want.double()).abs()
    excess = torch.nan_to_num(err - bound, nan=float("inf"))  # NaN counts as the worst possible
    worst = int(excess.reshape(-1).argmax())
    where = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), err.shape))
    allowed = bound.reshape(-1)[worst].item() if isinstance(bound, torch.Tensor) else bound
    return (
        f"{name} {tuple(got.shape)} {got.dtype}: max error {err.max().item():.3g}, mean {err.mean().item():.3g}; "
        f"{int((excess > 0).sum())} of {err.numel()} elements over the bound; worst at {where}: "
        f"got {got.reshape(-1)[worst].item():.6g}, want {want.reshape(-1)[worst].item():.6g}, allowed {allowed:.3g}"
    )


def assert_close(name: str, got: torch.Tensor, want: torch.Tensor, rtol: float, atol: float) -> None:
    """|got - want| <= atol * max(max|want|, 1) + rtol * |want| elementwise, else fail with the report.

    `atol` grows with the largest reference value, so one tolerance fits outputs of any scale, but
    not below 1: a reference that is zero up to its own rounding (a gradient that vanishes
    analytically) must not demand exact zeros. NaN or inf in `got` always fails.
    """
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != reference {tuple(want.shape)}"
    if got.numel() == 0:
        return
    want = want.double()
    bound = atol * want.abs().max().clamp_min(1.0) + rtol * want.abs()
    err = (got.double() - want).abs()
    assert bool(torch.isfinite(got).all()) and bool((err <= bound).all()), mismatch_report(name, got, want, bound)


def assert_within(name: str, got: torch.Tensor, want: torch.Tensor, allowed: float) -> None:
    """max|got - want| <= allowed (a single bound for the whole tensor), else fail with the report."""
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != reference {tuple(want.shape)}"
    if got.numel() == 0:
        return
    err = (got.double() - want.double()).abs()
    assert bool(torch.isfinite(got).all()) and err.max().item() <= allowed, mismatch_report(name, got, want, allowed)
