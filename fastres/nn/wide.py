"""Wide ResNet block (Zagoruyko & Komodakis 2016): BN-ReLU-conv3x3(stride)-dropout-BN-ReLU-conv3x3,
added to the input, or to a 1x1 projection of the activated input when the shape changes.

Each BN-ReLU runs in the following conv's input load (never stored) and the shortcut is added in
the last conv's epilogue. Dropout acts on the first conv's output, before the second BN, so that
BN-ReLU stays fused into the second conv.
"""
from __future__ import annotations

from typing import Optional

import torch.nn as nn
from torch import Tensor

from fastres.nn.norm_act import check_input
from fastres.nn.preact import preact_forward


class WideBasic(nn.Module):
    """`in_planes` -> `planes` channels; `stride` on the first conv; `dropout` probability between
    the convs. Keys: bn1, conv1, bn2, conv2, shortcut (a 1x1 conv, only when the shape changes)."""
    backend: Optional[str] = None
    reuses_input = True  # see fastres.nn.inference.run_blocks

    def __init__(self, in_planes: int, planes: int, stride: int = 1, *, dropout: float = 0.0,
                 backend: Optional[str] = None) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"WideBasic: dropout must be in [0, 1), got {dropout}")
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.shortcut = (nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)
                         if stride != 1 or in_planes != planes else None)
        self.dropout, self.backend = dropout, backend

    def forward(self, x: Tensor) -> Tensor:
        check_input(self, x, self.conv1.in_channels)
        return preact_forward(x, (self.bn1, self.bn2), (self.conv1, self.conv2), self.shortcut,
                              dropout=self.dropout, training=self.training, backend=self.backend)

    def extra_repr(self) -> str:
        return f"dropout={self.dropout}"
