"""2-D convolution with a fused prologue and epilogue.

    a   = pre_act(BN(x + addend))          prologue: BN-act pre-activation (pre_weight, pre_bias,
                                           pre_mean, pre_invstd; `pre_training` when they are the
                                           batch statistics of x), Res2Net's x_i + y_{i-1}
    out = act(conv(a, weight) + bias + residual)   epilogue: folded BN, residual, activation

Every prologue/epilogue input is optional. Padded pixels are zeros of `a` (after the prologue).
The backward recomputes `a` from `x` instead of saving it.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from fastres import backend as B
from fastres.ops import reference as ref
from fastres.ops.bn_act import check_act, check_bn


def out_shape(x: Tensor, weight: Tensor, stride, padding, dilation) -> list[int]:
    hw = [(x.shape[2 + i] + 2 * padding[i] - dilation[i] * (weight.shape[2 + i] - 1) - 1) // stride[i] + 1
          for i in range(2)]
    return [x.shape[0], weight.shape[0], *hw]


@torch.library.custom_op("fastres::conv2d", mutates_args=())
def conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: Sequence[int],
           padding: Sequence[int], dilation: Sequence[int], groups: int,
           pre_weight: Optional[Tensor], pre_bias: Optional[Tensor], pre_mean: Optional[Tensor],
           pre_invstd: Optional[Tensor], pre_act: str, pre_training: bool,
           addend: Optional[Tensor], residual: Optional[Tensor], act: str, backend: str) -> Tensor:
    check_act(pre_act)
    check_act(act)
    check_bn("conv2d", x, pre_mean, pre_invstd, pre_training)
    if pre_training and addend is not None:
        raise ValueError("fastres.conv2d: a batch-statistics prologue cannot take an addend")
    args = (x, weight, bias, list(stride), list(padding), list(dilation), groups, pre_weight,
            pre_bias, pre_mean, pre_invstd, pre_act, pre_training, addend, residual, act)
    return B.choose("conv2d", backend, x.device, args)(*args)


def _memory_format(x: Tensor, weight: Tensor) -> torch.memory_format:
    """The layout ATen's convolution gives its output: channels_last if either operand has
    channels-last strides (also a channel slice of a channels_last buffer)."""
    def cl(t: Tensor) -> bool:
        return t.stride(1) == 1 and t.stride(3) != 1 and not t.is_contiguous()
    return torch.channels_last if cl(x) or cl(weight) else torch.contiguous_format


@conv2d.register_fake
def _(x, weight, bias, stride, padding, dilation, groups, pre_weight, pre_bias, pre_mean, pre_invstd,
      pre_act, pre_training, addend, residual, act, backend):
    return x.new_empty(out_shape(x, weight, stride, padding, dilation)).contiguous(
        memory_format=_memory_format(x, weight))


# positions of the differentiable inputs, in the order conv2d_backward returns their grads
_GRAD_INPUTS = (0, 1, 2, 7, 8, 13, 14)  # x, weight, bias, pre_weight, pre_bias, addend, residual


def _setup(ctx, inputs, output):
    (x, weight, bias, stride, padding, dilation, groups, pre_weight, pre_bias, pre_mean, pre_invstd,
     pre_act, pre_training, addend, residual, act, backend) = inputs
    ctx.conf = (list(stride), list(padding), list(dilation), groups, pre_act, pre_training, act)
    ctx.save_for_backward(x, weight, bias, pre_weight, pre_bias, pre_mean, pre_invstd, addend,
                          residual, output if act != "silu" else None)


def _backward(ctx, grad):
    x, weight, bias, pw, pb, pmean, pinvstd, addend, residual, out = ctx.saved_tensors
    stride, padding, dilation, groups, pre_act, pre_training, act = ctx.conf
    if not pre_training and (ctx.needs_input_grad[9] or ctx.needs_input_grad[10]):
        raise RuntimeError("fastres.conv2d: gradients w.r.t. pre_mean/pre_invstd in eval mode are not "
                           "supported; fold them into pre_weight/pre_bias")
    needs = [ctx.needs_input_grad[i] for i in _GRAD_INPUTS]
    grads = ref.conv2d_backward(grad, out, x, weight, bias, stride, padding,
                                dilation, groups, pw, pb, pmean, pinvstd, pre_act, pre_training,
                                addend, residual, act, needs)
    result = [None] * 17
    for i, g in zip(_GRAD_INPUTS, grads):
        result[i] = g
    return tuple(result)


conv2d.register_autograd(_backward, setup_context=_setup)

B.register("conv2d", "reference")(ref.conv2d)
