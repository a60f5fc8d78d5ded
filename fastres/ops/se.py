"""Squeeze-excitation gate applied with the residual add and activation:
out = act(x * sigmoid(gate)[n, c] + residual)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastres import backend as B
from fastres.ops import reference as ref
from fastres.ops.bn_act import check_act


@torch.library.custom_op("fastres::se_gate_act", mutates_args=())
def se_gate_act(x: Tensor, gate: Tensor, residual: Optional[Tensor], act: str, backend: str) -> Tensor:
    check_act(act)
    if gate.shape != x.shape[:2]:
        raise ValueError(f"fastres.se_gate_act: gate must be (N, C) = {tuple(x.shape[:2])}, "
                         f"got {tuple(gate.shape)}")
    return B.choose("se_gate_act", backend, x.device, (x, gate, residual, act))(x, gate, residual, act)


@se_gate_act.register_fake
def _(x, gate, residual, act, backend):
    return torch.empty_like(x)


def _setup(ctx, inputs, output):
    x, gate, residual, act, backend = inputs
    ctx.act = act
    ctx.save_for_backward(x, gate, residual, output)


def _backward(ctx, grad):
    x, gate, residual, out = ctx.saved_tensors
    gx, ggate, gres = ref.se_gate_act_backward(grad, x, gate, residual, out, ctx.act)
    return gx, ggate, gres, None, None


se_gate_act.register_autograd(_backward, setup_context=_setup)

B.register("se_gate_act", "reference")(ref.se_gate_act)
