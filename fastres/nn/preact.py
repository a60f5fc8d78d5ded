"""The five residual units of He et al. 2016, "Identity Mappings in Deep Residual Networks",
as basic (two 3x3 convs) and bottleneck (1x1, 3x3, 1x1) blocks, chosen with `variant`:

    a  original              conv-BN-ReLU ... conv-BN, add, ReLU
    b  BN after addition     conv-BN-ReLU ... conv, add, BN, ReLU
    c  ReLU before addition  conv-BN-ReLU ... conv-BN-ReLU, add
    d  ReLU-only pre-act     ReLU-conv-BN-ReLU ... conv-BN, add
    e  full pre-activation   BN-ReLU-conv ... BN-ReLU-conv, add          (default)

The 3x3 conv carries the stride and `groups`. The identity shortcut always carries the raw input.
When the shape changes, the shortcut is a 1x1 projection with the stride: conv-BN on x (a, b, c),
conv-BN on ReLU(x) (d), or a bare conv on BN-ReLU(x), the pre-activated input (e, as timm's
resnetv2).

Keys: a-d use torchvision's names (`conv1, bn1, ...`, `bn_i` after `conv_i`; in b the last BN
normalises the sum) and `downsample.0/.1`; e uses timm's resnetv2 names (`norm1, conv1, ...`,
`downsample.conv`), so `PreActBasic` / `PreActBottleneck` state dicts load strictly.

Fusion: in e every BN-ReLU runs in its conv's input load and is never stored (except the first one
of a projecting block, which feeds two convs and is stored once), and the last conv adds the
shortcut in its epilogue; in a-d each conv runs with its BN folded (eval) or fused with
BN-add-ReLU (training), the add and ReLU in the last conv's epilogue where the unit allows it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as TF
from torch import Tensor

from fastres.convert import act_name, adopt, rule
from fastres.nn import inference as _inference
from fastres.nn.norm_act import bn_conv, check_input, conv, conv_bn, is_bn, norm_act, shortcut

VARIANTS = ("a", "b", "c", "d", "e")


@dataclass(frozen=True)
class _Unit:
    pre_relu: bool  # ReLU on the input, feeding the branch and the projection (d)
    tail: str       # how the last conv meets the shortcut


_UNITS = {
    "a": _Unit(False, "bn_add_relu"),
    "b": _Unit(False, "add_bn_relu"),
    "c": _Unit(False, "bn_relu_add"),
    "d": _Unit(True, "bn_add"),
}


def _check_variant(variant: str) -> str:
    if variant not in VARIANTS:
        raise ValueError(f"fastres: unknown pre-activation variant {variant!r}; expected one of {VARIANTS}")
    return variant


def preact_forward(x: Tensor, norms: Sequence[nn.Module], convs: Sequence[nn.Conv2d],
                   proj: Optional[nn.Conv2d], *, dropout: float = 0.0, training: bool = False,
                   backend: Optional[str] = None) -> Tensor:
    """convs[-1](relu(norms[-1](... convs[0](relu(norms[0](x)))))) + shortcut, the shortcut being
    x, or proj(relu(norms[0](x))). Dropout (p=`dropout`) follows every conv but the last.

    Training: each BN-ReLU runs in its conv's input load, except where it feeds a projection as
    well: that one is stored once, so its batch statistics (and running-stat update) are taken
    once. Eval: every BN-ReLU after the first is folded into the previous conv (weight and
    epilogue; that conv's output feeds nothing else), so only the first one is a prologue."""
    xa = None
    if proj is None:
        sc = x
    else:
        xa = norm_act(x, norms[0], act="relu", backend=backend)
        sc = _inference.offer_scratch(conv(xa, proj, backend=backend))  # the last conv may accumulate into it
    if not any(n.training for n in norms[1:]) and not (dropout > 0.0 and training):
        if xa is None:
            out = bn_conv(x, norms[0], convs[0], pre_act="relu", post=norms[1], act="relu", backend=backend)
        else:
            out = conv_bn(xa, convs[0], norms[1], act="relu", backend=backend)
        for conv_i, norm_next in zip(convs[1:-1], norms[2:]):
            out = conv_bn(out, conv_i, norm_next, act="relu", backend=backend)
        return conv(out, convs[-1], residual=sc, backend=backend)
    drop = dropout > 0.0 and training   # the statistics of a conv's output no longer fit after dropout
    if xa is not None:
        out, stats = conv(xa, convs[0], with_stats=True, backend=backend)
    else:
        out, stats = bn_conv(x, norms[0], convs[0], pre_act="relu", with_stats=True, backend=backend)
    for i in range(1, len(convs)):
        if drop:
            out, stats = TF.dropout(out, dropout, training=True), None
        last = i == len(convs) - 1
        out = bn_conv(out, norms[i], convs[i], pre_act="relu", stats=stats, with_stats=not last, backend=backend,
                      residual=sc if last else None)
        if not last:
            out, stats = out
    return out


class PreActProjection(nn.Module):
    """1x1 projection of the pre-activated input; the keys of timm's `DownsampleConv` (preact)."""

    def __init__(self, in_chs: int, out_chs: int, *, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False)
        self.norm = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class _PreActBlock(nn.Module):
    """Shared construction and forward of the basic and bottleneck units."""
    backend: Optional[str] = None
    reuses_input = True  # see fastres.nn.inference.run_blocks
    _n: int = 2  # convs in the residual branch

    def _build(self, in_chs: int, out_chs: int, stride: int, layers: Sequence[tuple[int, int, int, int, int]],
               variant: str, backend: Optional[str]) -> None:
        """`layers`: (in, out, kernel, stride, groups) of each conv in the branch."""
        self.variant, self.backend = _check_variant(variant), backend
        pre = variant == "e"
        project = stride != 1 or in_chs != out_chs
        if pre:
            self.downsample = PreActProjection(in_chs, out_chs, stride=stride) if project else None
        else:
            self.downsample = nn.Sequential(nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(out_chs)) if project else None
        for i, (ci, co, k, s, g) in enumerate(layers, 1):
            if pre:
                setattr(self, f"norm{i}", nn.BatchNorm2d(ci))
            setattr(self, f"conv{i}", nn.Conv2d(ci, co, k, stride=s, padding=k // 2, groups=g, bias=False))
            if not pre:
                setattr(self, f"bn{i}", nn.BatchNorm2d(co))

    def _layers(self, prefix: str) -> list[nn.Module]:
        return [getattr(self, f"{prefix}{i}") for i in range(1, self._n + 1)]

    def forward(self, x: Tensor) -> Tensor:
        check_input(self, x, self.conv1.in_channels)
        if self.variant == "e":
            proj = None if self.downsample is None else self.downsample.conv
            return preact_forward(x, self._layers("norm"), self._layers("conv"), proj, backend=self.backend)
        return self._forward_post(x, _UNITS[self.variant])

    def _forward_post(self, x: Tensor, unit: _Unit) -> Tensor:
        """Variants a-d: every conv is followed by its BN."""
        b = self.backend
        inp = torch.relu(x) if unit.pre_relu else x
        sc = x if self.downsample is None else shortcut(self.downsample, inp, b)
        convs, bns = self._layers("conv"), self._layers("bn")
        out = inp
        for c, n in zip(convs[:-1], bns[:-1]):
            out = conv_bn(out, c, n, act="relu", backend=b)
        c, n = convs[-1], bns[-1]
        if unit.tail == "add_bn_relu":
            y, stats = conv(out, c, residual=sc, with_stats=True, backend=b) if n.training else (
                conv(out, c, residual=sc, backend=b), None)
            return norm_act(y, n, act="relu", stats=stats, backend=b)
        if unit.tail == "bn_relu_add":
            return conv_bn(out, c, n, act="relu", backend=b) + sc
        return conv_bn(out, c, n, act="relu" if unit.tail == "bn_add_relu" else "identity",
                       residual=sc, backend=b)

    def extra_repr(self) -> str:
        return f"variant={self.variant!r}"


class PreActBasicBlock(_PreActBlock):
    """Two 3x3 convs (the first with `stride`), `in_chs` -> `out_chs` channels; unit `variant`."""
    _n = 2

    def __init__(self, in_chs: int, out_chs: Optional[int] = None, stride: int = 1, *,
                 variant: str = "e", groups: int = 1, backend: Optional[str] = None) -> None:
        super().__init__()
        out_chs = out_chs or in_chs
        self._build(in_chs, out_chs, stride, [(in_chs, out_chs, 3, stride, groups),
                                              (out_chs, out_chs, 3, 1, groups)], variant, backend)


class PreActBottleneck(_PreActBlock):
    """1x1 -> 3x3 (`stride`, `groups`) -> 1x1 convs, `in_chs` -> `out_chs` channels with
    int(out_chs * bottle_ratio) in the middle (0.25: expansion 4); unit `variant`."""
    _n = 3

    def __init__(self, in_chs: int, out_chs: Optional[int] = None, stride: int = 1, *,
                 variant: str = "e", bottle_ratio: float = 0.25, groups: int = 1,
                 backend: Optional[str] = None) -> None:
        super().__init__()
        out_chs = out_chs or in_chs
        mid = int(out_chs * bottle_ratio)
        self._build(in_chs, out_chs, stride, [(in_chs, mid, 1, 1, 1), (mid, mid, 3, stride, groups),
                                              (mid, out_chs, 1, 1, 1)], variant, backend)


# ---- conversion from timm ----------------------------------------------------------------------
@rule("timm.models.resnetv2.PreActBasic", "timm.models.resnetv2.PreActBottleneck")
def _from_timm(m: nn.Module) -> Union[nn.Module, str]:
    basic = type(m).__name__ == "PreActBasic"
    n = 2 if basic else 3
    if not isinstance(m.drop_path, nn.Identity):
        return "stochastic depth (drop_path) is not fused"
    norms = [getattr(m, f"norm{i}") for i in range(1, n + 1)]
    convs = [getattr(m, f"conv{i}") for i in range(1, n + 1)]
    if not all(is_bn(x) for x in norms):
        return "norm layers are not BatchNorm (GroupNorm, EvoNorm, FRN are not fused)"
    if any(act_name(getattr(x, "act", None)) != "relu" for x in norms):
        return "pre-activation is not ReLU"
    if any(not isinstance(getattr(x, "drop", nn.Identity()), nn.Identity) for x in norms):
        return "dropout inside the norm layers is not fused"
    ds = m.downsample
    if ds is not None:
        if type(ds).__name__ != "DownsampleConv" or not isinstance(ds.norm, nn.Identity):
            return "projection is not a bare 1x1 conv (avg-pool downsampling is not fused)"
        convs_all = convs + [ds.conv]
    else:
        convs_all = convs
    if any(type(c) is not nn.Conv2d for c in convs_all):
        return "convs are not plain Conv2d (StdConv2d / SAME padding are not fused)"
    parts = {f"norm{i}": x for i, x in enumerate(norms, 1)} | {f"conv{i}": c for i, c in enumerate(convs, 1)}
    return adopt(PreActBasicBlock if basic else PreActBottleneck, m, **parts, downsample=ds, variant="e")
