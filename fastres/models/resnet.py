"""torchvision's ResNet, ResNeXt and Wide ResNet with fastres blocks: same constructor keywords
(num_classes, zero_init_residual, groups, width_per_group, replace_stride_with_dilation,
norm_layer) and identical state_dict keys; the stem's conv-BN-ReLU runs fused as well."""
from __future__ import annotations

from typing import Any, Optional

import torch
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
        owned = not _hooked(self.maxpool)
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x, owned = _run_stage(layer, x, owned)
        return self.fc(self.avgpool(x).flatten(1))


def stem(x: Tensor, conv1: nn.Conv2d, bn1: nn.Module, pool: nn.Module, backend: Optional[str]) -> Tensor:
    """pool(relu(bn1(conv1(x)))). Training stores only the conv output (BN-ReLU and the argmax
    are recomputed in backward); eval runs the conv with BN folded and ReLU fused, then the
    pooling without an argmax."""
    if pool_kind(pool) is None or _hooked(pool):
        return pool(conv_bn(x, conv1, bn1, act="relu", backend=backend))
    if bn1.training:
        c, stats = conv(x, conv1, with_stats=True, backend=backend)
        return bn_act_pool(c, bn_prologue(c, bn1, stats=stats, backend=backend), pool, backend=backend)
    return bn_act_pool(conv_bn(x, conv1, bn1, act="relu", backend=backend), None, pool, backend=backend)


def _hooked(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


def _run_stage(layer: nn.Module, x: Tensor, owned: bool) -> tuple[Tensor, bool]:
    """(layer(x), whether that output is still private to this forward). In eval inference without
    autograd, an identity-shortcut block may accumulate its last conv into its own input, the
    residual stream, as compiled code does, when that input is an intermediate nobody else can
    hold: made by this forward, and by no module with hooks (which could keep it)."""
    if (torch.compiler.is_compiling() or not isinstance(layer, nn.Sequential) or _hooked(layer)
            or x.requires_grad or torch.is_grad_enabled() and any(p.requires_grad for p in layer.parameters())
            or _global_hooks()):
        return layer(x), False
    for block in layer:
        reuse = (owned and isinstance(block, (BasicBlock, Bottleneck)) and block.downsample is None
                 and block._modules.get("se") is None and not block.training and not _hooked(block))
        if reuse:
            _inference.mark_scratch(x)
        y = block(x)
        if reuse:
            _inference.unmark_scratch(x)
        x, owned = y, not _hooked(block)
    return x, owned


def _global_hooks() -> bool:
    from torch.nn.modules import module as _m
    return bool(_m._global_forward_hooks or _m._global_forward_pre_hooks or _m._global_backward_hooks
                or _m._global_backward_pre_hooks)


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
