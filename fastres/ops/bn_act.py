"""Per-channel affine + residual + activation (BN-act in eval or with batch statistics, add-act),
and per-channel batch statistics. Non-mutating: running statistics are the module's business."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from fastres import backend as B
from fastres.ops import reference as ref


def _check_act(act: str) -> None:
    if act not in ref.ACTS:
        raise ValueError(f"fastres: unknown activation {act!r}; expected one of {ref.ACTS}")


# ---- affine_act ------------------------------------------------------------------------------
@torch.library.custom_op("fastres::affine_act", mutates_args=())
def affine_act(x: Tensor, scale: Optional[Tensor], shift: Optional[Tensor],
               residual: Optional[Tensor], act: str, backend: str) -> Tensor:
    """act(x * scale[c] + shift[c] + residual), per channel c = dim 1."""
    _check_act(act)
    out = B.choose("affine_act", backend, x.device, (x, scale, shift, residual, act))(
        x, scale, shift, residual, act)
    return out.clone() if out is x else out


@affine_act.register_fake
def _(x, scale, shift, residual, act, backend):
    return torch.empty_like(x)


@torch.library.custom_op("fastres::affine_act_backward", mutates_args=())
def affine_act_backward(grad: Tensor, x: Tensor, scale: Optional[Tensor], shift: Optional[Tensor],
                        residual: Optional[Tensor], out: Optional[Tensor], act: str,
                        output_mask: Sequence[bool], backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Grads of (x, residual, scale, shift); entries not asked for in output_mask are empty."""
    args = (grad, x, scale, shift, residual, out, act, list(output_mask))
    res = B.choose("affine_act_backward", backend, x.device, args)(*args)
    return tuple(r.clone() if r is grad else r for r in res)


@affine_act_backward.register_fake
def _(grad, x, scale, shift, residual, out, act, output_mask, backend):
    e = grad.new_empty(0)
    return (torch.empty_like(x) if output_mask[0] else e,
            torch.empty_like(grad) if output_mask[1] else e,
            torch.empty_like(scale) if output_mask[2] and scale is not None else e,
            torch.empty_like(shift) if output_mask[3] and shift is not None else e)


def _affine_setup(ctx, inputs, output):
    x, scale, shift, residual, act, backend = inputs
    ctx.act, ctx.backend = act, backend
    ctx.has = (scale is not None, shift is not None, residual is not None)
    # silu recomputes its input; the relu family reads its mask from the output.
    ctx.save_for_backward(x, scale, shift, residual if act == "silu" else None,
                          output if act in ("relu", "relu6") else None)


def _affine_backward(ctx, grad):
    x, scale, shift, residual, out = ctx.saved_tensors
    nx, nscale, nshift, nres = ctx.needs_input_grad[:4]
    gx, gres, gscale, gshift = affine_act_backward(
        grad, x, scale, shift, residual, out, ctx.act, [nx, nres, nscale, nshift], ctx.backend)
    return (gx if nx else None, gscale if nscale else None, gshift if nshift else None,
            gres if nres else None, None, None)


affine_act.register_autograd(_affine_backward, setup_context=_affine_setup)


# ---- batch_stats -----------------------------------------------------------------------------
@torch.library.custom_op("fastres::batch_stats", mutates_args=())
def batch_stats(x: Tensor, backend: str) -> tuple[Tensor, Tensor]:
    """Per-channel (mean, biased variance) over every dim but 1; fp32 for half inputs."""
    return B.choose("batch_stats", backend, x.device, (x,))(x)


@batch_stats.register_fake
def _(x, backend):
    dt = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    return x.new_empty(x.shape[1], dtype=dt), x.new_empty(x.shape[1], dtype=dt)


def _stats_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], output[0])


def _stats_backward(ctx, gmean, gvar):
    x, mean = ctx.saved_tensors
    return ref.batch_stats_backward(gmean, gvar, x, mean), None


batch_stats.register_autograd(_stats_backward, setup_context=_stats_setup)


# ---- implementations -------------------------------------------------------------------------
B.register("affine_act", "reference")(ref.affine_act)
B.register("affine_act_backward", "reference")(ref.affine_act_backward)
B.register("batch_stats", "reference")(ref.batch_stats)


def _native_elementwise(x: Tensor, *tensors: Optional[Tensor]) -> Optional[str]:
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        return f"dtype {x.dtype} not supported"
    if x.dim() != 4:
        return f"expects a 4-D input, got {x.dim()}-D"
    for t in tensors:
        if t is not None and t.device != x.device:
            return "tensors on different devices"
    return None


@B.register("affine_act", "native",
            supports=lambda x, scale, shift, residual, act: _native_elementwise(x, scale, shift, residual))
def _affine_act_native(x, scale, shift, residual, act):
    return torch.ops.fastres_native.affine_act(x, scale, shift, residual, act)


@B.register("affine_act_backward", "native",
            supports=lambda grad, x, scale, shift, residual, out, act, mask: _native_elementwise(
                x, grad, scale, shift, residual, out))
def _affine_act_backward_native(grad, x, scale, shift, residual, out, act, mask):
    return tuple(torch.ops.fastres_native.affine_act_backward(grad, x, scale, shift, residual, out, act, mask))


@B.register("batch_stats", "native", supports=lambda x: _native_elementwise(x))
def _batch_stats_native(x):
    return tuple(torch.ops.fastres_native.batch_stats(x))
