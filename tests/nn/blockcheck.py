"""Block-vs-reference check shared by the timm block tests: the fastres block in its dtype against
the original block in float64 with the same (dtype-rounded) weights and input."""
from __future__ import annotations

import torch
import torch.nn as nn

from tests.utils import assert_close, assert_same_buffers


def round_to(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Round `module`'s floating parameters and buffers to `dtype` in place (values stay exact in
    float64 afterwards, so a float64 reference sees the very weights the tested block uses)."""
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            if t.is_floating_point():
                t.copy_(t.to(dtype))
    return module


def assert_matches_float64(ref64: nn.Module, new: nn.Module, x: torch.Tensor, *, train: bool,
                           skip_grads: tuple[str, ...] = ()) -> torch.Tensor:
    """Compare `new` (weights and `x` in x.dtype, any memory format) with `ref64`, the original
    block in float64 with the same weights (see `round_to`), on the same input: outputs; for
    fp32/fp64 the input and parameter gradients of a random projection (but `skip_grads`); in
    train mode the running statistics and num_batches_tracked.

    bf16/fp16 gradients are not compared: ReLU masks flip where a pre-activation rounds across 0
    and BN's training backward is a small difference of large terms; on Res2Net blocks with 1-3
    channel splits the worst parameter's relative L2 error vs float64 ranges 0.01-3.6 over 10
    seeds for eager bf16 and fastres alike, so no bound separates right from wrong there.
    Returns new's output."""
    dtype = x.dtype
    assert all(p.dtype == torch.float64 for p in ref64.parameters()), "the reference must be float64"
    ref64.train(train).zero_grad(set_to_none=True)
    new.train(train).zero_grad(set_to_none=True)
    grads = dtype in (torch.float32, torch.float64)
    xr = x.detach().double().contiguous().requires_grad_(grads)
    xn = x.detach().clone(memory_format=torch.preserve_format).requires_grad_(grads)
    yr, yn = ref64(xr), new(xn)
    assert_close(yn, yr, dtype=dtype, name="output")
    if grads:
        proj = torch.randn(yr.shape, dtype=torch.float64)
        (yr * proj).sum().backward()
        (yn.double() * proj).sum().backward()
        assert_close(xn.grad, xr.grad, dtype=dtype, name="input grad")
        reduced = yr.shape[0] * yr.shape[2] * yr.shape[3]  # the smallest per-channel reduction in the block
        pn = dict(new.named_parameters())
        for name, p in ref64.named_parameters():
            if name in skip_grads:
                continue
            assert_close(pn[name].grad, p.grad, dtype=dtype, reduced=reduced, name=f"grad {name}")
    if not train:
        return yn
    assert_same_buffers(new, ref64, dtype=dtype)
    return yn
