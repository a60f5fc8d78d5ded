"""ResNet v1 BasicBlock and Bottleneck (v1.5, stride on the 3x3), drop-in for torchvision's.

They subclass torchvision's blocks, so signatures, state_dict keys, `expansion` and
`ResNet(..., zero_init_residual=True)` behave as there; only `forward` changes: every conv runs
with its BN folded (eval) or fused with BN-add-act (training), and an optional squeeze-excitation
(`se`, as timm's SE-ResNet/ResNeXt) is applied together with the residual add and ReLU.
"""
from __future__ import annotations

from typing import Optional

import torch.nn as nn
from torch import Tensor
from torchvision.models import resnet as tv

from fastres import functional as F
from fastres.convert import adopt, as_subclass, rule
from fastres.nn.norm_act import check_input, conv_bn, is_bn, shortcut
from fastres.nn.se import from_timm_se


class BasicBlock(tv.BasicBlock):
    backend: Optional[str] = None

    def forward(self, x: Tensor) -> Tensor:
        check_input(self, x, self.conv1.in_channels)
        identity = shortcut(self.downsample, x, self.backend)
        out = conv_bn(x, self.conv1, self.bn1, act="relu", backend=self.backend)
        return _last(self, out, self.conv2, self.bn2, identity)


class Bottleneck(tv.Bottleneck):
    backend: Optional[str] = None

    def forward(self, x: Tensor) -> Tensor:
        check_input(self, x, self.conv1.in_channels)
        identity = shortcut(self.downsample, x, self.backend)
        out = conv_bn(x, self.conv1, self.bn1, act="relu", backend=self.backend)
        out = conv_bn(out, self.conv2, self.bn2, act="relu", backend=self.backend)
        return _last(self, out, self.conv3, self.bn3, identity)


def _last(block, out: Tensor, conv: nn.Conv2d, bn: nn.Module, identity: Tensor) -> Tensor:
    """relu(bn(conv(out)) + identity), with the SE gate in the same pass when the block has an `se`
    submodule (looked up in _modules: a class attribute would shadow it)."""
    se = block._modules.get("se")
    if se is None:
        return conv_bn(out, conv, bn, act="relu", residual=identity, backend=block.backend)
    out = conv_bn(out, conv, bn, act="identity", backend=block.backend)
    return F.se_gate_act(out, se.gate_logits(out), residual=identity, act="relu", backend=block.backend)


# ---- conversion from torchvision and timm ----------------------------------------------------
@rule("torchvision.models.resnet.BasicBlock", "torchvision.models.resnet.Bottleneck")
def _from_torchvision(m: nn.Module):
    cls = BasicBlock if isinstance(m, tv.BasicBlock) else Bottleneck
    if not all(is_bn(getattr(m, n)) for n in _bns(m)):
        return "norm layers are not BatchNorm2d/SyncBatchNorm/FrozenBatchNorm2d"
    return as_subclass(m, cls)


@rule("timm.models.resnet.BasicBlock", "timm.models.resnet.Bottleneck")
def _from_timm(m: nn.Module):
    basic = type(m).__name__ == "BasicBlock"
    acts = [m.act1, m.act2] + ([] if basic else [m.act3])
    if any(type(a) is not nn.ReLU for a in acts):
        return "activation is not ReLU"
    if not isinstance(m.aa, nn.Identity) or not isinstance(m.drop_block, nn.Identity):
        return "anti-aliasing or DropBlock layers are not fused"
    if m.drop_path is not None and not isinstance(m.drop_path, nn.Identity):
        return "stochastic depth (drop_path) is not fused"
    if not all(is_bn(getattr(m, n)) for n in _bns(m)):
        return "norm layers are not BatchNorm2d/SyncBatchNorm/FrozenBatchNorm2d"
    se = from_timm_se(m.se) if m.se is not None else None
    if isinstance(se, str):
        return se
    convs = {n: getattr(m, n) for n in ("conv1", "bn1", "conv2", "bn2") + (() if basic else ("conv3", "bn3"))}
    if basic and m.conv1.stride != m.conv2.stride and m.conv2.stride != (1, 1):
        return "unexpected stride placement"
    return adopt(BasicBlock if basic else Bottleneck, m, **convs, relu=nn.ReLU(inplace=True),
                 downsample=m.downsample, stride=m.stride, se=se)


def _bns(m: nn.Module) -> list[str]:
    return [n for n in ("bn1", "bn2", "bn3") if hasattr(m, n)]
