"""torchvision's ResNet, ResNeXt and Wide ResNet with fastres blocks: same constructor keywords
(num_classes, zero_init_residual, groups, width_per_group, replace_stride_with_dilation,
norm_layer) and identical state_dict keys; the stem's conv-BN-ReLU runs fused as well."""
from __future__ import annotations

from typing import Any, Optional

import torch.nn as nn
from torch import Tensor
from torchvision.models import resnet as tv

from fastres.convert import as_subclass, rule
from fastres.nn.norm_act import check_input, conv_bn, is_bn
from fastres.nn.resnet import BasicBlock, Bottleneck


class ResNet(tv.ResNet):
    backend: Optional[str] = None

    def _forward_impl(self, x: Tensor) -> Tensor:
        check_input(self, x, self.conv1.in_channels)
        x = self.maxpool(conv_bn(x, self.conv1, self.bn1, act="relu", backend=self.backend))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


@rule("torchvision.models.resnet.ResNet")
def _from_torchvision(m: nn.Module):
    if not is_bn(m.bn1) or type(m.relu) is not nn.ReLU:
        return "stem norm is not BatchNorm2d-like or its activation is not ReLU"
    return as_subclass(m, ResNet)


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
