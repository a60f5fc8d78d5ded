"""The fused functional API every fastres module calls.

BN arguments follow `torch.nn.functional.batch_norm`: (running_mean, running_var, weight, bias,
training, momentum, eps). With `training=True` the batch statistics normalise the input and the
running statistics (when given) are updated in place under no_grad, exactly as ATen's batch norm
does; `momentum` is the already-resolved exponential average factor. Names say what is fused.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from fastres import backend as _backend
from fastres.ops import ACTS  # noqa: F401

_ops = torch.ops.fastres


def _b(backend: Optional[str]) -> str:
    return backend or _backend.get_backend()


def _pair(v) -> list[int]:
    return [v, v] if isinstance(v, int) else list(v)


def _sync_stats(mean: Tensor, var: Tensor, count: int, group) -> tuple[Tensor, Tensor, int]:
    """Combine per-rank (mean, biased var, count) into the global ones; differentiable, float64."""
    from torch.distributed.nn.functional import all_reduce
    n = torch.tensor(float(count), dtype=torch.float64, device=mean.device)
    m64, v64 = mean.double(), var.double()
    packed = torch.cat([n.view(1), m64 * n, (v64 + m64 * m64) * n])
    total = all_reduce(packed, group=group)
    c = mean.numel()
    n_all = total[0]
    g_mean = total[1:1 + c] / n_all
    g_var = total[1 + c:] / n_all - g_mean * g_mean
    return g_mean.to(mean.dtype), g_var.clamp_min(0).to(var.dtype), int(n_all.item())


def bn_scale_shift(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                   weight: Optional[Tensor], bias: Optional[Tensor], training: bool,
                   momentum: float, eps: float, *, process_group=None,
                   backend: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """Per-channel (scale, shift) with BN(x) == x * scale + shift; fp32 for half inputs.

    With `training`, statistics come from `x` (reduced across `process_group` when given, as
    SyncBatchNorm does) and the running buffers are updated."""
    if training:
        mean, var = _ops.batch_stats(x, _b(backend))
        count = x.numel() // max(x.shape[1], 1)
        if process_group is not None:
            mean, var, count = _sync_stats(mean, var, count, process_group)
        if count <= 1 and x.numel() > 0:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {list(x.shape)}")
        if running_mean is not None and count > 0:
            with torch.no_grad():
                # the same expression as ATen's update, for bit-identical running stats
                unbiased = var.detach() * (count / (count - 1))
                running_mean.copy_(momentum * mean.detach() + (1 - momentum) * running_mean)
                running_var.copy_(momentum * unbiased + (1 - momentum) * running_var)
    else:
        if running_mean is None:
            raise ValueError("fastres: BN in eval mode needs running statistics (track_running_stats=True)")
        mean, var = running_mean, running_var
    acc = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    invstd = torch.rsqrt(var.to(acc) + eps)
    scale = invstd if weight is None else weight.to(acc) * invstd
    shift = -mean.to(acc) * scale
    if bias is not None:
        shift = shift + bias.to(acc)
    return scale, shift


# ---- elementwise -----------------------------------------------------------------------------
def affine_act(x: Tensor, scale: Optional[Tensor], shift: Optional[Tensor], *,
               residual: Optional[Tensor] = None, act: str = "relu",
               backend: Optional[str] = None) -> Tensor:
    return _ops.affine_act(x, scale, shift, residual, act, _b(backend))


def bn_act(x: Tensor, running_mean, running_var, weight=None, bias=None, training: bool = False,
           momentum: float = 0.1, eps: float = 1e-5, *, act: str = "relu",
           residual: Optional[Tensor] = None, process_group=None,
           backend: Optional[str] = None) -> Tensor:
    """act(BN(x) + residual) in one pass over x."""
    scale, shift = bn_scale_shift(x, running_mean, running_var, weight, bias, training, momentum,
                                  eps, process_group=process_group, backend=backend)
    return _ops.affine_act(x, scale, shift, residual, act, _b(backend))


def add_act(x: Tensor, residual: Tensor, *, act: str = "relu", backend: Optional[str] = None) -> Tensor:
    """act(x + residual)."""
    return _ops.affine_act(x, None, None, residual, act, _b(backend))


def se_gate_act(x: Tensor, gate: Tensor, *, residual: Optional[Tensor] = None, act: str = "identity",
                backend: Optional[str] = None) -> Tensor:
    """act(x * sigmoid(gate) + residual), gate the (N, C) SE logits."""
    return _ops.se_gate_act(x, gate.reshape(x.shape[0], x.shape[1]), residual, act, _b(backend))


# ---- convolutions ----------------------------------------------------------------------------
def conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride=1, padding=0,
           dilation=1, groups: int = 1, *, pre_scale: Optional[Tensor] = None,
           pre_shift: Optional[Tensor] = None, pre_act: str = "identity",
           addend: Optional[Tensor] = None, residual: Optional[Tensor] = None,
           act: str = "identity", backend: Optional[str] = None) -> Tensor:
    """act(conv(pre_act((x + addend) * pre_scale + pre_shift)) + bias + residual)."""
    return _ops.conv2d(x, weight, bias, _pair(stride), _pair(padding), _pair(dilation), groups,
                       pre_scale, pre_shift, pre_act, addend, residual, act, _b(backend))


def fold_bn(weight: Tensor, bias: Optional[Tensor], scale: Tensor, shift: Tensor) -> tuple[Tensor, Tensor]:
    """Conv weight and bias with the per-output-channel affine (scale, shift) folded in.
    Differentiable, so eval-mode BN with trainable conv weights trains correctly."""
    w = (weight.to(scale.dtype) * scale.view(-1, *([1] * (weight.dim() - 1)))).to(weight.dtype)
    b = shift if bias is None else shift + bias.to(scale.dtype) * scale
    return w, b.to(weight.dtype)


def conv2d_bn_act(x: Tensor, weight: Tensor, bias: Optional[Tensor], running_mean, running_var,
                  bn_weight=None, bn_bias=None, training: bool = False, momentum: float = 0.1,
                  eps: float = 1e-5, *, stride=1, padding=0, dilation=1, groups: int = 1,
                  act: str = "relu", residual: Optional[Tensor] = None, addend: Optional[Tensor] = None,
                  process_group=None, backend: Optional[str] = None) -> Tensor:
    """act(BN(conv(x + addend)) + residual). In eval BN is folded into the conv; in training the
    batch statistics of the conv output are taken and BN-add-act runs as one elementwise pass."""
    if not training:
        scale, shift = bn_scale_shift(x, running_mean, running_var, bn_weight, bn_bias, False, momentum, eps)
        w, b = fold_bn(weight, bias, scale, shift)
        return conv2d(x, w, b, stride, padding, dilation, groups, addend=addend, residual=residual,
                      act=act, backend=backend)
    y = conv2d(x, weight, bias, stride, padding, dilation, groups, addend=addend, backend=backend)
    return bn_act(y, running_mean, running_var, bn_weight, bn_bias, True, momentum, eps, act=act,
                  residual=residual, process_group=process_group, backend=backend)


def conv2d_bn_add_act(x: Tensor, weight: Tensor, bias: Optional[Tensor], running_mean, running_var,
                      bn_weight, bn_bias, training: bool, momentum: float, eps: float,
                      residual: Tensor, **kw) -> Tensor:
    """act(BN(conv(x)) + residual): the last conv of a residual block."""
    return conv2d_bn_act(x, weight, bias, running_mean, running_var, bn_weight, bn_bias, training,
                         momentum, eps, residual=residual, **kw)


def bn_act_conv2d(x: Tensor, running_mean, running_var, bn_weight=None, bn_bias=None,
                  training: bool = False, momentum: float = 0.1, eps: float = 1e-5, *,
                  weight: Tensor, bias: Optional[Tensor] = None, stride=1, padding=0, dilation=1,
                  groups: int = 1, pre_act: str = "relu", residual: Optional[Tensor] = None,
                  act: str = "identity", process_group=None, backend: Optional[str] = None) -> Tensor:
    """conv(act(BN(x))) with the BN-act applied as the conv loads its input; the activated tensor
    is never stored (the backward recomputes it)."""
    scale, shift = bn_scale_shift(x, running_mean, running_var, bn_weight, bn_bias, training,
                                  momentum, eps, process_group=process_group, backend=backend)
    return conv2d(x, weight, bias, stride, padding, dilation, groups, pre_scale=scale,
                  pre_shift=shift, pre_act=pre_act, residual=residual, act=act, backend=backend)
