"""Activation memory of one training step: the bytes of the tensors autograd saves for backward
(each storage counted once, parameters and buffers excluded), eager vs fastres."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn


def saved_activation_bytes(model: nn.Module, x: torch.Tensor,
                           loss_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> int:
    """Bytes autograd holds for backward after one forward of `model` in train mode on `x`."""
    own = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in own and t.device.type != "meta":
            seen[s.data_ptr()] = s.nbytes()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
        loss = loss_fn(out) if loss_fn else out.float().square().mean()
    loss.backward()
    return sum(seen.values())


@dataclass
class MemoryReport:
    name: str
    eager: int
    fastres: int

    @property
    def ratio(self) -> float:
        return self.fastres / max(self.eager, 1)

    def __str__(self) -> str:
        mb = 1 << 20
        return (f"{self.name}: saved for backward, eager {self.eager / mb:.1f} MiB, "
                f"fastres {self.fastres / mb:.1f} MiB ({self.ratio:.2f}x)")


def memory_report(model: nn.Module, x: torch.Tensor, *, name: str = "model") -> MemoryReport:
    """Compare `model` (eager) with `fastres.convert(model)` on one training step; neither the
    model nor its statistics are changed (both run on copies)."""
    import fastres
    eager = copy.deepcopy(model)
    fused = fastres.convert(model)
    return MemoryReport(name, saved_activation_bytes(eager, x), saved_activation_bytes(fused, x))
