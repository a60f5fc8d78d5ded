"""2-D convolution with a fused prologue and epilogue.

    a   = pre_act((x + addend) * pre_scale[c] + pre_shift[c])   prologue: BN-act pre-activation,
                                                                Res2Net's x_i + y_{i-1}
    out = act(conv(a, weight) + bias[k] + residual)             epilogue: folded BN, residual, act

Every prologue/epilogue input is optional. Padded pixels are zeros of `a` (after the prologue).
The backward recomputes `a` from `x` instead of saving it.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from fastres import backend as B
from fastres.ops import reference as ref
from fastres.ops.bn_act import _check_act


def out_shape(x: Tensor, weight: Tensor, stride, padding, dilation) -> list[int]:
    hw = [(x.shape[2 + i] + 2 * padding[i] - dilation[i] * (weight.shape[2 + i] - 1) - 1) // stride[i] + 1
          for i in range(2)]
    return [x.shape[0], weight.shape[0], *hw]


@torch.library.custom_op("fastres::conv2d", mutates_args=())
def conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: Sequence[int],
           padding: Sequence[int], dilation: Sequence[int], groups: int,
           pre_scale: Optional[Tensor], pre_shift: Optional[Tensor], pre_act: str,
           addend: Optional[Tensor], residual: Optional[Tensor], act: str, backend: str) -> Tensor:
    _check_act(pre_act)
    _check_act(act)
    args = (x, weight, bias, list(stride), list(padding), list(dilation), groups,
            pre_scale, pre_shift, pre_act, addend, residual, act)
    return B.choose("conv2d", backend, x.device, args)(*args)


def _memory_format(x: Tensor, weight: Tensor) -> torch.memory_format:
    cl = torch.channels_last
    return cl if x.suggest_memory_format() == cl or weight.suggest_memory_format() == cl else torch.contiguous_format


@conv2d.register_fake
def _(x, weight, bias, stride, padding, dilation, groups, pre_scale, pre_shift, pre_act, addend,
      residual, act, backend):
    return x.new_empty(out_shape(x, weight, stride, padding, dilation)).contiguous(
        memory_format=_memory_format(x, weight))


_CONV_INPUTS = ("x", "weight", "bias", "pre_scale", "pre_shift", "addend", "residual")
_INDEX = {"x": 0, "weight": 1, "bias": 2, "pre_scale": 7, "pre_shift": 8, "addend": 10, "residual": 11}


def _setup(ctx, inputs, output):
    (x, weight, bias, stride, padding, dilation, groups, pre_scale, pre_shift, pre_act, addend,
     residual, act, backend) = inputs
    ctx.conf = (list(stride), list(padding), list(dilation), groups, pre_act, act)
    ctx.save_for_backward(x, weight, bias, pre_scale, pre_shift, addend, residual,
                          output if act != "silu" else None)


def _backward(ctx, grad):
    x, weight, bias, pre_scale, pre_shift, addend, residual, out = ctx.saved_tensors
    stride, padding, dilation, groups, pre_act, act = ctx.conf
    needs = [ctx.needs_input_grad[_INDEX[n]] for n in _CONV_INPUTS]
    gx, gw, gb, gps, gpb, gadd, gres = ref.conv2d_backward(
        grad, out if out is not None else grad, x, weight, bias, stride, padding, dilation, groups,
        pre_scale, pre_shift, pre_act, addend, residual, act, needs)
    return gx, gw, gb, None, None, None, None, gps, gpb, None, gadd, gres, None, None


conv2d.register_autograd(_backward, setup_context=_setup)

B.register("conv2d", "reference")(ref.conv2d)
