"""Batch norm (eval or with batch statistics) + residual + activation in one pass, and
per-channel batch statistics. Non-mutating: running statistics are the module's business.

    out = act((x - mean) * invstd * weight + bias + residual)      every term optional

With `training`, mean/invstd are the batch statistics of `x` itself (from `batch_stats`): they get
no gradient of their own, the x gradient includes theirs (the full BN backward, in fp32, rounded
once; summing two half-precision partial gradients that nearly cancel would not be accurate).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from fastres import backend as B
from fastres.ops import reference as ref


def check_act(act: str) -> None:
    if act not in ref.ACTS:
        raise ValueError(f"fastres: unknown activation {act!r}; expected one of {ref.ACTS}")


def check_bn(op: str, x: Tensor, mean: Optional[Tensor], invstd: Optional[Tensor], training: bool) -> None:
    if training and (mean is None or invstd is None):
        raise ValueError(f"fastres.{op}: training=True needs the batch mean and invstd of the input")


def unaliased(outs, inputs) -> tuple:
    """Custom-op outputs may alias neither inputs nor each other: clone the ones that would
    (e.g. an identity activation handing back its input)."""
    seen = {id(t) for t in inputs if isinstance(t, Tensor)}
    res = []
    for t in outs:
        res.append(t.clone() if id(t) in seen else t)
        seen.add(id(res[-1]))
    return tuple(res)


# ---- bn_act ----------------------------------------------------------------------------------
@torch.library.custom_op("fastres::bn_act", mutates_args=())
def bn_act(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Optional[Tensor],
           invstd: Optional[Tensor], residual: Optional[Tensor], act: str, training: bool,
           backend: str) -> Tensor:
    check_act(act)
    check_bn("bn_act", x, mean, invstd, training)
    args = (x, weight, bias, mean, invstd, residual, act)
    return unaliased((B.choose("bn_act", backend, x.device, args)(*args),), args)[0]


@bn_act.register_fake
def _(x, weight, bias, mean, invstd, residual, act, training, backend):
    return torch.empty_like(x)


@torch.library.custom_op("fastres::bn_act_backward", mutates_args=())
def bn_act_backward(grad: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                    mean: Optional[Tensor], invstd: Optional[Tensor], residual: Optional[Tensor],
                    out: Optional[Tensor], act: str, training: bool, output_mask: Sequence[bool],
                    backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Grads of (x, residual, weight, bias); entries not asked for in output_mask are empty."""
    args = (grad, x, weight, bias, mean, invstd, residual, out, act, training, list(output_mask))
    return unaliased(B.choose("bn_act_backward", backend, x.device, args)(*args), args)


@bn_act_backward.register_fake
def _(grad, x, weight, bias, mean, invstd, residual, out, act, training, output_mask, backend):
    e = grad.new_empty(0)
    return (torch.empty_like(x) if output_mask[0] else e,
            torch.empty_like(grad) if output_mask[1] else e,
            torch.empty_like(weight) if output_mask[2] and weight is not None else e.clone(),
            torch.empty_like(bias) if output_mask[3] and bias is not None else e.clone())


def _setup(ctx, inputs, output):
    x, weight, bias, mean, invstd, residual, act, training, backend = inputs
    ctx.conf = (act, training, backend)
    # silu recomputes its input; the relu family reads its mask from the output.
    ctx.save_for_backward(x, weight, bias, mean, invstd, residual if act == "silu" else None,
                          output if act in ("relu", "relu6") else None)


def _backward(ctx, grad):
    x, weight, bias, mean, invstd, residual, out = ctx.saved_tensors
    act, training, backend = ctx.conf
    nx, nw, nb, nmean, ninvstd, nres = ctx.needs_input_grad[:6]
    if not training and (nmean or ninvstd):
        raise RuntimeError("fastres.bn_act: gradients w.r.t. mean/invstd in eval mode are not supported; "
                           "fold them into weight/bias")
    gx, gres, gw, gb = bn_act_backward(grad, x, weight, bias, mean, invstd, residual, out, act,
                                       training, [nx, nres, nw, nb], backend)
    return (gx if nx else None, gw if nw else None, gb if nb else None, None, None,
            gres if nres else None, None, None, None)


bn_act.register_autograd(_backward, setup_context=_setup)


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
B.register("bn_act", "reference")(ref.bn_act)
B.register("bn_act_backward", "reference")(ref.bn_act_backward)
B.register("batch_stats", "reference")(ref.batch_stats)


def _native_supports(x: Tensor, *tensors: Optional[Tensor]) -> Optional[str]:
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        return f"dtype {x.dtype} not supported"
    if x.dim() != 4:
        return f"expects a 4-D input, got {x.dim()}-D"
    if any(t is not None and t.device != x.device for t in tensors):
        return "tensors on different devices"
    return None


@B.register("bn_act", "native", supports=lambda x, *rest: _native_supports(x, *rest[:5]))
def _bn_act_native(x, weight, bias, mean, invstd, residual, act):
    return torch.ops.fastres_native.bn_act(x, weight, bias, mean, invstd, residual, act)


@B.register("bn_act_backward", "native", supports=lambda grad, x, *rest: _native_supports(x, grad, *rest[:6]))
def _bn_act_backward_native(grad, x, weight, bias, mean, invstd, residual, out, act, training, mask):
    return tuple(torch.ops.fastres_native.bn_act_backward(
        grad, x, weight, bias, mean, invstd, residual, out, act, training, mask))


@B.register("batch_stats", "native", supports=lambda x: _native_supports(x))
def _batch_stats_native(x):
    return tuple(torch.ops.fastres_native.batch_stats(x))
