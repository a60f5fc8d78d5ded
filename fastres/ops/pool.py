"""2-D max / average pooling of a BN-act pre-activation:

    out = pool(act(BN(x)))        BN arguments as bn_act's (`training` when mean/invstd are the
                                  batch statistics of x); kind "max" or "avg" (count_include_pad)

The native CPU kernel and the Triton kernel apply the BN-act as they read each window and keep
no argmax; the reference composes bn_act and ATen's pooling. The activated tensor is not saved:
the backward recomputes it from x (and, for max pooling, the argmax with it), so a stem's
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
    return _like_pool(x, kind, list(kernel_size), list(stride), list(padding))


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


# ==== triton implementation: the BN-act applied as each window is read (fastres.kernels.pool) ====
def _like_pool(x: Tensor, kind: str, kernel_size, stride, padding) -> Tensor:
    """An uninitialised tensor with the shape and strides ATen's pooling gives for x."""
    meta = _pool(torch.empty_like(x, device="meta"), kind, kernel_size, stride, padding)
    return torch.empty_strided(meta.shape, meta.stride(), dtype=x.dtype, device=x.device)


def _triton_supports(x, weight, bias, mean, invstd, act, kind, kernel_size, stride, padding) -> Optional[str]:
    from fastres.ops.bn_act import triton_supports
    why = triton_supports(x, weight, bias, mean, invstd)
    if why is None and any(2 * p > k for p, k in zip(padding, kernel_size)):
        why = f"padding {padding} exceeds half the kernel {kernel_size}"
    if why is None and any((h + 2 * p - k) // s + 1 <= 0 for h, p, k, s in zip(x.shape[2:], padding, kernel_size,
                                                                                 stride)):
        why = f"empty output: kernel {kernel_size} larger than the padded input {tuple(x.shape[2:])}"
    return why


@B.register("bn_act_pool2d", "triton", supports=_triton_supports)
def _bn_act_pool2d_triton(x, weight, bias, mean, invstd, act, kind, kernel_size, stride, padding):
    """One kernel: each window read once with the BN-act applied; no argmax, no activated copy."""
    import triton

    from fastres.kernels import bn_act as KB
    from fastres.kernels import pool as K
    from fastres.kernels.conv import ACTS
    from fastres.ops.bn_act import _channels_contiguous, triton_device
    scale, shift = ref.scale_shift(weight, bias, mean, invstd, x)
    out = _like_pool(x, kind, kernel_size, stride, padding)
    n, c, h, w = x.shape
    oh, ow = out.shape[2:]
    bp, bc = KB.pick_blocks(c, _channels_contiguous(x), K.ELEMENTS)
    grid = (triton.cdiv(n * oh * ow, bp), triton.cdiv(c, bc))
    with triton_device(x):
        B.launcher(K.bn_act_pool2d_kernel)[grid](
            x, scale if scale is not None else x, shift if shift is not None else x, out,
            n * oh * ow, c, h, w, oh * ow, ow, *x.stride(), *out.stride(), *stride, *padding,
            R=kernel_size[0], S=kernel_size[1], MAX=kind == "max", HAS_SCALE=scale is not None,
            HAS_SHIFT=shift is not None, ACT=ACTS[act], BLOCK_P=bp, BLOCK_C=bc, num_warps=KB.NUM_WARPS)
    return out
