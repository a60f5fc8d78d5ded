"""Pre-activation ResNets with timm's `resnetv2_18/34/50/101/152` structure and state_dict keys.

Each builder constructs timm's `ResNetV2` (BatchNorm-ReLU, plain convs) and converts it in place:
the blocks become fastres `PreActBasicBlock` / `PreActBottleneck` (variant e) and the final
BN-ReLU a fastres `BatchNormAct2d`, all holding timm's own parameters, so a timm checkpoint loads
with `strict=True` and the model keeps timm's methods (`forward_features`, `reset_classifier`, ...).
"""
from __future__ import annotations

from typing import Any, Optional

import torch.nn as nn

import fastres.nn.preact  # noqa: F401  (registers the PreActBasic / PreActBottleneck rules)
from fastres.convert import convert


def _build(name: str, timm_name: str, num_classes: int, backend: Optional[str], kw: dict) -> nn.Module:
    from timm.models import resnetv2
    return convert(getattr(resnetv2, timm_name)(num_classes=num_classes, **kw), backend=backend, inplace=True,
                   strict=True)


def preact_resnet18(*, num_classes: int = 1000, backend: Optional[str] = None, **kw: Any) -> nn.Module:
    """timm `resnetv2_18` (basic blocks, 2-2-2-2) with fused pre-activation blocks."""
    return _build("preact_resnet18", "resnetv2_18", num_classes, backend, kw)


def preact_resnet34(*, num_classes: int = 1000, backend: Optional[str] = None, **kw: Any) -> nn.Module:
    """timm `resnetv2_34` (basic blocks, 3-4-6-3) with fused pre-activation blocks."""
    return _build("preact_resnet34", "resnetv2_34", num_classes, backend, kw)


def preact_resnet50(*, num_classes: int = 1000, backend: Optional[str] = None, **kw: Any) -> nn.Module:
    """timm `resnetv2_50` (bottlenecks, 3-4-6-3) with fused pre-activation blocks."""
    return _build("preact_resnet50", "resnetv2_50", num_classes, backend, kw)


def preact_resnet101(*, num_classes: int = 1000, backend: Optional[str] = None, **kw: Any) -> nn.Module:
    """timm `resnetv2_101` (bottlenecks, 3-4-23-3) with fused pre-activation blocks."""
    return _build("preact_resnet101", "resnetv2_101", num_classes, backend, kw)


def preact_resnet152(*, num_classes: int = 1000, backend: Optional[str] = None, **kw: Any) -> nn.Module:
    """timm `resnetv2_152` (bottlenecks, 3-8-36-3) with fused pre-activation blocks."""
    return _build("preact_resnet152", "resnetv2_152", num_classes, backend, kw)
