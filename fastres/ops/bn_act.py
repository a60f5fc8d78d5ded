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
from fastres.ops import library
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
@library.op("fastres::bn_act", mutates_args=())
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


@library.op("fastres::bn_act_backward", mutates_args=())
def bn_act_backward(grad: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                    mean: Optional[Tensor], invstd: Optional[Tensor], residual: Optional[Tensor],
                    out: Optional[Tensor], act: str, training: bool, output_mask: Sequence[bool],
                    backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Grads of (x, residual, weight, bias); entries not asked for in output_mask are empty."""
    args = (grad, x, weight, bias, mean, invstd, residual, out, act, training, list(output_mask))
    return unaliased(B.choose("bn_act_backward", backend, x.device, args)(*args), args)


@bn_act_backward.register_fake
def _(grad, x, weight, bias, mean, invstd, residual, out, act, training, output_mask, backend):
    def like(t, wanted):
        return torch.empty_like(t) if wanted and t is not None else grad.new_empty(0)
    return (like(x, output_mask[0]), like(grad, output_mask[1]), like(weight, output_mask[2]),
            like(bias, output_mask[3]))


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
@library.op("fastres::batch_stats", mutates_args=())
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


# ==== triton implementation ======================================================================
# fastres.kernels.bn_act: one elementwise kernel for the forward (BN folded into a per-channel fp32
# scale/shift on the host) and a two-stage per-channel statistics kernel. They run on CUDA, or on
# CPU under TRITON_INTERPRET=1; the backward is a fused per-channel reduction plus, in training
# mode, a second elementwise pass for dx. Kernels are imported on first use: TRITON_INTERPRET is
# read when a kernel is decorated.
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def triton_supports(x: Tensor, *tensors: Optional[Tensor], same_shape: Optional[Tensor] = None,
                    same_shape_name: str = "residual") -> Optional[str]:
    """Why the triton kernels cannot take this input (None when they can); `same_shape` must have
    x's shape."""
    if x.dtype not in TRITON_DTYPES:
        return f"dtype {x.dtype} not supported (float32, float16, bfloat16)"
    if x.dim() != 4:
        return f"expects a 4-D input, got {x.dim()}-D"
    if x.numel() == 0:
        return "empty input"
    if any(t is not None and t.device != x.device for t in tensors):
        return "tensors on different devices"
    if same_shape is not None and same_shape.shape != x.shape:
        return f"{same_shape_name} shape {tuple(same_shape.shape)} differs from the input's (no broadcasting)"
    return None


def triton_device(x: Tensor):
    """Context selecting x's CUDA device for a launch (a no-op on CPU, i.e. the interpreter, and
    while tracing: the compiled graph's launcher selects it)."""
    import contextlib
    return torch.cuda.device(x.device) if x.is_cuda and not B._decomposing else contextlib.nullcontext()


def _strides(t: Optional[Tensor]) -> tuple[int, ...]:
    return tuple(t.stride()) if t is not None else (0, 0, 0, 0)


def _channels_contiguous(x: Tensor) -> bool:
    return x.stride(1) == 1 and x.shape[1] > 1


@B.register("bn_act", "triton",
            supports=lambda x, w, b, mean, invstd, res, act: triton_supports(x, w, b, mean, invstd, res, same_shape=res))
def bn_act_triton(x, weight, bias, mean, invstd, residual, act, *, out: Optional[Tensor] = None):
    """act(BN(x) + residual) in one kernel; the output has x's layout (empty_like), or is written
    into `out` (x's shape and dtype, any strides: e.g. a channel slice of a concatenation)."""
    import triton

    from fastres.kernels import bn_act as K
    from fastres.kernels.conv import ACTS
    scale, shift = ref.scale_shift(weight, bias, mean, invstd, x)
    out = torch.empty_like(x) if out is None else out
    n, c, h, w = x.shape
    bp, bc = K.pick_blocks(c, _channels_contiguous(x))
    grid = (triton.cdiv(n * h * w, bp), triton.cdiv(c, bc))
    with triton_device(x):
        B.launcher(K.bn_act_kernel)[grid](
            x, scale if scale is not None else x, shift if shift is not None else x,
            residual if residual is not None else x, out,
            n * h * w, c, h * w, w, *x.stride(), *_strides(residual), *out.stride(),
            HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None, HAS_RESIDUAL=residual is not None,
            ACT=ACTS[act], BLOCK_P=bp, BLOCK_C=bc, num_warps=K.NUM_WARPS)
    return out


STATS_CHUNKS = 512  # at most this many partial (count, mean, M2) rows per channel block


@B.register("batch_stats", "triton", supports=lambda x: triton_supports(x))
def batch_stats_triton(x):
    """Per-channel (mean, biased variance) in fp32: chunk partials, then one merge."""
    import triton

    from fastres.kernels import bn_act as K
    n, c, h, w = x.shape
    p = n * h * w
    bp, bc = K.pick_blocks(c, _channels_contiguous(x))
    c_blocks = triton.cdiv(c, bc)
    tiles = triton.cdiv(triton.cdiv(p, bp), max(1, STATS_CHUNKS // c_blocks))
    chunks = triton.cdiv(p, tiles * bp)
    part = torch.empty((3, chunks, c), dtype=torch.float32, device=x.device)
    with triton_device(x):
        B.launcher(K.batch_stats_partial_kernel)[(chunks, c_blocks)](
            x, part, p, c, h * w, w, tiles, *x.stride(), BLOCK_P=bp, BLOCK_C=bc, num_warps=K.NUM_WARPS)
        return combine_stats(part)


def combine_stats(part: Tensor) -> tuple[Tensor, Tensor]:
    """(mean, biased variance) from (3, CHUNKS, C) fp32 partials (count, mean, M2), merged in a
    fixed order: in one program per channel block for up to STATS_CHUNKS chunks, else first in
    about sqrt(CHUNKS) slices side by side (a conv epilogue leaves one chunk per row tile).
    Call inside `triton_device`."""
    import math

    import triton

    from fastres.kernels import bn_act as K
    chunks, c = part.shape[1:]
    mean = torch.empty(c, dtype=torch.float32, device=part.device)
    var = torch.empty_like(mean)
    cb = min(triton.next_power_of_2(c), 1024)
    if chunks > STATS_CHUNKS:
        span = math.isqrt(chunks - 1) + 1
        slices = triton.cdiv(chunks, span)
        merged = torch.empty((3, slices, c), dtype=torch.float32, device=part.device)
        B.launcher(K.batch_stats_combine_kernel)[(triton.cdiv(c, cb), slices)](
            part, merged, merged, c, chunks, span, BLOCK_C=cb, FINAL=False, num_warps=K.NUM_WARPS)
        part, chunks = merged, slices
    B.launcher(K.batch_stats_combine_kernel)[(triton.cdiv(c, cb),)](
        part, mean, var, c, chunks, chunks, BLOCK_C=cb, num_warps=K.NUM_WARPS)
    return mean, var
def _bn_backward_supports(grad, x, weight, bias, mean, invstd, residual, out, act, training, mask):
    why = triton_supports(x, grad, weight, bias, mean, invstd, residual, out, same_shape=residual)
    for name, t in (("grad", grad), ("out", out)):
        if why is None and t is not None:
            why = triton_supports(x, same_shape=t, same_shape_name=name)
    return why


@B.register("bn_act_backward", "triton", supports=_bn_backward_supports)
def bn_act_backward_triton(grad, x, weight, bias, mean, invstd, residual, out, act, training, mask):
    """Grads of (x, residual, weight, bias) as the reference computes them: one pass that yields
    gres, the per-channel partial sums and (eval) gx; with training, a deterministic merge of the
    partials and a second pass for gx. The activation's derivative is recomputed from x for silu
    and for relu/relu6 without a saved `out`; when pass 1 stored a relu-family gz as gres (exact:
    a masked copy of grad), pass 2 reads it instead of grad and the mask."""
    import triton

    from fastres.kernels import bn_act as K
    from fastres.kernels.conv import ACTS
    check_act(act)
    if len(mask) != 4:
        raise ValueError(f"fastres.bn_act_backward: output_mask must have 4 entries, got {len(mask)}")
    need_x, need_res = mask[0], mask[1]
    need_w, need_b = mask[2] and weight is not None, mask[3] and bias is not None
    second_pass = need_x and training
    sum_gx, sum_g = need_w or second_pass, need_b or second_pass
    n, c, h, w = x.shape
    p = n * h * w
    dev = x.device
    scale, shift = (v.contiguous() if v is not None else None
                    for v in ref.scale_shift(weight, bias, mean, invstd, x))
    recompute = act == "silu" or act != "identity" and out is None
    mean32 = mean.float().contiguous() if mean is not None else torch.zeros(c, device=dev)
    invstd32 = invstd.float().contiguous() if invstd is not None else torch.ones(c, device=dev)
    empty = grad.new_empty(0)
    gx = torch.empty_like(x) if need_x else empty
    gres = torch.empty_like(grad) if need_res else empty
    sums = torch.empty((4, c), dtype=torch.float32, device=dev)

    bp, bc = K.pick_blocks(c, _channels_contiguous(x), K.BACKWARD_ELEMENTS)
    c_blocks = triton.cdiv(c, bc)
    tiles = triton.cdiv(triton.cdiv(p, bp), max(1, STATS_CHUNKS // c_blocks))
    chunks = triton.cdiv(p, tiles * bp)
    part = torch.empty((2, chunks, c) if sum_g or sum_gx else (0,), dtype=torch.float32, device=dev)
    res = residual if residual is not None and recompute else None

    def launch(grid, tiles, g, act, recompute, **pass_flags):
        r = res if recompute else None
        B.launcher(K.bn_act_backward_kernel)[grid](
            g, x, scale if scale is not None else x, shift if shift is not None else x,
            r if r is not None else x, out if out is not None else x, mean32, sums[2:],
            gx if need_x else x, gres if need_res else x, part if part.numel() else x,
            p, c, h * w, w, tiles, *g.stride(), *x.stride(), *_strides(r), *_strides(out),
            *_strides(gx if need_x else None), *_strides(gres if need_res else None),
            ACT=ACTS[act], RECOMPUTE=recompute, HAS_SCALE=scale is not None,
            HAS_SHIFT=shift is not None and recompute, HAS_RESIDUAL=r is not None,
            BLOCK_P=bp, BLOCK_C=bc, num_warps=K.NUM_WARPS, **pass_flags)

    with triton_device(x):
        if need_res or sum_g or sum_gx or (need_x and not training):
            launch((chunks, c_blocks), tiles, grad, act, recompute, STORE_GRES=need_res, SUM_G=sum_g,
                   SUM_GX=sum_gx, GX=1 if need_x and not training else 0)
        if sum_g or sum_gx:
            cb = min(triton.next_power_of_2(c), 1024)
            B.launcher(K.bn_act_backward_combine_kernel)[(triton.cdiv(c, cb),)](
                part, invstd32, sums, c, chunks, float(p), TRAINING=second_pass, BLOCK_C=cb,
                num_warps=K.NUM_WARPS)
        if second_pass:
            saved_gz = need_res and act != "silu"
            launch((triton.cdiv(p, bp), c_blocks), 1, gres if saved_gz else grad,
                   "identity" if saved_gz else act, recompute and not saved_gz,
                   STORE_GRES=False, SUM_G=False, SUM_GX=False, GX=2)
    return (gx, gres, sums[1].to(weight.dtype, copy=True) if need_w else empty,
            sums[0].to(bias.dtype, copy=True) if need_b else empty)


# ==== end of the triton implementation ========================================================
