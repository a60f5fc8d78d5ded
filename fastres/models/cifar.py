"""CIFAR networks (32x32 inputs, 10 classes by default) built from fastres blocks.

- `resnet20/56/110`: He et al. 2015, Sec. 4.2: 3x3 conv stem with 16 channels, three stages of
  (depth-2)/6 v1 basic blocks with 16, 32, 64 channels (stride 1, 2, 2). Shortcut option A by
  default, as in the paper: identity, and where the shape changes a parameter-free shortcut that
  subsamples with the stride and appends zero channels; `shortcut="B"` uses 1x1 conv-BN projections.
- `preact_resnet110` (basic, (depth-2)/6 per stage, 16/32/64 channels) and `preact_resnet164/1001`
  (bottlenecks, (depth-2)/9 per stage, 64/128/256 output channels): He et al. 2016, any of the five
  units `variant="a".."e"` (default e). The stem conv is followed by BN-ReLU for a-c, by BN for d
  (its units start with ReLU) and by nothing for e; d ends with a ReLU and e with BN-ReLU before
  pooling, as their last unit leaves the sum unactivated.
- `wrn_16_8`, `wrn_28_10`, `wrn_40_4`: WRN-d-k (Zagoruyko & Komodakis 2016): stem conv with 16
  channels, three groups of (d-4)/6 `WideBasic` blocks with 16k, 32k, 64k channels, BN-ReLU,
  pooling; `dropout` between the convs of each block.

Keys: conv1, [bn1], stages.{0,1,2}.{i}.<block keys>, [norm], fc.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch.nn as nn
import torch.nn.functional as TF
from torch import Tensor

from fastres.nn.inference import Stage
from fastres.nn.norm_act import BatchNormAct2d, check_input, conv, conv_bn
from fastres.nn.preact import VARIANTS, PreActBasicBlock, PreActBottleneck
from fastres.nn.resnet import BasicBlock
from fastres.nn.wide import WideBasic

BlockFn = Callable[[int, int, int], nn.Module]  # (in_channels, out_channels, stride) -> block


class ZeroPadShortcut(nn.Module):
    """Option-A shortcut: x subsampled with `stride`, then `extra` zero channels appended."""

    def __init__(self, extra: int, stride: int) -> None:
        super().__init__()
        self.extra, self.stride = extra, stride

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, ::self.stride, ::self.stride]
        return TF.pad(x, (0, 0, 0, 0, 0, self.extra)) if self.extra else x

    def extra_repr(self) -> str:
        return f"extra={self.extra}, stride={self.stride}"


class CifarResNet(nn.Module):
    """3x3 conv stem with 16 channels, [BN(-ReLU)], three stages (stride 1, 2, 2), [final norm],
    global average pooling, linear classifier."""
    backend: Optional[str] = None

    def __init__(self, block: BlockFn, widths: Sequence[int], blocks_per_stage: int, *,
                 stem_act: Optional[str], head: nn.Module, num_classes: int = 10,
                 in_chans: int = 3, backend: Optional[str] = None) -> None:
        """`stem_act`: the activation after the stem's BN, or None for no stem BN; `backend` pins
        the backend of the model and every block (default: the global one)."""
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, 16, 3, padding=1, bias=False)
        self.bn1 = BatchNormAct2d(16, act=stem_act) if stem_act is not None else None
        stages, chs = [], 16
        for i, w in enumerate(widths):
            layers = [block(chs if j == 0 else w, w, (1 if i == 0 else 2) if j == 0 else 1)
                      for j in range(blocks_per_stage)]
            stages.append(Stage(*layers))
            chs = w
        self.stages = nn.Sequential(*stages)
        self.norm = head
        self.fc = nn.Linear(chs, num_classes)
        for m in self.modules():
            if hasattr(type(m), "backend"):
                m.backend = backend
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: Tensor) -> Tensor:
        check_input(self, x, self.conv1.in_channels)
        if self.bn1 is None:
            x = conv(x, self.conv1, backend=self.backend)
        else:
            x = conv_bn(x, self.conv1, self.bn1, act=self.bn1.act, backend=self.backend)
        return self.norm(self.stages(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.forward_features(x).mean((2, 3)))


def _blocks(depth: int, per_block: int, offset: int, name: str) -> int:
    n, rem = divmod(depth - offset, per_block)
    if rem or n < 1:
        raise ValueError(f"fastres.models.{name}: depth {depth} is not {per_block}n+{offset}")
    return n


# ---- ResNet v1 (He et al. 2015) ----------------------------------------------------------------
def cifar_resnet(depth: int, *, shortcut: str = "A", num_classes: int = 10, **kw: Any) -> CifarResNet:
    """CIFAR ResNet v1 of depth 6n+2 with basic blocks; `shortcut` "A" (zero-pad) or "B" (conv-BN)."""
    if shortcut not in ("A", "B"):
        raise ValueError(f"fastres.models.cifar_resnet: shortcut must be 'A' or 'B', got {shortcut!r}")
    n = _blocks(depth, 6, 2, "cifar_resnet")

    def block(cin: int, cout: int, stride: int) -> nn.Module:
        ds = None
        if stride != 1 or cin != cout:
            ds = (ZeroPadShortcut(cout - cin, stride) if shortcut == "A" else
                  nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)))
        return BasicBlock(cin, cout, stride, ds)

    return CifarResNet(block, (16, 32, 64), n, stem_act="relu", head=nn.Identity(),
                       num_classes=num_classes, **kw)


def resnet20(**kw: Any) -> CifarResNet:
    return cifar_resnet(20, **kw)


def resnet56(**kw: Any) -> CifarResNet:
    return cifar_resnet(56, **kw)


def resnet110(**kw: Any) -> CifarResNet:
    return cifar_resnet(110, **kw)


# ---- pre-activation ResNet (He et al. 2016) ----------------------------------------------------
def cifar_preact_resnet(depth: int, *, bottleneck: bool, variant: str = "e", num_classes: int = 10,
                        **kw: Any) -> CifarResNet:
    """CIFAR ResNet of depth 6n+2 (basic) or 9n+2 (bottleneck) with unit `variant` ("a".."e")."""
    if variant not in VARIANTS:
        raise ValueError(f"fastres.models.cifar_preact_resnet: variant must be one of {VARIANTS}, got {variant!r}")
    if bottleneck:
        n, widths, cls = _blocks(depth, 9, 2, "cifar_preact_resnet"), (64, 128, 256), PreActBottleneck
    else:
        n, widths, cls = _blocks(depth, 6, 2, "cifar_preact_resnet"), (16, 32, 64), PreActBasicBlock
    stem_act = {"d": "identity", "e": None}.get(variant, "relu")
    head = {"d": nn.ReLU(), "e": BatchNormAct2d(widths[-1], act="relu")}.get(variant, nn.Identity())
    return CifarResNet(lambda cin, cout, s: cls(cin, cout, s, variant=variant), widths, n,
                       stem_act=stem_act, head=head, num_classes=num_classes, **kw)


def preact_resnet110(**kw: Any) -> CifarResNet:
    return cifar_preact_resnet(110, bottleneck=False, **kw)


def preact_resnet164(**kw: Any) -> CifarResNet:
    return cifar_preact_resnet(164, bottleneck=True, **kw)


def preact_resnet1001(**kw: Any) -> CifarResNet:
    return cifar_preact_resnet(1001, bottleneck=True, **kw)


# ---- Wide ResNet (Zagoruyko & Komodakis 2016) --------------------------------------------------
def wide_resnet_cifar(depth: int, widen: int, *, dropout: float = 0.0, num_classes: int = 10,
                      **kw: Any) -> CifarResNet:
    """WRN-`depth`-`widen`: depth 6n+4, widths 16*widen, 32*widen, 64*widen."""
    n = _blocks(depth, 6, 4, "wide_resnet_cifar")
    widths = (16 * widen, 32 * widen, 64 * widen)
    return CifarResNet(lambda cin, cout, s: WideBasic(cin, cout, s, dropout=dropout), widths, n,
                       stem_act=None, head=BatchNormAct2d(widths[-1], act="relu"),
                       num_classes=num_classes, **kw)


def wrn_16_8(**kw: Any) -> CifarResNet:
    return wide_resnet_cifar(16, 8, **kw)


def wrn_28_10(**kw: Any) -> CifarResNet:
    return wide_resnet_cifar(28, 10, **kw)


def wrn_40_4(**kw: Any) -> CifarResNet:
    return wide_resnet_cifar(40, 4, **kw)
