"""The fused functional API every fastres module calls.

BN arguments follow `torch.nn.functional.batch_norm`: (running_mean, running_var, weight, bias,
training, momentum, eps). With `training=True` the batch statistics normalise the input and the
running statistics (when given) are updated in place under no_grad, exactly as ATen's batch norm
does; `momentum` is the already-resolved exponential average factor. Names say what is fused.

Statistics: a conv asked `with_stats=True` also returns its output's batch (mean, biased
variance), from the kernel's epilogue on Triton; passing them as `stats=` to the BN of that output
(`bn_act`, `bn_prologue`, `bn_act_conv2d`) spares it a pass over the tensor.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastres import backend as _backend
from fastres.ops import ACTS  # noqa: F401
from fastres.ops import conv as _conv_ops
from fastres.ops import reference as _reference

_ops = torch.ops.fastres


def _b(backend: Optional[str]) -> str:
    return backend or _backend.get_backend()


def _pair(v) -> list[int]:
    return [v, v] if isinstance(v, int) else list(v)


Stats = tuple[Tensor, Tensor]   # per-channel batch (mean, biased variance) of a tensor


def bn_stats(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor], training: bool,
             momentum: float, eps: float, *, stats: Optional[Stats] = None,
             backend: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """(mean, invstd) that normalise `x`: its batch statistics when `training` (`stats` when
    given, else taken here; the running buffers, when given, updated exactly as ATen does), else
    the running ones."""
    if training:
        mean, var = stats if stats is not None else _ops.batch_stats(x, _b(backend))
        count = x.numel() // max(x.shape[1], 1)
        if count == 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {list(x.shape)}")
        if running_mean is not None and count > 0:
            # ATen's update, momentum * batch + (1 - momentum) * running, with the unbiased
            # variance's count / (count - 1) folded into its factor: two in-place ops a buffer
            with torch.no_grad():
                running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
                running_var.mul_(1 - momentum).add_(var, alpha=momentum * count / (count - 1))
        return mean.detach(), torch.rsqrt(var.detach() + eps)
    if running_mean is None:
        raise ValueError("fastres: BN in eval mode needs running statistics (track_running_stats=True)")
    acc = torch.float32 if running_var.dtype in (torch.float16, torch.bfloat16) else running_var.dtype
    return running_mean, torch.rsqrt(running_var.to(acc) + eps)


def _sync_scale_shift(x: Tensor, weight, bias, eps: float, running_mean, running_var, momentum: float,
                      group, backend: Optional[str]) -> tuple[Tensor, Tensor]:
    """SyncBatchNorm: global statistics from every rank's (count, sum, sum of squares), reduced in
    float64 through a differentiable all_reduce, returned as a per-channel (scale, shift) whose
    autograd graph carries the cross-rank gradient."""
    from torch.distributed.nn.functional import all_reduce
    mean, var = _ops.batch_stats(x, _b(backend))   # differentiable, unlike a conv's `stats`
    n = torch.full((1,), float(x.numel() // max(x.shape[1], 1)), dtype=torch.float64, device=x.device)
    m64 = mean.double()
    total = all_reduce(torch.cat([n, m64 * n, (var.double() + m64 * m64) * n]), group=group)
    c = mean.numel()
    count = total[0]
    g_mean = total[1:1 + c] / count
    g_var = (total[1 + c:] / count - g_mean * g_mean).clamp_min(0)
    if running_mean is not None and count.item() > 1:
        with torch.no_grad():
            unbiased = g_var * (count / (count - 1))
            running_mean.copy_(momentum * g_mean + (1 - momentum) * running_mean)
            running_var.copy_(momentum * unbiased + (1 - momentum) * running_var)
    acc = mean.dtype
    scale = torch.rsqrt(g_var + eps).to(acc)
    if weight is not None:
        scale = scale * weight.to(acc)
    shift = -g_mean.to(acc) * scale
    return scale, (shift if bias is None else shift + bias.to(acc))


def _bn(x: Tensor, running_mean, running_var, weight, bias, training: bool, momentum: float,
        eps: float, process_group, backend: Optional[str], stats: Optional[Stats] = None) -> dict:
    """The BN arguments of the bn_act / conv2d-prologue ops for this call. SyncBatchNorm takes its
    statistics itself: their gradient crosses ranks through its scale and shift."""
    if training and process_group is not None:
        scale, shift = _sync_scale_shift(x, weight, bias, eps, running_mean, running_var, momentum,
                                         process_group, backend)
        return dict(weight=scale, bias=shift, mean=None, invstd=None, training=False)
    mean, invstd = bn_stats(x, running_mean, running_var, training, momentum, eps, stats=stats, backend=backend)
    return dict(weight=weight, bias=bias, mean=mean, invstd=invstd, training=training)


# ---- elementwise -----------------------------------------------------------------------------
def affine_act(x: Tensor, scale: Optional[Tensor], shift: Optional[Tensor], *,
               residual: Optional[Tensor] = None, act: str = "relu",
               backend: Optional[str] = None) -> Tensor:
    """act(x * scale + shift + residual), per channel."""
    return _ops.bn_act(x, scale, shift, None, None, residual, act, False, _b(backend))


def bn_act(x: Tensor, running_mean, running_var, weight=None, bias=None, training: bool = False,
           momentum: float = 0.1, eps: float = 1e-5, *, act: str = "relu",
           residual: Optional[Tensor] = None, process_group=None, stats: Optional[Stats] = None,
           backend: Optional[str] = None) -> Tensor:
    """act(BN(x) + residual) in one pass over x (`stats`: x's batch statistics, if known)."""
    bn = _bn(x, running_mean, running_var, weight, bias, training, momentum, eps, process_group, backend, stats)
    return _ops.bn_act(x, bn["weight"], bn["bias"], bn["mean"], bn["invstd"], residual, act,
                       bn["training"], _b(backend))


def add_act(x: Tensor, residual: Tensor, *, act: str = "relu", backend: Optional[str] = None) -> Tensor:
    """act(x + residual)."""
    return _ops.bn_act(x, None, None, None, None, residual, act, False, _b(backend))


def split_add(x: Tensor, y: Tensor, slot: Tensor, *, backend: Optional[str] = None) -> Tensor:
    """x + y, writing y into `slot` on the way (Res2Net's split add; no autograd: slot is written
    in place, see fastres.ops.slices)."""
    return _ops.split_add(x, y, slot, _b(backend))


def se_gate_act(x: Tensor, gate: Tensor, *, residual: Optional[Tensor] = None, act: str = "identity",
                backend: Optional[str] = None) -> Tensor:
    """act(x * sigmoid(gate) + residual), gate the (N, C) SE logits."""
    return _ops.se_gate_act(x, gate.reshape(x.shape[0], x.shape[1]), residual, act, _b(backend))


# ---- convolutions ----------------------------------------------------------------------------
def conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride=1, padding=0,
           dilation=1, groups: int = 1, *, pre_weight: Optional[Tensor] = None,
           pre_bias: Optional[Tensor] = None, pre_mean: Optional[Tensor] = None,
           pre_invstd: Optional[Tensor] = None, pre_act: str = "identity", pre_training: bool = False,
           addend: Optional[Tensor] = None, residual: Optional[Tensor] = None,
           act: str = "identity", with_stats: bool = False, with_means: bool = False,
           backend: Optional[str] = None):
    """act(conv(pre_act(BN(x)) + addend) + bias + residual); see fastres.ops.conv. With
    `with_stats`: (out, its batch statistics), for the BN that follows; with `with_means`:
    (out, the (N, K) means of each sample's channels), for the squeeze-excitation that follows."""
    if with_stats and with_means:
        raise ValueError("fastres.conv2d: with_stats and with_means cannot both be set")
    op = _ops.conv2d_stats if with_stats else _ops.conv2d_means if with_means else _ops.conv2d
    out = op(x, weight, bias, _pair(stride), _pair(padding), _pair(dilation), groups, pre_weight, pre_bias,
             pre_mean, pre_invstd, pre_act, pre_training, addend, residual, act, _b(backend))
    return (out[0], out[1:]) if with_stats else (out[0], out[1]) if with_means else out


def fold_bn(weight: Tensor, bias: Optional[Tensor], bn_weight, bn_bias, mean: Tensor,
            invstd: Tensor) -> tuple[Tensor, Tensor]:
    """Conv weight and bias with an eval-mode BN of its output folded in. Differentiable, so
    eval-mode BN with trainable conv/BN parameters trains correctly."""
    acc = invstd.dtype
    scale = invstd if bn_weight is None else bn_weight.to(acc) * invstd
    shift = -mean.to(acc) * scale
    if bn_bias is not None:
        shift = shift + bn_bias.to(acc)
    w = (weight.to(acc) * scale.view(-1, *([1] * (weight.dim() - 1)))).to(weight.dtype)
    b = shift if bias is None else shift + bias.to(acc) * scale
    return w, b.to(weight.dtype)


def conv2d_bn_act(x: Tensor, weight: Tensor, bias: Optional[Tensor], running_mean, running_var,
                  bn_weight=None, bn_bias=None, training: bool = False, momentum: float = 0.1,
                  eps: float = 1e-5, *, stride=1, padding=0, dilation=1, groups: int = 1,
                  act: str = "relu", residual: Optional[Tensor] = None, addend: Optional[Tensor] = None,
                  process_group=None, with_means: bool = False, backend: Optional[str] = None):
    """act(BN(conv(x + addend)) + residual). In eval BN is folded into the conv; in training the
    batch statistics of the conv output are taken and BN-add-act runs as one elementwise pass.
    A residual of fewer channels than the conv's output goes onto its first channels: in eval in
    the conv's epilogue, in training zero-extended for the BN pass. `with_means`: (out, the (N, K)
    means of each sample's channels of out, fp32 for half types), in eval from the conv's epilogue."""
    if not training:
        mean, invstd = bn_stats(x, running_mean, running_var, False, momentum, eps)
        w, b = fold_bn(weight, bias, bn_weight, bn_bias, mean, invstd)
        return conv2d(x, w, b, stride, padding, dilation, groups, addend=addend, residual=residual,
                      act=act, with_means=with_means, backend=backend)
    y, stats = conv2d(x, weight, bias, stride, padding, dilation, groups, addend=addend, with_stats=True,
                      backend=backend)
    out = bn_act(y, running_mean, running_var, bn_weight, bn_bias, True, momentum, eps, act=act,
                 residual=_reference.widen(residual, y.shape[1]), process_group=process_group, stats=stats,
                 backend=backend)
    # in training the BN pass comes after the conv: the means are its output's, a pass of their own
    return (out, _conv_ops.sample_means(out)) if with_means else out


def conv2d_bn_add_act(x: Tensor, weight: Tensor, bias: Optional[Tensor], running_mean, running_var,
                      bn_weight, bn_bias, training: bool, momentum: float, eps: float,
                      residual: Tensor, **kw) -> Tensor:
    """act(BN(conv(x)) + residual): the last conv of a residual block."""
    return conv2d_bn_act(x, weight, bias, running_mean, running_var, bn_weight, bn_bias, training,
                         momentum, eps, residual=residual, **kw)


def bn_prologue(x: Tensor, running_mean, running_var, bn_weight=None, bn_bias=None,
                training: bool = False, momentum: float = 0.1, eps: float = 1e-5, *,
                process_group=None, stats: Optional[Stats] = None, backend: Optional[str] = None) -> dict:
    """The `pre_*` keyword arguments of `conv2d` that apply this BN to `x` as the conv loads it.
    Batch statistics are taken (or `stats` used) and running statistics updated here, once: one BN
    output can feed several consumers (`channels` gives a consumer its slice, `bn_act_from`
    materialises it)."""
    bn = _bn(x, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps, process_group, backend,
             stats)
    return dict(pre_weight=bn["weight"], pre_bias=bn["bias"], pre_mean=bn["mean"], pre_invstd=bn["invstd"],
                pre_training=bn["training"])


def split_channels(pre: dict, size: int, count: int) -> list[dict]:
    """The prologue arguments of each of `count` consecutive runs of `size` channels of a
    `bn_prologue`, every per-channel tensor split once: views whose gradients autograd joins with
    one cat, where a slice each would zero-fill a full-size gradient per slice and add them up."""
    split = {k: torch.split(v, size) for k, v in pre.items() if isinstance(v, Tensor)}
    return [{k: split[k][i] if k in split else v for k, v in pre.items()} for i in range(count)]


def cat_conv2d_stats(parts: list[Tensor], pres: list[Optional[dict]], weight: Tensor, bias: Optional[Tensor] = None,
                     stride=1, padding=0, dilation=1, groups: int = 1, *, pre_act: str = "relu",
                     backend: Optional[str] = None) -> tuple[Tensor, Stats]:
    """conv(cat_i(pre_act(BN_i(parts[i])))) + bias and its batch statistics, pres[i] a `bn_prologue`
    of parts[i] (its `split_channels` share) or None; the concatenation is formed for the forward
    and again in the backward, never kept (see fastres.ops.cat_conv)."""
    def joined(key: str, fill: float) -> Optional[Tensor]:
        """The parts' vectors `key` end to end, `fill` for a part without one."""
        like = next((p[key] for p in pres if p is not None and p[key] is not None), None)
        if like is None:
            return None
        return torch.cat([p[key] if p is not None and p[key] is not None
                          else torch.full((x.shape[1],), fill, dtype=like.dtype, device=like.device)
                          for x, p in zip(parts, pres)])
    y, mean, var = _ops.cat_conv2d_stats(
        parts, joined("pre_weight", 1.0), joined("pre_bias", 0.0), joined("pre_mean", 0.0),
        joined("pre_invstd", 1.0), pre_act, [p is not None for p in pres],
        [p is not None and p["pre_training"] for p in pres], weight, bias, _pair(stride), _pair(padding),
        _pair(dilation), groups, _b(backend))
    return y, (mean, var)


def bn_act_from(x: Tensor, pre: dict, *, act: str = "relu", residual: Optional[Tensor] = None,
                backend: Optional[str] = None) -> Tensor:
    """act(BN(x) + residual) with the BN arguments of a `bn_prologue` of `x`."""
    return _ops.bn_act(x, pre["pre_weight"], pre["pre_bias"], pre["pre_mean"], pre["pre_invstd"], residual,
                       act, pre["pre_training"], _b(backend))


def bn_act_pool2d(x: Tensor, pre: Optional[dict], kind: str, kernel_size, stride=None, padding=0, *,
                  act: str = "relu", backend: Optional[str] = None) -> Tensor:
    """pool(act(BN(x))), kind "max" or "avg", with the BN arguments of a `bn_prologue` of `x`
    (None: no BN); the backward recomputes the activation instead of storing it."""
    pre = pre or dict(pre_weight=None, pre_bias=None, pre_mean=None, pre_invstd=None, pre_training=False)
    return _ops.bn_act_pool2d(x, pre["pre_weight"], pre["pre_bias"], pre["pre_mean"], pre["pre_invstd"], act,
                              pre["pre_training"], kind, _pair(kernel_size),
                              _pair(kernel_size if stride is None else stride), _pair(padding), _b(backend))


def bn_act_conv2d(x: Tensor, running_mean, running_var, bn_weight=None, bn_bias=None,
                  training: bool = False, momentum: float = 0.1, eps: float = 1e-5, *,
                  weight: Tensor, bias: Optional[Tensor] = None, stride=1, padding=0, dilation=1,
                  groups: int = 1, pre_act: str = "relu", residual: Optional[Tensor] = None,
                  act: str = "identity", process_group=None, stats: Optional[Stats] = None,
                  with_stats: bool = False, backend: Optional[str] = None):
    """conv(pre_act(BN(x))) + residual with the BN-act applied as the conv loads its input; the
    activated tensor is never stored (the backward recomputes it). `stats`: x's batch statistics,
    if known; `with_stats`: also return the output's."""
    pre = bn_prologue(x, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps,
                      process_group=process_group, stats=stats, backend=backend)
    return conv2d(x, weight, bias, stride, padding, dilation, groups, pre_act=pre_act, residual=residual,
                  act=act, with_stats=with_stats, backend=backend, **pre)


# ---- DAG connectivity ------------------------------------------------------------------------
def mix_conv2d(states: Tensor, mix: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride=1,
               padding=0, dilation=1, groups: int = 1, *, act: str = "identity",
               backend: Optional[str] = None) -> Tensor:
    """act(conv(sum_i mix[i] * states[i]) + bias) for states (S, N, C, H, W), the weighted sum
    formed as the conv loads its input; see fastres.ops.mix."""
    return _ops.mix_conv2d(states, mix, weight, bias, _pair(stride), _pair(padding), _pair(dilation), groups,
                           act, _b(backend))
