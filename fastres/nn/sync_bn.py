"""Synchronised batch norm that also runs on CPU (gloo).

`fastres.convert` turns every `nn.SyncBatchNorm` into `SyncBatchNorm2d` (same state and
`process_group`): in training the fused ops reduce (count, sum, sum of squares) across the
group before normalising, uneven per-rank batches included, and the gradient flows back through
a differentiable all_reduce. torch's own SyncBatchNorm refuses CPU modules under DDP.
"""
from __future__ import annotations

from typing import Optional

import torch.nn as nn
from torch import Tensor

from fastres.convert import as_subclass, rule
from fastres.nn.norm_act import check_input, norm_act


class SyncBatchNorm2d(nn.BatchNorm2d):
    """`nn.SyncBatchNorm` for 4-D input through the fused ops; keys of `nn.BatchNorm2d`."""
    backend: Optional[str] = None

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, process_group=None,
                 device=None, dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.process_group = process_group

    def forward(self, x: Tensor) -> Tensor:
        check_input(self, x, self.num_features)
        return norm_act(x, self, act="identity", backend=self.backend)


@rule("torch.nn.modules.batchnorm.SyncBatchNorm")
def _from_torch(m: nn.Module):
    return as_subclass(m, SyncBatchNorm2d)
