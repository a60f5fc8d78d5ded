"""Builders on a timm skeleton: timm builds the model (names, keyword arguments, init, state_dict
keys), `fastres.convert` swaps its blocks in place, and every block must have been converted."""
from __future__ import annotations

from typing import Any, Optional

import torch.nn as nn

from fastres.convert import conversion_report, convert, qualname


def build_converted(name: str, block: str, *, pretrained: bool = False, backend: Optional[str] = None,
                    **kwargs: Any) -> nn.Module:
    """timm's `name` model with fastres blocks; raises if any `block` (timm class qualname) was kept."""
    import timm

    model = convert(timm.create_model(name, pretrained=pretrained, **kwargs), backend=backend, inplace=True)
    why = {path: reason for path, _, reason in conversion_report(model).skipped}
    kept = [path for path, m in model.named_modules() if qualname(m) == block]
    if kept:
        details = "; ".join(f"{p}: {why.get(p, 'not converted')}" for p in kept)
        raise ValueError(f"fastres.models.{name}: {len(kept)} block(s) cannot be fused ({details})")
    return model
