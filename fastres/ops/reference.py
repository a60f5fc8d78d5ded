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


def _acc(t: Tensor) -> Tensor:
    """The tensor in its accumulation dtype (fp32 for half types)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


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


# ---- per-channel affine + residual + activation ----------------------------------------------
def affine_pre(x: Tensor, scale: Optional[Tensor], shift: Optional[Tensor],
               residual: Optional[Tensor]) -> Tensor:
    z = _acc(x)
    if scale is not None:
        z = z * _chan(scale, x)
    if shift is not None:
        z = z + _chan(shift, x)
    if residual is not None:
        z = z + residual
    return z


def affine_act(x: Tensor, scale: Optional[Tensor], shift: Optional[Tensor],
               residual: Optional[Tensor], act: str) -> Tensor:
    return apply_act(affine_pre(x, scale, shift, residual), act).to(x.dtype)


def affine_act_backward(grad: Tensor, x: Tensor, scale: Optional[Tensor], shift: Optional[Tensor],
                        residual: Optional[Tensor], out: Optional[Tensor], act: str,
                        output_mask: Sequence[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Grads of (x, residual, scale, shift); unneeded ones are empty. The activation is recomputed
    from the saved input (silu) or read from the saved output (relu family), never stored."""
    if act == "silu":
        gz = act_backward(_acc(grad), act, z=affine_pre(x, scale, shift, residual))
    else:
        gz = act_backward(_acc(grad), act, y=out)
    empty = grad.new_empty(0)
    gx = (gz * _chan(scale, x) if scale is not None else gz).to(x.dtype) if output_mask[0] else empty
    gres = gz.to(grad.dtype) if output_mask[1] else empty
    dims = _reduce_dims(x)
    gscale = (gz * _acc(x)).sum(dims).to(scale.dtype) if output_mask[2] and scale is not None else empty
    gshift = gz.sum(dims).to(shift.dtype) if output_mask[3] and shift is not None else empty
    return gx, gres, gscale, gshift


# ---- batch statistics ------------------------------------------------------------------------
def batch_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance over every dim but 1, in the accumulation dtype."""
    var, mean = torch.var_mean(_acc(x), dim=_reduce_dims(x), correction=0)
    return mean, var


def batch_stats_backward(gmean: Tensor, gvar: Tensor, x: Tensor, mean: Tensor) -> Tensor:
    n = max(x.numel() // max(x.shape[1], 1), 1)
    xc = _acc(x) - _chan(mean, x)
    return ((_chan(gmean, x) + 2 * _chan(gvar, x) * xc) / n).to(x.dtype)


# ---- convolution with fused prologue and epilogue --------------------------------------------
def prologue(x: Tensor, addend: Optional[Tensor], pre_scale: Optional[Tensor],
             pre_shift: Optional[Tensor], pre_act: str) -> tuple[Tensor, Optional[Tensor]]:
    """The conv input a = pre_act((x + addend) * pre_scale + pre_shift), and the pre-activation
    z it came from (None when the prologue is the identity)."""
    if addend is None and pre_scale is None and pre_shift is None and pre_act == "identity":
        return x, None
    z = affine_pre(x if addend is None else x + addend, pre_scale, pre_shift, None)
    return apply_act(z, pre_act).to(x.dtype), z


def conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: Sequence[int],
           padding: Sequence[int], dilation: Sequence[int], groups: int,
           pre_scale: Optional[Tensor], pre_shift: Optional[Tensor], pre_act: str,
           addend: Optional[Tensor], residual: Optional[Tensor], act: str) -> Tensor:
    a, _ = prologue(x, addend, pre_scale, pre_shift, pre_act)
    y = F.conv2d(a, weight, bias, stride, padding, dilation, groups)
    if residual is None and act == "identity":
        return y
    return affine_act(y, None, None, residual, act)


def conv2d_backward(grad: Tensor, out: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor],
                    stride, padding, dilation, groups: int, pre_scale, pre_shift, pre_act: str,
                    addend, residual, act: str, needs: Sequence[bool]):
    """Grads of (x, weight, bias, pre_scale, pre_shift, addend, residual), None where not needed.
    The prologue's activation is recomputed from x; the epilogue's mask comes from `out`."""
    nx, nw, nb, nps, npb, nadd, nres = needs
    a, z = prologue(x, addend, pre_scale, pre_shift, pre_act)
    if act == "silu":  # silu' needs the conv output: recompute it (only eval-mode BN with grads)
        zc = affine_pre(F.conv2d(a, weight, bias, stride, padding, dilation, groups), None, None, residual)
        gz = act_backward(_acc(grad), act, z=zc)
    else:
        gz = act_backward(_acc(grad), act, y=out)
    gres = gz.to(residual.dtype) if nres else None
    gb = gz.sum(_reduce_dims(gz)).to(bias.dtype) if nb else None
    gz = gz.to(out.dtype)
    need_ga = nx or nps or npb or nadd
    ga, gw, _ = torch.ops.aten.convolution_backward(
        gz, a, weight, None, stride, padding, dilation, False, [0, 0], groups, [need_ga, nw, False])
    gx = gps = gpb = None
    if need_ga:
        if z is None:
            gx = ga
        else:
            gpz = act_backward(_acc(ga), pre_act, z=z)
            src = _acc(x if addend is None else x + addend)
            dims = _reduce_dims(x)
            gps = (gpz * src).sum(dims).to(pre_scale.dtype) if nps else None
            gpb = gpz.sum(dims).to(pre_shift.dtype) if npb else None
            gx = (gpz * _chan(pre_scale, x) if pre_scale is not None else gpz).to(x.dtype)
    gadd = gx if nadd else None
    return (gx if nx else None), gw, gb, gps, gpb, gadd, gres


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
