"""Res2Net / Res2NeXt with timm's names, keyword arguments (num_classes, in_chans, output_stride,
...) and state_dict keys, every Bottle2neck a fused `fastres.nn.res2net.Bottle2neck`.

Built as timm's model followed by an in-place `fastres.convert`; a configuration whose blocks
cannot be fused (e.g. drop_path_rate > 0) raises instead of silently running unfused."""
from __future__ import annotations

from typing import Any, Optional

import torch.nn as nn

import fastres.nn.res2net  # noqa: F401  (registers the Bottle2neck rule)
from fastres.convert import convert

def _build(name: str, pretrained: bool, backend: Optional[str], kwargs: dict) -> nn.Module:
    import timm
    return convert(timm.create_model(name, pretrained=pretrained, **kwargs), backend=backend, inplace=True,
                   strict=True)


def res2net50_26w_4s(pretrained: bool = False, *, backend: Optional[str] = None, **kwargs: Any) -> nn.Module:
    return _build("res2net50_26w_4s", pretrained, backend, kwargs)


def res2net50_48w_2s(pretrained: bool = False, *, backend: Optional[str] = None, **kwargs: Any) -> nn.Module:
    return _build("res2net50_48w_2s", pretrained, backend, kwargs)


def res2net50_14w_8s(pretrained: bool = False, *, backend: Optional[str] = None, **kwargs: Any) -> nn.Module:
    return _build("res2net50_14w_8s", pretrained, backend, kwargs)


def res2net50_26w_6s(pretrained: bool = False, *, backend: Optional[str] = None, **kwargs: Any) -> nn.Module:
    return _build("res2net50_26w_6s", pretrained, backend, kwargs)


def res2net50_26w_8s(pretrained: bool = False, *, backend: Optional[str] = None, **kwargs: Any) -> nn.Module:
    return _build("res2net50_26w_8s", pretrained, backend, kwargs)


def res2net101_26w_4s(pretrained: bool = False, *, backend: Optional[str] = None, **kwargs: Any) -> nn.Module:
    return _build("res2net101_26w_4s", pretrained, backend, kwargs)


def res2next50(pretrained: bool = False, *, backend: Optional[str] = None, **kwargs: Any) -> nn.Module:
    return _build("res2next50", pretrained, backend, kwargs)
