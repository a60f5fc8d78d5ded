"""ReXNet with timm's names, keyword arguments (num_classes, in_chans, output_stride, drop_rate,
...) and state_dict keys, every LinearBottleneck a fused `fastres.nn.rexnet.LinearBottleneck`.

Built as timm's model followed by an in-place `fastres.convert` (which also fuses the stem's and
head's BN-SiLU); a configuration whose blocks cannot be fused (e.g. drop_path_rate > 0) raises."""
from __future__ import annotations

from typing import Any, Optional

import torch.nn as nn

import fastres.nn.rexnet  # noqa: F401  (registers the LinearBottleneck rule)
from fastres.convert import convert

def _build(name: str, pretrained: bool, backend: Optional[str], kwargs: dict) -> nn.Module:
    import timm
    return convert(timm.create_model(name, pretrained=pretrained, **kwargs), backend=backend, inplace=True,
                   strict=True)


def rexnet_100(pretrained: bool = False, *, backend: Optional[str] = None, **kwargs: Any) -> nn.Module:
    return _build("rexnet_100", pretrained, backend, kwargs)


def rexnet_130(pretrained: bool = False, *, backend: Optional[str] = None, **kwargs: Any) -> nn.Module:
    return _build("rexnet_130", pretrained, backend, kwargs)


def rexnet_150(pretrained: bool = False, *, backend: Optional[str] = None, **kwargs: Any) -> nn.Module:
    return _build("rexnet_150", pretrained, backend, kwargs)


def rexnet_200(pretrained: bool = False, *, backend: Optional[str] = None, **kwargs: Any) -> nn.Module:
    return _build("rexnet_200", pretrained, backend, kwargs)
