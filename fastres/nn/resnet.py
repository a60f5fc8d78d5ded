"""ResNet v1 BasicBlock and Bottleneck (v1.5, stride on the 3x3), drop-in for torchvision's.

They subclass torchvision's blocks, so signatures, state_dict keys, `expansion` and
`ResNet(..., zero_init_residual=True)` behave as there; only `forward` changes (see
`residual_branch`), and an optional squeeze-excitation (`se`, as timm's SE-ResNet/ResNeXt) is
applied together with the residual add and ReLU.
"""
from __future__ import annotations

from typing import Optional

import torch.nn as nn
from torch import Tensor
from torchvision.models import resnet as tv

from fastres import functional as F
from fastres.convert import adopt, as_subclass, rule
from fastres.nn.norm_act import bn_conv, check_input, conv, conv_bn, is_bn, norm_act, shortcut
from fastres.nn.se import block_se


class BasicBlock(tv.BasicBlock):
    backend: Optional[str] = None
    reuses_input = True  # see fastres.nn.inference.run_blocks

    def forward(self, x: Tensor) -> Tensor:
        check_input(self, x, self.conv1.in_channels)
        identity = shortcut(self.downsample, x, self.backend)
        return residual_branch(self, x, [(self.conv1, self.bn1), (self.conv2, self.bn2)], identity)


class Bottleneck(tv.Bottleneck):
    backend: Optional[str] = None
    reuses_input = True

    def forward(self, x: Tensor) -> Tensor:
        check_input(self, x, self.conv1.in_channels)
        identity = shortcut(self.downsample, x, self.backend)
        return residual_branch(self, x, [(self.conv1, self.bn1), (self.conv2, self.bn2),
                                         (self.conv3, self.bn3)], identity)


def residual_branch(block: nn.Module, x: Tensor, layers: list[tuple[nn.Conv2d, nn.Module]],
                    identity: Tensor) -> Tensor:
    """relu(SE(bn_n(conv_n(... relu(bn_1(conv_1(x))) ...))) + identity).

    Eval (and frozen BN): each conv runs with its BN folded in and the ReLU in its epilogue.
    Training: each inner BN-ReLU is applied as the NEXT conv loads its input, so its output is
    never stored; autograd keeps the conv outputs only and the backward recomputes the ReLU. Each
    conv hands its output's batch statistics to the BN after it (from its epilogue on Triton).
    The SE gate (an `se` submodule, as timm's SE-ResNet; looked up in _modules because a class
    attribute would shadow it) runs in the same pass as the residual add and ReLU; in eval its
    channel means come with the last conv's output (`conv2d_means`)."""
    b = block.backend
    *inner, (conv_n, bn_n) = layers
    if layers[0][1].training:
        y, stats = conv(x, inner[0][0] if inner else conv_n, with_stats=True, backend=b)
        for (_, bn_prev), (conv_next, _) in zip(inner, inner[1:] + [(conv_n, bn_n)]):
            y, stats = bn_conv(y, bn_prev, conv_next, pre_act="relu", stats=stats, with_stats=True, backend=b)
        return bn_residual_relu(block, y, bn_n, identity, stats)
    for conv_i, bn_i in inner:
        x = conv_bn(x, conv_i, bn_i, act="relu", backend=b)
    se = block._modules.get("se")
    if se is None:
        return conv_bn(x, conv_n, bn_n, act="relu", residual=identity, backend=b)
    y, means = conv_bn(x, conv_n, bn_n, act="identity", with_means=True, backend=b)   # means: the epilogue's
    return F.se_gate_act(y, se.gate_logits(y, means), residual=identity, act="relu", backend=b)


def bn_residual_relu(block: nn.Module, y: Tensor, bn: nn.Module, identity: Tensor, stats: F.Stats) -> Tensor:
    """relu(SE(bn(y)) + identity), training: one pass over the last conv's output y (`stats` its
    batch statistics), or two with the block's SE gate."""
    b = block.backend
    se = block._modules.get("se")
    if se is None:
        return norm_act(y, bn, act="relu", residual=identity, stats=stats, backend=b)
    y = norm_act(y, bn, act="identity", stats=stats, backend=b)
    return F.se_gate_act(y, se.gate_logits(y), residual=identity, act="relu", backend=b)


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
    se = block_se(m.se)
    if isinstance(se, str):
        return se
    convs = {n: getattr(m, n) for n in ("conv1", "bn1", "conv2", "bn2") + (() if basic else ("conv3", "bn3"))}
    if basic and m.conv1.stride != m.conv2.stride and m.conv2.stride != (1, 1):
        return "unexpected stride placement"
    return adopt(BasicBlock if basic else Bottleneck, m, **convs, relu=nn.ReLU(inplace=True),
                 downsample=m.downsample, stride=m.stride, se=se)


def _bns(m: nn.Module) -> list[str]:
    return [n for n in ("bn1", "bn2", "bn3") if hasattr(m, n)]
