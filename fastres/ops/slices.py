"""Adds into channel slices: Res2Net's split add, and the kernel behind partial-channel residuals.

    split_add(x, y, slot) -> x + y     and slot = y, in one pass over y: Res2Net's hierarchical
                                       add x_i + y_{i-1} (the next split conv's input), writing
                                       y_{i-1} into its channel slot of the concatenated output
                                       on the way, so the concatenation needs no pass of its own

`slot` is mutated in place, so the op has no autograd formula: it serves inference, where the
concatenation buffer is owned by the caller; under autograd a block concatenates instead. The sum
is contiguous when each image of `slot` is, else channels_last, on every backend.

The native kernel `fastres_native::residual_act_(out, residual, act)` (out[:, :C'] += residual,
then out = act(out), in place) is how `fastres.ops.conv` adds a residual of fewer channels than
the output after a oneDNN convolution; both kernels are csrc/cpu/slices.cpp and csrc/cuda/slices.cu.
"""
from __future__ import annotations

import torch
from torch import Tensor

from fastres import backend as B
from fastres.ops import library


def _empty_sum(slot: Tensor) -> Tensor:
    """The sum's tensor, in the layout the native kernels choose (csrc/slices.h, pixel_runs)."""
    _, c, h, w = slot.shape
    planes = (w == 1 or slot.stride(3) == 1) and (h == 1 or slot.stride(2) == w) and (c == 1 or slot.stride(1) == h * w)
    return torch.empty(slot.shape, dtype=slot.dtype, device=slot.device,
                       memory_format=torch.contiguous_format if planes else torch.channels_last)


def _check(x: Tensor, y: Tensor, slot: Tensor) -> None:
    if slot.dim() != 4:
        raise ValueError(f"fastres.split_add: slot must be 4-D (N, C, H, W), got shape {tuple(slot.shape)}")
    for name, t in (("x", x), ("y", y)):
        if t.shape != slot.shape or t.dtype != slot.dtype or t.device != slot.device:
            raise ValueError(f"fastres.split_add: {name} must match slot's shape {tuple(slot.shape)}, dtype "
                             f"{slot.dtype} and device {slot.device}; got {tuple(t.shape)}, {t.dtype}, {t.device}")
    if not slot.is_floating_point():
        raise TypeError(f"fastres.split_add: expects floating tensors, got {slot.dtype}")


@library.op("fastres::split_add", mutates_args=("slot",))
def split_add(x: Tensor, y: Tensor, slot: Tensor, backend: str) -> Tensor:
    _check(x, y, slot)
    args = (x, y, slot)
    return B.choose("split_add", backend, slot.device, args)(*args)


@split_add.register_fake
def _(x, y, slot, backend):
    return _empty_sum(slot)


@B.register("split_add", "reference")
def _split_add_reference(x: Tensor, y: Tensor, slot: Tensor) -> Tensor:
    out = _empty_sum(slot)
    torch.add(x, y, out=out)
    slot.copy_(y)
    return out


def _native_supports(x: Tensor, y: Tensor, slot: Tensor):
    from fastres.ops.bn_act import _native_supports as native_supports
    why = native_supports(slot, x, y)
    if why is not None:
        return why
    if slot.device.type == "cuda" and not _built_with_cuda():
        return "fastres._C was built without CUDA"
    if slot.device.type not in ("cpu", "cuda"):
        return f"no native kernel on {slot.device.type}"
    return None


def _built_with_cuda() -> bool:
    from fastres import _C
    return _C.built_with_cuda


@B.register("split_add", "native", supports=_native_supports)
def _split_add_native(x: Tensor, y: Tensor, slot: Tensor) -> Tensor:
    return torch.ops.fastres_native.split_add(x, y, slot)


# ---- fake kernels of the native ops, for tracing and torch.library.opcheck ------------------------
if B.NATIVE_MISSING is None:
    @torch.library.register_fake("fastres_native::split_add")
    def _(x, y, slot):
        return _empty_sum(slot)

    @torch.library.register_fake("fastres_native::residual_act_")
    def _(out, residual, act):
        return None
