"""A convolution of a learnable weighted sum of states: DAG connectivity (fastres.nn.DAGBlock).

    a   = sum_i mix[i] * states[i]          states (S, N, C, H, W): S earlier outputs, slots of one
                                            buffer; mix (S,): one weight per state
    out = act(conv(a, weight) + bias)       epilogue: folded BN, activation

`a` is accumulated in fp32 (float64 for float64) and rounded once to the states' dtype. On the
triton backend it is formed while the conv loads its input tiles (the kernel's NUM_MIX prologue:
input i is read i * states.stride(0) elements past input 0) and never stored; the native CPU
backend forms it in one pass and runs the oneDNN convolution; the reference sums eagerly.

The backward recomputes `a` from the states instead of saving it. The states are kept for the
backward as they are, without autograd's in-place check: a DAG block writes each later output
into the next slot of the buffer the states are a view of, which bumps the buffer's version
although the slots read here never change. Writing into the slots an op has read before its
backward runs gives wrong gradients.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from fastres import backend as B
from fastres.ops import library
from fastres.ops import reference as ref
from fastres.ops.bn_act import check_act
from fastres.ops.conv import _memory_format, conv2d_onednn, onednn_missing, out_shape


def check_mix(states: Tensor, mix: Tensor, weight: Tensor, groups: int) -> None:
    """Clear errors for inputs the op cannot take."""
    if states.dim() != 5:
        raise ValueError(f"fastres.mix_conv2d: states must be 5-D (S, N, C, H, W), got shape {tuple(states.shape)}")
    if mix.dim() != 1 or mix.shape[0] != states.shape[0] or mix.shape[0] < 1:
        raise ValueError(f"fastres.mix_conv2d: mix must be 1-D with one weight per state, shape "
                         f"({states.shape[0]},), got {tuple(mix.shape)}")
    if not mix.is_floating_point() or not states.is_floating_point():
        raise TypeError(f"fastres.mix_conv2d: states and mix must be floating point, got {states.dtype} "
                        f"and {mix.dtype}")
    if weight.dim() != 4 or weight.shape[1] * groups != states.shape[2]:
        raise ValueError(f"fastres.mix_conv2d: weight must be (K, C/groups, R, S) with C = {states.shape[2]}, "
                         f"groups = {groups}; got {tuple(weight.shape)}")
    if mix.device != states.device or weight.device != states.device:
        raise ValueError(f"fastres.mix_conv2d: states ({states.device}), mix ({mix.device}) and weight "
                         f"({weight.device}) must be on one device")


@library.op("fastres::mix_conv2d", mutates_args=())
def mix_conv2d(states: Tensor, mix: Tensor, weight: Tensor, bias: Optional[Tensor], stride: Sequence[int],
               padding: Sequence[int], dilation: Sequence[int], groups: int, act: str, backend: str) -> Tensor:
    check_mix(states, mix, weight, groups)
    check_act(act)
    args = (states, mix, weight, bias, list(stride), list(padding), list(dilation), groups, act)
    return B.choose("mix_conv2d", backend, states.device, args)(*args)


@mix_conv2d.register_fake
def _(states, mix, weight, bias, stride, padding, dilation, groups, act, backend):
    x = states[0]
    return x.new_empty(out_shape(x, weight, stride, padding, dilation)).contiguous(
        memory_format=_memory_format(x, weight))


def _setup(ctx, inputs, output):
    states, mix, weight, bias, stride, padding, dilation, groups, act, backend = inputs
    ctx.conf = (list(stride), list(padding), list(dilation), groups, act)
    ctx.states = states   # not save_for_backward: see the module docstring
    ctx.save_for_backward(mix, weight, bias, output if act in ("relu", "relu6") else None)


def _backward(ctx, grad):
    mix, weight, bias, out = ctx.saved_tensors
    stride, padding, dilation, groups, act = ctx.conf
    gs, gm, gw, gb = ref.mix_conv2d_backward(grad, out, ctx.states, mix, weight, bias, stride, padding,
                                             dilation, groups, act, ctx.needs_input_grad[:4])
    return gs, gm, gw, gb, None, None, None, None, None, None


mix_conv2d.register_autograd(_backward, setup_context=_setup)

B.register("mix_conv2d", "reference")(ref.mix_conv2d)


# ==== native CPU implementation: one pass for the sum, then the oneDNN convolution ===============
def _dense_slots(states: Tensor) -> bool:
    """Each slot is one dense block of memory (contiguous or channels_last) and the slots do not
    overlap: the S x (N*C*H*W) matrix of the states is then a strided view."""
    x = states[0]
    dense = x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)
    return dense and (states.shape[0] == 1 or states.stride(0) >= x.numel())


def weighted_sum(states: Tensor, mix: Tensor) -> Tensor:
    """sum_i mix[i] * states[i] with slot 0's layout. float32/float64 states with dense slots: one
    matrix-vector product over the states' memory (each state read once, `a` written once);
    otherwise the reference's running sum."""
    x = states[0]
    if states.dtype not in (torch.float32, torch.float64) or not _dense_slots(states) or states.shape[0] == 1:
        return ref.mix_sum(states, mix)
    flat = states.as_strided((states.shape[0], x.numel()), (states.stride(0), 1))
    a = torch.mv(flat.t(), mix.to(states.dtype))
    return a.as_strided(x.shape, x.stride())


def _native_supports(states, mix, weight, bias, stride, padding, dilation, groups, act):
    return onednn_missing(states[0], weight, bias, mix)


@B.register("mix_conv2d", "native", supports=_native_supports, kernel=False)
def _mix_conv2d_native(states, mix, weight, bias, stride, padding, dilation, groups, act):
    return conv2d_onednn(weighted_sum(states, mix), weight, bias, stride, padding, dilation, groups, None, act)
# ==== end of the native CPU implementation ====================================================


# ==== triton implementation: the sum in the implicit-GEMM conv's input load ======================
# The conv launcher of fastres.ops.conv runs with the kernel's NUM_MIX prologue: x is slot 0 of the
# states, slot i lies i * states.stride(0) elements further with the same strides. mix goes in as
# an fp32 vector. NUM_MIX is unrolled (one specialisation per state count, at most MAX_MIX), and
# above 3 states the channel chunk shrinks so the staged tiles fit shared memory. The backward
# stays on the reference.
def _triton_supports(states, mix, weight, bias, stride, padding, dilation, groups, act):
    from fastres.kernels.conv import MAX_MIX
    from fastres.ops.conv import _triton_conv2d_supports
    why = _triton_conv2d_supports(states[0], weight, bias, stride, padding, dilation, groups, None, None,
                                  None, None, "identity", False, None, None, act)
    if why is None and states.shape[0] > MAX_MIX:
        why = f"the fused sum takes at most {MAX_MIX} states, got {states.shape[0]}"
    if why is None and states.shape[0] > 1 and states.stride(0) <= 0:
        why = f"states must lie one after another in memory (stride(0) is {states.stride(0)})"
    return why


@B.register("mix_conv2d", "triton", supports=_triton_supports)
def mix_conv2d_triton(states, mix, weight, bias, stride, padding, dilation, groups, act, *, config=None):
    """One implicit-GEMM kernel with the weighted sum fused into its input load."""
    from fastres.kernels import conv as K
    from fastres.ops.conv import conv2d_triton
    x = states[0]
    k, cg = weight.shape[:2]
    cfg = config or K.pick_config(cg, k // groups, x.element_size(), states.shape[0])   # never the depthwise kernel
    kw = dict(mix_ptr=mix.to(torch.float32).contiguous(), s_mix=states.stride(0), NUM_MIX=states.shape[0])
    return conv2d_triton(x, weight, bias, stride, padding, dilation, groups, None, None, None, None, "identity",
                         False, None, None, act, config=cfg, mix=kw)
# ==== end of the triton implementation ========================================================

