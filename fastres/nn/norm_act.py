"""BatchNorm + activation as one layer, and the helpers every fastres block uses to call the fused
functional ops with the parameters of its own `nn.Conv2d` / BN submodules (so state_dict keys
stay those of torchvision and timm)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from fastres import functional as F
from fastres.convert import act_name, as_subclass, rule
from fastres.nn import inference as _inference

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_input(module: nn.Module, x: Tensor, channels: int) -> None:
    """A clear error, naming the block, for input a block cannot take."""
    name = type(module).__name__
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name}: expected a 4-D input (N, C={channels}, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] != channels:
        raise ValueError(f"{name}: expected {channels} input channels (N, {channels}, H, W), "
                         f"got shape {tuple(x.shape)}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"{name}: expected a floating-point input (float32, float16, bfloat16 or "
                        f"float64), got {x.dtype}")
    p = next(module.parameters(), None)
    if p is not None:
        if x.device != p.device:
            raise RuntimeError(f"{name}: input is on {x.device} but the block's parameters are on {p.device}")
        if x.dtype != p.dtype:
            raise TypeError(f"{name}: input dtype {x.dtype} does not match the block's parameters "
                            f"({p.dtype}); convert one of them with .to()")


def bn_args(bn: nn.Module) -> tuple[tuple, Optional[object]]:
    """(running_mean, running_var, weight, bias, training, momentum, eps) as `F.batch_norm` takes
    them, resolved exactly like `nn.BatchNorm2d.forward` (incl. num_batches_tracked and
    momentum=None), and the process group for SyncBatchNorm. Accepts BatchNorm2d and its
    subclasses, SyncBatchNorm and torchvision's FrozenBatchNorm2d."""
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm):  # FrozenBatchNorm2d: buffers, no training
        return (bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps), None
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    training = bn.training or (bn.running_mean is None and bn.running_var is None)
    track = not bn.training or bn.track_running_stats
    group = None
    if hasattr(bn, "process_group") and training and dist.is_available() and dist.is_initialized():
        group = bn.process_group or dist.group.WORLD
        if dist.get_world_size(group) == 1:
            group = None
    return ((bn.running_mean if track else None, bn.running_var if track else None, bn.weight, bn.bias,
             training, factor, bn.eps), group)


def _conv_kw(conv: nn.Conv2d) -> dict:
    return dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups)


def conv_bn(x: Tensor, conv: nn.Conv2d, bn: nn.Module, *, act: str = "relu",
            residual: Optional[Tensor] = None, addend: Optional[Tensor] = None, with_means: bool = False,
            backend: Optional[str] = None):
    """act(bn(conv(x + addend)) + residual) through `F.conv2d_bn_act`; in eval inference without
    autograd from the conv's cached BN-folded (and prepacked) weight, see `fastres.nn.inference`.
    `with_means`: (out, the (N, K) means of each sample's channels), as `F.conv2d_bn_act` gives them."""
    args, group = bn_args(bn)
    if not args[4] and _inference.usable(x, conv, bn, residual, addend):
        y = _inference.conv_bn(x, conv, bn, args, act=act, residual=residual, addend=addend, with_means=with_means,
                               backend=backend)
        if y is not None:
            return y
    return F.conv2d_bn_act(x, conv.weight, conv.bias, *args, act=act, residual=residual, addend=addend,
                           process_group=group, with_means=with_means, backend=backend, **_conv_kw(conv))


def bn_conv(x: Tensor, bn: nn.Module, conv: nn.Conv2d, *, pre_act: str = "relu",
            residual: Optional[Tensor] = None, post: Optional[nn.Module] = None, act: str = "identity",
            stats: Optional[F.Stats] = None, with_stats: bool = False, backend: Optional[str] = None):
    """act(post(conv(pre_act(bn(x)))) + residual) through `F.bn_act_conv2d` (the pre-activation
    never stored), with an eval-mode BN `post` of the conv's output folded into its weight; in
    eval inference without autograd with the conv's cached prepacked weight (`fastres.nn.inference`).
    `stats`: x's batch statistics, if known; `with_stats`: (out, out's batch statistics)."""
    args, group = bn_args(bn)
    post_args = bn_args(post)[0] if post is not None else None
    if post_args is not None and post_args[4]:
        raise ValueError("fastres: a BN folded into a conv's output must be in eval mode")
    if not (args[4] or with_stats) and _inference.usable(x, conv, bn, residual,
                                                         *((post.weight, post.bias) if post else ())):
        y = _inference.bn_conv(x, bn, conv, args, pre_act=pre_act, residual=residual, post_args=post_args,
                               act=act, backend=backend)
        if y is not None:
            return y
    weight, bias = conv.weight, conv.bias
    if post_args is not None:
        running_mean, running_var, bn_weight, bn_bias, _, momentum, eps = post_args
        mean, invstd = F.bn_stats(weight, running_mean, running_var, False, momentum, eps)
        weight, bias = F.fold_bn(weight, bias, bn_weight, bn_bias, mean, invstd)
    return F.bn_act_conv2d(x, *args, weight=weight, bias=bias, pre_act=pre_act, residual=residual, act=act,
                           process_group=group, stats=stats, with_stats=with_stats, backend=backend,
                           **_conv_kw(conv))


def bn_prologue(x: Tensor, bn: nn.Module, *, stats: Optional[F.Stats] = None,
                backend: Optional[str] = None) -> dict:
    """`F.bn_prologue` with the arguments of `bn` (its statistics of `x` taken once, or `stats`)."""
    args, group = bn_args(bn)
    return F.bn_prologue(x, *args, process_group=group, stats=stats, backend=backend)


def pool_kind(m: Optional[nn.Module]) -> Optional[str]:
    """"max" / "avg" for a plain pooling layer `F.bn_act_pool2d` computes the same way (floor mode,
    no dilation or indices, averages counting the padding), else None."""
    if type(m) is nn.MaxPool2d and m.dilation in (1, (1, 1)) and not m.ceil_mode and not m.return_indices:
        return "max"
    if type(m) is nn.AvgPool2d and not m.ceil_mode and m.count_include_pad and m.divisor_override is None:
        return "avg"
    return None


def bn_act_pool(x: Tensor, pre: Optional[dict], pool: nn.Module, *, backend: Optional[str] = None) -> Tensor:
    """pool(relu(BN(x))) for a `pool_kind` layer, the ReLU recomputed in backward; pool(x) alone
    (one pass, no argmax kept) without `pre`."""
    return F.bn_act_pool2d(x, pre, pool_kind(pool), pool.kernel_size, pool.stride, pool.padding,
                           act="relu" if pre else "identity", backend=backend)


def norm_act(x: Tensor, bn: nn.Module, *, act: str = "relu", residual: Optional[Tensor] = None,
             stats: Optional[F.Stats] = None, backend: Optional[str] = None) -> Tensor:
    """act(bn(x) + residual) through `F.bn_act` (`stats`: x's batch statistics, if known)."""
    args, group = bn_args(bn)
    return F.bn_act(x, *args, act=act, residual=residual, process_group=group, stats=stats, backend=backend)


def conv(x: Tensor, conv: nn.Conv2d, *, act: str = "identity", residual: Optional[Tensor] = None,
         pre: Optional[dict] = None, addend: Optional[Tensor] = None, weight: Optional[Tensor] = None,
         bias: bool = True, with_stats: bool = False, backend: Optional[str] = None):
    """act(conv(relu(BN(x)) + addend) + bias + residual) through `F.conv2d`, the BN-ReLU applied as
    the conv loads x when `pre` (a `bn_prologue` of x) is given; `weight` (a slice of conv.weight)
    and `bias=False` let a conv run as a sum of convs over slices of its input channels. In eval
    inference without autograd a plain conv runs from its cached (prepacked) weight.
    `with_stats`: (out, out's batch statistics), for the training BN that follows."""
    if pre is None and weight is None and bias and not with_stats and _inference.usable(x, conv, None, residual,
                                                                                        addend):
        y = _inference.conv_bn(x, conv, None, None, act=act, residual=residual, addend=addend, backend=backend)
        if y is not None:
            return y
    prologue = dict(pre, pre_act="relu") if pre else {}
    return F.conv2d(x, conv.weight if weight is None else weight, conv.bias if bias else None, act=act,
                    residual=residual, addend=addend, with_stats=with_stats, backend=backend, **prologue,
                    **_conv_kw(conv))


def shortcut(downsample: Optional[nn.Module], x: Tensor, backend: Optional[str] = None) -> Tensor:
    """The block's shortcut: identity, a fused conv-BN projection (after the average pooling or
    Identity of timm's `avg_down` "d" variants, when there), or any other module as it is."""
    if downsample is None:
        return x
    layers = list(downsample) if isinstance(downsample, nn.Sequential) else []
    pool = layers.pop(0) if len(layers) == 3 and isinstance(layers[0], (nn.Identity, nn.AvgPool2d)) else None
    if len(layers) == 2 and isinstance(layers[0], nn.Conv2d) and is_bn(layers[1]):
        if isinstance(pool, nn.AvgPool2d):
            x = pool(x)
        y = conv_bn(x, layers[0], layers[1], act="identity", backend=backend)
        # a fresh tensor only the block's last conv reads: that conv may accumulate into it
        return _inference.offer_scratch(y)
    return downsample(x)


def is_bn(m: nn.Module) -> bool:
    """A BatchNorm2d-like layer this module family can fuse (BatchNorm2d, SyncBatchNorm, Frozen)."""
    return isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm)) or type(m).__name__ == "FrozenBatchNorm2d"


class BatchNormAct2d(nn.BatchNorm2d):
    """`nn.BatchNorm2d` followed by an activation, in one pass; the keys of `nn.BatchNorm2d`."""
    backend: Optional[str] = None

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, *, act: str = "relu",
                 backend: Optional[str] = None, device=None, dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.act, self.backend = act, backend

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        check_input(self, x, self.num_features)
        return norm_act(x, self, act=self.act, residual=residual, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, act={self.act}"


@rule("timm.layers.norm_act.BatchNormAct2d")
def _from_timm(m: nn.Module):
    act = act_name(m.act)
    if act is None or not isinstance(m.drop, nn.Identity):
        return f"activation {type(m.act).__name__} or dropout is not fused"
    return as_subclass(m, BatchNormAct2d, act=act, backend=None)
