"""torchvision's ResNet, ResNeXt and Wide ResNet with fastres blocks: same constructor keywords
(num_classes, zero_init_residual, groups, width_per_group, replace_stride_with_dilation,
norm_layer) and identical state_dict keys; the stem's conv-BN-ReLU runs fused as well."""
from __future__ import annotations

from typing import Any, Optional

import torch.nn as nn
from torch import Tensor
from torchvision.models import resnet as tv

from fastres.convert import as_subclass, rule
from fastres.nn import inference as _inference
from fastres.nn.norm_act import bn_act_pool, bn_prologue, check_input, conv, conv_bn, is_bn, pool_kind
from fastres.nn.resnet import BasicBlock, Bottleneck


class ResNet(tv.ResNet):
    backend: Optional[str] = None

    def _forward_impl(self, x: Tensor) -> Tensor:
        check_input(self, x, self.conv1.in_channels)
        x = stem(x, self.conv1, self.bn1, self.maxpool, self.backend)
        owned = not _inference.hooked(self.maxpool)
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x, owned = _inference.run_blocks(layer, x, owned)
        return self.fc(self.avgpool(x).flatten(1))


def stem(x: Tensor, conv1: nn.Conv2d, bn1: nn.Module, pool: nn.Module, backend: Optional[str]) -> Tensor:
    """pool(relu(bn1(conv1(x)))). Training stores only the conv output (BN-ReLU and the argmax
    are recomputed in backward); eval runs the conv with BN folded and ReLU fused, then the
    pooling without an argmax."""
    if pool_kind(pool) is None or _inference.hooked(pool):
        return pool(conv_bn(x, conv1, bn1, act="relu", backend=backend))
    if bn1.training:
        c, stats = conv(x, conv1, with_stats=True, backend=backend)
        return bn_act_pool(c, bn_prologue(c, bn1, stats=stats, backend=backend), pool, backend=backend)
    return bn_act_pool(conv_bn(x, conv1, bn1, act="relu", backend=backend), None, pool, backend=backend)


@rule("torchvision.models.resnet.ResNet")
def _from_torchvision(m: nn.Module):
    if not is_bn(m.bn1) or type(m.relu) is not nn.ReLU:
        return "stem norm is not BatchNorm2d-like or its activation is not ReLU"
    return as_subclass(m, ResNet)


@rule("timm.models.resnet.ResNet")
def _from_timm(m: nn.Module):
    if not is_bn(m.bn1) or type(m.act1) is not nn.ReLU:
        return "stem norm is not BatchNorm2d-like or its activation is not ReLU"
    from fastres.models.timm_resnet import TimmResNet
    return as_subclass(m, TimmResNet)


def _build(block: type, layers: list[int], **kwargs: Any) -> ResNet:
    return ResNet(block, layers, **kwargs)


def resnet18(**kwargs: Any) -> ResNet:
    return _build(BasicBlock, [2, 2, 2, 2], **kwargs)


def resnet34(**kwargs: Any) -> ResNet:
    return _build(BasicBlock, [3, 4, 6, 3], **kwargs)


def resnet50(**kwargs: Any) -> ResNet:
    return _build(Bottleneck, [3, 4, 6, 3], **kwargs)


def resnet101(**kwargs: Any) -> ResNet:
    return _build(Bottleneck, [3, 4, 23, 3], **kwargs)


def resnet152(**kwargs: Any) -> ResNet:
    return _build(Bottleneck, [3, 8, 36, 3], **kwargs)


def resnext50_32x4d(**kwargs: Any) -> ResNet:
    return _build(Bottleneck, [3, 4, 6, 3], groups=32, width_per_group=4, **kwargs)


def resnext101_32x8d(**kwargs: Any) -> ResNet:
    return _build(Bottleneck, [3, 4, 23, 3], groups=32, width_per_group=8, **kwargs)


def resnext101_64x4d(**kwargs: Any) -> ResNet:
    return _build(Bottleneck, [3, 4, 23, 3], groups=64, width_per_group=4, **kwargs)


def wide_resnet50_2(**kwargs: Any) -> ResNet:
    return _build(Bottleneck, [3, 4, 6, 3], width_per_group=128, **kwargs)


def wide_resnet101_2(**kwargs: Any) -> ResNet:
    return _build(Bottleneck, [3, 4, 23, 3], width_per_group=128, **kwargs)
