"""Eager reference implementations of every fastres op, forward and backward.

This is the oracle the tests compare other backends against, and the backend that runs whatever
no faster kernel covers. Per-channel math (scale, shift, statistics) runs in fp32 for fp16/bf16
inputs, as cuDNN and ATen's batch norm do; outputs are cast back to the input dtype.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

ACTS = ("identity", "relu", "relu6", "silu")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of `dtype`: fp32 for half types, else itself."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _acc(t: Tensor) -> Tensor:
    """The tensor in its accumulation dtype (fp32 for half types)."""
    return t.to(acc_dtype(t.dtype))


def _chan(v: Tensor, ref: Tensor) -> Tensor:
    """Per-channel vector `v` shaped to broadcast over dim 1 of `ref`."""
    return v.view((1, -1) + (1,) * (ref.dim() - 2))


def _reduce_dims(t: Tensor) -> list[int]:
    return [d for d in range(t.dim()) if d != 1]


def apply_act(z: Tensor, act: str) -> Tensor:
    if act == "relu":
        return torch.relu(z)
    if act == "relu6":
        return F.hardtanh(z, 0.0, 6.0)
    if act == "silu":
        return F.silu(z)
    return z


def apply_act_(z: Tensor, act: str) -> Tensor:
    """apply_act in place."""
    if act == "relu":
        z.relu_()
    elif act == "relu6":
        F.hardtanh_(z, 0.0, 6.0)
    elif act == "silu":
        F.silu(z, inplace=True)
    return z


def act_backward(g: Tensor, act: str, *, z: Optional[Tensor] = None, y: Optional[Tensor] = None) -> Tensor:
    """dL/dz from dL/dy. relu/relu6 read the mask from the output `y` (as ATen does) or from `z`;
    silu needs the pre-activation `z`."""
    if act == "identity":
        return g
    if act == "silu":
        s = torch.sigmoid(z)
        return g * (s * (1 + z * (1 - s)))
    ref = y if y is not None else z
    keep = ref > 0 if act == "relu" else (ref > 0) & (ref < 6)
    return torch.where(keep, g, torch.zeros((), dtype=g.dtype, device=g.device))


# ---- batch norm (or any per-channel affine) + residual + activation ---------------------------
#   z = (x - mean) * invstd * weight + bias (+ residual),  y = act(z); every term optional.
# With `training`, mean/invstd are the batch statistics of x itself and the backward includes
# their gradient (the full BN backward, combined in fp32 and rounded once).
def scale_shift(weight: Optional[Tensor], bias: Optional[Tensor], mean: Optional[Tensor],
                invstd: Optional[Tensor], x: Tensor) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """Per-channel (scale, shift) with z = x * scale + shift, in x's accumulation dtype."""
    acc = acc_dtype(x.dtype)  # no copy of x
    scale = invstd.to(acc) if invstd is not None else None
    if weight is not None:
        scale = weight.to(acc) if scale is None else scale * weight.to(acc)
    shift = None
    if mean is not None:
        shift = -mean.to(acc) * (scale if scale is not None else 1)
    if bias is not None:
        shift = bias.to(acc) if shift is None else shift + bias.to(acc)
    return scale, shift


def bn_pre(x: Tensor, weight, bias, mean, invstd, residual: Optional[Tensor]) -> Tensor:
    scale, shift = scale_shift(weight, bias, mean, invstd, x)
    z = _acc(x)
    if scale is not None:
        z = z * _chan(scale, x)
    if shift is not None:
        z = z + _chan(shift, x)
    if residual is not None:
        z = z + residual
    return z


def bn_act(x: Tensor, weight, bias, mean, invstd, residual: Optional[Tensor], act: str) -> Tensor:
    return apply_act(bn_pre(x, weight, bias, mean, invstd, residual), act).to(x.dtype)


def bn_backward(gz: Tensor, x: Tensor, weight, mean, invstd, training: bool,
                need_x: bool, need_w: bool, need_b: bool):
    """Grads of (x, weight, bias) of z = (x - mean) * invstd * weight + bias given dL/dz (fp32).
    Per-channel sums in fp32; with `training` the statistics' gradient is included."""
    dims = _reduce_dims(x)
    xa = _acc(x)
    s0 = gz.sum(dims)
    xhat = xa
    if mean is not None:
        xhat = xhat - _chan(mean.to(xa.dtype), x)
    if invstd is not None:
        xhat = xhat * _chan(invstd.to(xa.dtype), x)
    s1 = (gz * xhat).sum(dims) if (need_w or training) else None
    gx = None
    if need_x:
        scale, _ = scale_shift(weight, None, None, invstd, x)
        g = gz
        if training:
            n = max(x.numel() // max(x.shape[1], 1), 1)
            g = gz - _chan(s0 / n, x) - xhat * _chan(s1 / n, x)
        gx = (g * _chan(scale, x) if scale is not None else g).to(x.dtype)
    gw = s1.to(weight.dtype) if need_w and weight is not None else None
    gb = s0 if need_b else None
    return gx, gw, gb


def bn_act_backward(grad: Tensor, x: Tensor, weight, bias, mean, invstd, residual: Optional[Tensor],
                    out: Optional[Tensor], act: str, training: bool,
                    output_mask: Sequence[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Grads of (x, residual, weight, bias); entries not in output_mask are empty. The activation
    is recomputed from the saved input (silu, and the relu family without a saved output `out`)
    or read from the saved output (relu family)."""
    if act == "silu":
        gz = act_backward(_acc(grad), act, z=bn_pre(x, weight, bias, mean, invstd, residual))
    elif out is None and act != "identity":   # the output as the forward rounded it
        z = bn_pre(x, weight, bias, mean, invstd, residual)
        gz = act_backward(_acc(grad), act, y=apply_act(z, act).to(x.dtype))
    else:
        gz = act_backward(_acc(grad), act, y=out)
    gx, gw, gb = bn_backward(gz, x, weight, mean, invstd, training, output_mask[0],
                             output_mask[2] and weight is not None, output_mask[3] and bias is not None)
    empty = grad.new_empty(0)
    gres = gz.to(grad.dtype) if output_mask[1] else empty
    return (gx if gx is not None else empty, gres, gw if gw is not None else empty,
            gb.to(bias.dtype) if gb is not None else empty)


# ---- batch statistics ------------------------------------------------------------------------
def batch_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance over every dim but 1, in the accumulation dtype
    (NaN for an empty input, as there is nothing to average)."""
    if x.numel() == 0:
        nan = torch.full((x.shape[1],), float("nan"), dtype=_acc(x).dtype, device=x.device)
        return nan, nan.clone()
    var, mean = torch.var_mean(_acc(x), dim=_reduce_dims(x), correction=0)
    return mean, var


def batch_stats_backward(gmean: Tensor, gvar: Tensor, x: Tensor, mean: Tensor) -> Tensor:
    n = max(x.numel() // max(x.shape[1], 1), 1)
    xc = _acc(x) - _chan(mean, x)
    return ((_chan(gmean, x) + 2 * _chan(gvar, x) * xc) / n).to(x.dtype)


# ---- convolution with fused prologue and epilogue --------------------------------------------
def has_prologue(pw, pb, pmean, pinvstd, pre_act: str) -> bool:
    """Whether these BN-act prologue arguments change the input (else it goes in as it is)."""
    return not (pw is None and pb is None and pmean is None and pinvstd is None and pre_act == "identity")


def prologue(x: Tensor, addend: Optional[Tensor], pw, pb, pmean, pinvstd,
             pre_act: str) -> tuple[Tensor, Optional[Tensor]]:
    """The conv input a = pre_act(BN(x)) + addend (each step rounded to x's dtype), and the
    pre-activation z of the BN-act (None when that is the identity)."""
    z = None
    a = x
    if has_prologue(pw, pb, pmean, pinvstd, pre_act):
        z = bn_pre(x, pw, pb, pmean, pinvstd, None)
        a = apply_act(z, pre_act).to(x.dtype)
    return (a if addend is None else a + addend), z


def widen(residual: Optional[Tensor], channels: int) -> Optional[Tensor]:
    """A residual of fewer channels than the conv output, zero-extended to `channels`."""
    if residual is None or residual.shape[1] == channels:
        return residual
    return F.pad(residual, (0, 0, 0, 0, 0, channels - residual.shape[1]))


def conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: Sequence[int],
           padding: Sequence[int], dilation: Sequence[int], groups: int,
           pre_weight, pre_bias, pre_mean, pre_invstd, pre_act: str, pre_training: bool,
           addend: Optional[Tensor], residual: Optional[Tensor], act: str) -> Tensor:
    a, _ = prologue(x, addend, pre_weight, pre_bias, pre_mean, pre_invstd, pre_act)
    y = F.conv2d(a, weight, bias, stride, padding, dilation, groups)
    if residual is None and act == "identity":
        return y
    return bn_act(y, None, None, None, None, widen(residual, y.shape[1]), act)


def conv2d_backward(grad: Tensor, out: Optional[Tensor], x: Tensor, weight: Tensor, bias: Optional[Tensor],
                    stride, padding, dilation, groups: int, pre_weight, pre_bias, pre_mean,
                    pre_invstd, pre_act: str, pre_training: bool, addend, residual, act: str,
                    needs: Sequence[bool]):
    """Grads of (x, weight, bias, pre_weight, pre_bias, addend, residual), None where not needed;
    the residual's covers every output channel (the caller keeps those it was added to).
    The prologue's activation is recomputed from x; the epilogue's mask comes from `out`."""
    nx, nw, nb, npw, npb, nadd, nres = needs
    a, z = prologue(x, addend, pre_weight, pre_bias, pre_mean, pre_invstd, pre_act)
    if act == "silu":  # silu' needs the conv output: recompute it (only eval-mode BN with grads)
        zc = F.conv2d(a, weight, bias, stride, padding, dilation, groups)
        zc = bn_pre(zc, None, None, None, None, widen(residual, zc.shape[1]))
        gz = act_backward(_acc(grad), act, z=zc)
    else:
        gz = act_backward(_acc(grad), act, y=out)
    gres = gz.to(grad.dtype if residual is None else residual.dtype) if nres else None
    gb = gz.sum(_reduce_dims(gz)).to(bias.dtype) if nb else None
    gz = gz.to(grad.dtype)
    need_ga = nx or npw or npb or nadd
    ga, gw, _ = torch.ops.aten.convolution_backward(
        gz, a, weight, None, stride, padding, dilation, False, [0, 0], groups, [need_ga, nw, False])
    gx = gpw = gpb = None
    if need_ga:
        if z is None:
            gx = ga
        else:
            gpz = act_backward(_acc(ga), pre_act, z=z)
            gx, gpw, gpb = bn_backward(gpz, x, pre_weight, pre_mean, pre_invstd, pre_training,
                                       nx, npw, npb)
            gpb = gpb.to(pre_bias.dtype) if gpb is not None else None
    return gx, gw, gb, gpw, gpb, (ga if nadd else None), gres


# ---- squeeze-excitation gate -----------------------------------------------------------------
def se_gate_act(x: Tensor, gate: Tensor, residual: Optional[Tensor], act: str) -> Tensor:
    """act(x * sigmoid(gate) + residual); gate is (N, C) logits."""
    s = torch.sigmoid(_acc(gate)).view(gate.shape[0], gate.shape[1], *([1] * (x.dim() - 2)))
    z = _acc(x) * s
    if residual is not None:
        z = z + residual
    return apply_act(z, act).to(x.dtype)


def se_gate_act_backward(grad: Tensor, x: Tensor, gate: Tensor, residual: Optional[Tensor],
                         out: Tensor, act: str) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    s = torch.sigmoid(_acc(gate)).view(gate.shape[0], gate.shape[1], *([1] * (x.dim() - 2)))
    if act == "silu":
        z = _acc(x) * s + (residual if residual is not None else 0)
        gz = act_backward(_acc(grad), act, z=z)
    else:
        gz = act_backward(_acc(grad), act, y=out)
    gx = (gz * s).to(x.dtype)
    ggate = ((gz * _acc(x)).sum(list(range(2, x.dim()))) * (s * (1 - s)).view(gate.shape)).to(gate.dtype)
    gres = gz.to(residual.dtype) if residual is not None else None
    return gx, ggate, gres


# ---- weighted sum of states, and a convolution of it (DAG connectivity) ----------------------
def mix_sum(states: Tensor, mix: Tensor) -> Tensor:
    """sum_i mix[i] * states[i] over dim 0 of `states` (S, N, C, H, W), accumulated in order in
    the accumulation dtype and rounded once to states' dtype; each slot's layout is kept.
    Differentiable with plain autograd (the DAG block's output uses it as it is)."""
    acc = _acc(states[0]) * mix[0]
    for i in range(1, states.shape[0]):
        acc = acc + _acc(states[i]) * mix[i]
    return acc.to(states.dtype)


def mix_conv2d(states: Tensor, mix: Tensor, weight: Tensor, bias: Optional[Tensor], stride: Sequence[int],
               padding: Sequence[int], dilation: Sequence[int], groups: int, act: str) -> Tensor:
    y = F.conv2d(mix_sum(states, mix), weight, bias, stride, padding, dilation, groups)
    return y if act == "identity" else bn_act(y, None, None, None, None, None, act)


def mix_conv2d_backward(grad: Tensor, out: Optional[Tensor], states: Tensor, mix: Tensor, weight: Tensor,
                        bias: Optional[Tensor], stride, padding, dilation, groups: int, act: str,
                        needs: Sequence[bool]):
    """Grads of (states, mix, weight, bias), None where not needed. The weighted sum is recomputed
    from the states; the epilogue's mask comes from `out` (silu recomputes the conv output)."""
    ns, nm, nw, nb = needs
    a = mix_sum(states, mix)
    if act == "silu":
        gz = act_backward(_acc(grad), act, z=_acc(F.conv2d(a, weight, bias, stride, padding, dilation, groups)))
    else:
        gz = act_backward(_acc(grad), act, y=out)
    gb = gz.sum(_reduce_dims(gz)).to(bias.dtype) if nb else None
    ga, gw, _ = torch.ops.aten.convolution_backward(
        gz.to(grad.dtype), a, weight, None, stride, padding, dilation, False, [0, 0], groups, [ns or nm, nw, False])
    gs = gm = None
    if ns:
        gs = torch.empty_like(states)
        for i in range(states.shape[0]):
            gs[i].copy_(_acc(ga) * mix[i])
    if nm:
        gm = torch.stack([(_acc(ga) * _acc(states[i])).sum() for i in range(states.shape[0])]).to(mix.dtype)
    return gs, gm, (gw if nw else None), gb
