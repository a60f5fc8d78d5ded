"""`fastres.explain(model)`: what was converted, and for each fused op in the model which
backend runs it and why (a fallback states its reason)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from fastres import backend as _backend
from fastres.convert import ConversionReport, conversion_report


@dataclass
class Explanation:
    report: Optional[ConversionReport]
    rows: list[tuple[str, str, str, str]]  # (module path, op, backend, why), one per distinct call

    def __str__(self) -> str:
        out = [str(self.report) if self.report else "model was not converted by fastres.convert", native_status()]
        if not self.rows:
            out.append("no fastres op ran")
        else:
            w = max(len(r[0]) for r in self.rows)
            out.append(f"{'module':<{w}}  {'op':<12} {'backend':<10} why")
            out += [f"{p:<{w}}  {op:<12} {b:<10} {why}" for p, op, b, why in self.rows]
        return "\n".join(out)

    __repr__ = __str__


def native_status() -> str:
    """One line on the compiled kernels: which CPU build runs (one per ISA), or why none does."""
    if _backend.NATIVE_MISSING is not None:
        return f"native kernels: unavailable ({_backend.NATIVE_MISSING})"
    return f"native kernels: CPU build {_backend.NATIVE_CPU_ISA}"


def default_input(model: nn.Module) -> torch.Tensor:
    """A (2, C, 64, 64) input for an image model whose first conv takes C channels."""
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:
        raise ValueError("fastres.explain: pass an example input; the model has no Conv2d to size one from")
    return torch.randn(2, conv.in_channels, 64, 64, device=conv.weight.device, dtype=conv.weight.dtype)


def explain(model: nn.Module, example: Optional[torch.Tensor] = None) -> Explanation:
    """Run one forward pass on `example` (default: `default_input`) without changing the model's
    state (buffers are restored, no grads) and record every fastres op call."""
    example = default_input(model) if example is None else example
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    handles = []
    for name, m in model.named_modules():
        if name:
            leaf = name.rsplit(".", 1)[-1]
            handles.append(m.register_forward_pre_hook(lambda mod, inp, n=leaf: _backend._scope.append(n)))
            handles.append(m.register_forward_hook(lambda mod, inp, out: _backend._scope.pop() and None))
    try:
        with _backend.recording() as rec, torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for k, v in model.named_buffers():
                v.copy_(buffers[k])
    rows = list(dict.fromkeys(rec))
    return Explanation(conversion_report(model), rows)
