"""The one tolerance table every numeric test uses, and comparison helpers."""
from __future__ import annotations

import math

import torch

# (atol, rtol) on the max-abs error relative to the reference's scale:
#   max|actual - expected| <= atol + rtol * max|expected|
# fp32/fp64 bounds cover reassociation of sums (oneDNN vs ATen order); half types their rounding.
TOL = {
    torch.float64: (1e-10, 1e-9),
    torch.float32: (1e-5, 2e-5),
    torch.bfloat16: (1e-2, 2e-2),
    torch.float16: (1e-3, 4e-3),
}


def tol(dtype: torch.dtype, reduced: int = 1) -> tuple[float, float]:
    """(atol, rtol) for `dtype`; atol grows with sqrt of the number of terms reduced (dW, dB)."""
    atol, rtol = TOL[dtype]
    return atol * math.sqrt(max(reduced, 1)), rtol


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, dtype: torch.dtype | None = None,
                 reduced: int = 1, name: str = "") -> None:
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    atol, rtol = tol(dtype or expected.dtype, reduced)
    a, e = actual.detach().double(), expected.detach().double()
    if e.numel() == 0:
        return
    assert torch.isfinite(a).all() == torch.isfinite(e).all(), f"{name}: non-finite values differ"
    err = (a - e).abs().max().item()
    scale = e.abs().max().item()
    bound = atol + rtol * scale
    assert err <= bound, f"{name}: max abs error {err:.3g} > {bound:.3g} (scale {scale:.3g}, {dtype or expected.dtype})"
