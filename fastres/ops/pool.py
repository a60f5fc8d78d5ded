"""2-D max / average pooling of a BN-act pre-activation:

    out = pool(act(BN(x)))        BN arguments as bn_act's (`training` when mean/invstd are the
                                  batch statistics of x); kind "max" or "avg" (count_include_pad)

The native CPU kernel applies the BN-act as it reads each window and keeps no argmax; the
reference composes bn_act and ATen's pooling. The activated tensor is not saved: the backward
recomputes it from x (and, for max pooling, the argmax with it), so a stem's
conv-BN-ReLU-maxpool keeps only the conv output for backward.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as TF
from torch import Tensor

from fastres import backend as B
from fastres.ops import library
from fastres.ops import reference as ref
from fastres.ops.bn_act import bn_act, bn_act_backward, check_act, check_bn

KINDS = ("max", "avg")


def _pool(a: Tensor, kind: str, kernel_size, stride, padding) -> Tensor:
    if kind == "max":
        return TF.max_pool2d(a, kernel_size, stride, padding)
    return TF.avg_pool2d(a, kernel_size, stride, padding)


def _has_prologue(weight, bias, mean, invstd, act: str) -> bool:
    return not (weight is None and bias is None and mean is None and invstd is None and act == "identity")


@library.op("fastres::bn_act_pool2d", mutates_args=())
def bn_act_pool2d(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Optional[Tensor],
                  invstd: Optional[Tensor], act: str, training: bool, kind: str,
                  kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                  backend: str) -> Tensor:
    check_act(act)
    check_bn("bn_act_pool2d", x, mean, invstd, training)
    if kind not in KINDS:
        raise ValueError(f"fastres.bn_act_pool2d: kind must be one of {KINDS}, got {kind!r}")
    if x.dim() != 4:
        raise ValueError(f"fastres.bn_act_pool2d: expected a 4-D input (N, C, H, W), got shape {tuple(x.shape)}")
    args = (x, weight, bias, mean, invstd, act, kind, list(kernel_size), list(stride), list(padding))
    return B.choose("bn_act_pool2d", backend, x.device, args)(*args)


@bn_act_pool2d.register_fake
def _(x, weight, bias, mean, invstd, act, training, kind, kernel_size, stride, padding, backend):
    return _pool(torch.empty_like(x), kind, list(kernel_size), list(stride), list(padding))


def _setup(ctx, inputs, output):
    x, weight, bias, mean, invstd, act, training, kind, kernel_size, stride, padding, backend = inputs
    ctx.conf = (act, training, kind, list(kernel_size), list(stride), list(padding), backend)
    ctx.save_for_backward(x, weight, bias, mean, invstd)


def _backward(ctx, grad):
    x, weight, bias, mean, invstd = ctx.saved_tensors
    act, training, kind, kernel_size, stride, padding, backend = ctx.conf
    nx, nw, nb, nmean, ninvstd = ctx.needs_input_grad[:5]
    if not training and (nmean or ninvstd):
        raise RuntimeError("fastres.bn_act_pool2d: gradients w.r.t. mean/invstd in eval mode are not "
                           "supported; fold them into weight/bias")
    prologue = _has_prologue(weight, bias, mean, invstd, act)
    a = bn_act(x, weight, bias, mean, invstd, None, act, training, backend) if prologue else x  # recomputed
    if kind == "max":
        _, idx = torch.ops.aten.max_pool2d_with_indices(a, kernel_size, stride, padding)
        ga = torch.ops.aten.max_pool2d_with_indices_backward(grad, a, kernel_size, stride, padding, [1, 1],
                                                              False, idx)
    else:
        ga = torch.ops.aten.avg_pool2d_backward(grad, a, kernel_size, stride, padding, False, True, None)
    if not prologue:
        return (ga,) + (None,) * 11
    gx, _, gw, gb = bn_act_backward(ga, x, weight, bias, mean, invstd, None, None, act, training,
                                    [nx, False, nw and weight is not None, nb and bias is not None], backend)
    return (gx if nx else None, gw if nw else None, gb if nb else None) + (None,) * 9


bn_act_pool2d.register_autograd(_backward, setup_context=_setup)


@B.register("bn_act_pool2d", "reference")
def _bn_act_pool2d_reference(x, weight, bias, mean, invstd, act, kind, kernel_size, stride, padding):
    a = ref.bn_act(x, weight, bias, mean, invstd, None, act) if _has_prologue(weight, bias, mean, invstd, act) else x
    return _pool(a, kind, kernel_size, stride, padding)


def _native_supports(x, weight, bias, mean, invstd, act, kind, kernel_size, stride, padding) -> Optional[str]:
    from fastres.ops.bn_act import _native_supports as bn_native_supports
    why = bn_native_supports(x, weight, bias, mean, invstd)
    if why is None and x.device.type != "cpu":
        why = f"the native pooling kernel runs on CPU tensors (device is {x.device.type})"
    if why is None and not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        why = "input is neither contiguous nor channels_last (the kernel would copy it)"
    if why is None and any(2 * p > k for p, k in zip(padding, kernel_size)):
        why = f"padding {padding} exceeds half the kernel {kernel_size}"
    return why


@B.register("bn_act_pool2d", "native", supports=_native_supports)
def _bn_act_pool2d_native(x, weight, bias, mean, invstd, act, kind, kernel_size, stride, padding):
    """One pass: the BN-act is applied as each window is read; no argmax, no activated copy."""
    return torch.ops.fastres_native.bn_act_pool2d(x, weight, bias, mean, invstd, act, kind, kernel_size, stride,
                                                  padding)
