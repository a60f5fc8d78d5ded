"""torchvision's DenseNet-121/161/169/201 with fastres blocks.

Each builder calls torchvision's own builder (same keywords: weights, progress, num_classes,
drop_rate, memory_efficient, ...; same initialisation and state_dict keys) and converts the
result in place with `fastres.convert`: every dense block and transition becomes its fastres
counterpart and the stem's norm0-relu0 one `BatchNormAct2d`. The model stays a torchvision
`DenseNet`; `fastres.conversion_report(model)` lists what was replaced.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

from torchvision.models import densenet as tv

import fastres.nn.densenet  # noqa: F401  (registers the DenseNet conversion rules)
from fastres.convert import convert

def _fused(build: Callable[..., tv.DenseNet], num_classes: int, backend: Optional[str],
           kwargs: dict[str, Any]) -> tv.DenseNet:
    return convert(build(num_classes=num_classes, **kwargs), backend=backend, inplace=True, strict=True)


def densenet121(*, num_classes: int = 1000, backend: Optional[str] = None, **kwargs: Any) -> tv.DenseNet:
    return _fused(tv.densenet121, num_classes, backend, kwargs)


def densenet161(*, num_classes: int = 1000, backend: Optional[str] = None, **kwargs: Any) -> tv.DenseNet:
    return _fused(tv.densenet161, num_classes, backend, kwargs)


def densenet169(*, num_classes: int = 1000, backend: Optional[str] = None, **kwargs: Any) -> tv.DenseNet:
    return _fused(tv.densenet169, num_classes, backend, kwargs)


def densenet201(*, num_classes: int = 1000, backend: Optional[str] = None, **kwargs: Any) -> tv.DenseNet:
    return _fused(tv.densenet201, num_classes, backend, kwargs)
