"""torchvision's DenseNet-121/161/169/201 with fastres blocks.

Each builder calls torchvision's own builder (same keywords: weights, progress, num_classes,
drop_rate, memory_efficient, ...; same initialisation and state_dict keys) and converts the
result in place with `fastres.convert`: every dense block and transition becomes its fastres
counterpart, and the model fastres's `DenseNet` (a torchvision `DenseNet` subclass, same keys)
whose stem conv0-norm0-relu0-pool0 runs as the ResNet stem does. `fastres.conversion_report(model)`
lists what was replaced.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as TF
from torch import Tensor
from torchvision.models import densenet as tv

import fastres.nn.densenet  # noqa: F401  (registers the DenseNet conversion rules)
from fastres.convert import as_subclass, convert, rule
from fastres.models.resnet import stem
from fastres.nn import inference as _inference
from fastres.nn.norm_act import check_input, is_bn

_STEM = ["conv0", "norm0", "relu0", "pool0"]


class DenseNet(tv.DenseNet):
    """torchvision's DenseNet with its stem fused: in eval the conv runs with norm0 folded and
    the ReLU in its epilogue, then the max pooling; in training the conv's output is the only
    tensor stored (norm0-ReLU and the argmax recomputed in backward). The rest runs as it is."""
    backend: Optional[str] = None

    def forward(self, x: Tensor) -> Tensor:
        f = self.features
        mods = list(f._modules.values())
        if _inference.hooked(f) or any(_inference.hooked(m) for m in mods[:len(_STEM)]):
            x = f(x)
        else:
            check_input(self, x, f.conv0.in_channels)
            x = stem(x, f.conv0, f.norm0, f.pool0, self.backend)
            for m in mods[len(_STEM):]:
                x = m(x)
        return self.classifier(torch.flatten(TF.adaptive_avg_pool2d(TF.relu(x, inplace=True), (1, 1)), 1))


@rule("torchvision.models.densenet.DenseNet")
def _from_torchvision(m: nn.Module):
    f = m.features
    if list(f._modules)[:len(_STEM)] != _STEM:
        return f"features do not start with {_STEM}"
    if type(f.conv0) is not nn.Conv2d or not is_bn(f.norm0) or type(f.relu0) is not nn.ReLU \
            or type(f.pool0) is not nn.MaxPool2d:
        return "stem is not Conv2d, BatchNorm2d-like, ReLU, MaxPool2d"
    return as_subclass(m, DenseNet)


def _fused(build: Callable[..., tv.DenseNet], num_classes: int, backend: Optional[str],
           kwargs: dict[str, Any]) -> DenseNet:
    return convert(build(num_classes=num_classes, **kwargs), backend=backend, inplace=True, strict=True)


def densenet121(*, num_classes: int = 1000, backend: Optional[str] = None, **kwargs: Any) -> DenseNet:
    return _fused(tv.densenet121, num_classes, backend, kwargs)


def densenet161(*, num_classes: int = 1000, backend: Optional[str] = None, **kwargs: Any) -> DenseNet:
    return _fused(tv.densenet161, num_classes, backend, kwargs)


def densenet169(*, num_classes: int = 1000, backend: Optional[str] = None, **kwargs: Any) -> DenseNet:
    return _fused(tv.densenet169, num_classes, backend, kwargs)


def densenet201(*, num_classes: int = 1000, backend: Optional[str] = None, **kwargs: Any) -> DenseNet:
    return _fused(tv.densenet201, num_classes, backend, kwargs)
