"""Squeeze-excitation gate applied with the residual add and activation:
out = act(x * sigmoid(gate)[n, c] + residual)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastres import backend as B
from fastres.ops import library
from fastres.ops import reference as ref
from fastres.ops.bn_act import TRITON_DTYPES, check_act, triton_device, triton_supports, unaliased


def _check_gate(op: str, x: Tensor, gate: Tensor) -> None:
    if gate.shape != x.shape[:2]:
        raise ValueError(f"fastres.{op}: gate must be (N, C) = {tuple(x.shape[:2])}, got {tuple(gate.shape)}")


@library.op("fastres::se_gate_act", mutates_args=())
def se_gate_act(x: Tensor, gate: Tensor, residual: Optional[Tensor], act: str, backend: str) -> Tensor:
    check_act(act)
    _check_gate("se_gate_act", x, gate)
    args = (x, gate, residual, act)
    return unaliased((B.choose("se_gate_act", backend, x.device, args)(*args),), args)[0]


@se_gate_act.register_fake
def _(x, gate, residual, act, backend):
    return torch.empty_like(x)


@library.op("fastres::se_gate_act_backward", mutates_args=())
def se_gate_act_backward(grad: Tensor, x: Tensor, gate: Tensor, residual: Optional[Tensor], out: Tensor,
                         act: str, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """Grads of (x, gate, residual); the residual's is empty without a residual."""
    check_act(act)
    _check_gate("se_gate_act_backward", x, gate)
    args = (grad, x, gate, residual, out, act)
    gx, ggate, gres = B.choose("se_gate_act_backward", backend, x.device, args)(*args)
    return unaliased((gx, ggate, gres if gres is not None else grad.new_empty(0)), args)


@se_gate_act_backward.register_fake
def _(grad, x, gate, residual, out, act, backend):
    gres = torch.empty_like(residual) if residual is not None else grad.new_empty(0)
    return torch.empty_like(x), gate.new_empty(gate.shape), gres


def _setup(ctx, inputs, output):
    x, gate, residual, act, backend = inputs
    ctx.conf = (act, backend)
    ctx.save_for_backward(x, gate, residual, output)


def _backward(ctx, grad):
    x, gate, residual, out = ctx.saved_tensors
    act, backend = ctx.conf
    gx, ggate, gres = se_gate_act_backward(grad, x, gate, residual, out, act, backend)
    return gx, ggate, gres if residual is not None else None, None, None


se_gate_act.register_autograd(_backward, setup_context=_setup)

B.register("se_gate_act", "reference")(ref.se_gate_act)
B.register("se_gate_act_backward", "reference")(ref.se_gate_act_backward)


# ==== native implementation: fastres._C (csrc/cpu/se.cpp, csrc/cuda/se.cu) =====================
def _native_se_supports(x: Tensor, gate: Tensor, *tensors: Optional[Tensor]) -> Optional[str]:
    from fastres.ops.bn_act import _native_supports
    return _native_supports(x, gate, *tensors) or (
        None if gate.dtype.is_floating_point else f"gate dtype {gate.dtype} is not floating")


@B.register("se_gate_act", "native", supports=lambda x, gate, residual, act: _native_se_supports(x, gate, residual))
def _se_gate_act_native(x, gate, residual, act):
    return torch.ops.fastres_native.se_gate_act(x, gate, residual, act)


@B.register("se_gate_act_backward", "native",
            supports=lambda grad, x, gate, residual, out, act: _native_se_supports(x, gate, grad, residual, out))
def _se_gate_act_backward_native(grad, x, gate, residual, out, act):
    gx, ggate, gres = torch.ops.fastres_native.se_gate_act_backward(grad, x, gate, residual, out, act)
    return gx, ggate, gres if residual is not None else None


# ==== triton implementation ======================================================================
# fastres.kernels.se: one elementwise forward kernel; the backward computes gx and the residual's
# grad in one pass with per-chunk partial gate sums, merged by a second small kernel. They run on
# CUDA, or on CPU under TRITON_INTERPRET=1; kernels are imported on first use.
def triton_se_supports(x: Tensor, gate: Tensor, residual: Optional[Tensor], *,
                       grad: Optional[Tensor] = None, out: Optional[Tensor] = None) -> Optional[str]:
    """Why the triton SE kernels cannot take these tensors (None when they can)."""
    why = triton_supports(x, gate, residual, grad, out, same_shape=residual)
    for name, t in (("grad", grad), ("out", out)):
        if why is None and t is not None:
            why = triton_supports(x, same_shape=t, same_shape_name=name)
    for name, t in (("gate", gate), ("residual", residual), ("grad", grad), ("out", out)):
        if why is None and t is not None and t.dtype not in TRITON_DTYPES:
            why = f"{name} dtype {t.dtype} not supported (float32, float16, bfloat16)"
    return why


def _strides(t: Optional[Tensor]) -> tuple[int, ...]:
    return tuple(t.stride()) if t is not None else (0, 0, 0, 0)


def _blocks(x: Tensor):
    from fastres.kernels import se as K
    n, c, h, w = x.shape
    return K.pick_blocks(h * w, c, x.stride(1) == 1 and c > 1)


@B.register("se_gate_act", "triton",
            supports=lambda x, gate, residual, act: triton_se_supports(x, gate, residual))
def se_gate_act_triton(x, gate, residual, act):
    """act(x * sigmoid(gate) + residual) in one kernel; the output has x's layout (empty_like)."""
    import triton

    from fastres.kernels import se as K
    from fastres.kernels.conv import ACTS
    out = torch.empty_like(x)
    n, c, h, w = x.shape
    bp, bc = _blocks(x)
    with triton_device(x):
        B.launcher(K.se_gate_act_kernel)[(n, triton.cdiv(h * w, bp), triton.cdiv(c, bc))](
            x, gate, residual if residual is not None else x, out, c, h * w, w,
            *x.stride(), *gate.stride(), *_strides(residual), *out.stride(),
            HAS_RESIDUAL=residual is not None, ACT=ACTS[act], BLOCK_P=bp, BLOCK_C=bc, num_warps=K.NUM_WARPS)
    return out


CHUNKS = 512  # about this many backward programs in all, unless N * channel blocks is larger


@B.register("se_gate_act_backward", "triton",
            supports=lambda grad, x, gate, residual, out, act: triton_se_supports(
                x, gate, residual, grad=grad, out=out if act in ("relu", "relu6") else None))
def se_gate_act_backward_triton(grad, x, gate, residual, out, act):
    """Grads of (x, gate, residual) as the reference computes them."""
    import triton

    from fastres.kernels import se as K
    from fastres.kernels.conv import ACTS
    n, c, h, w = x.shape
    bp, bc = _blocks(x)
    c_blocks = triton.cdiv(c, bc)
    tiles = triton.cdiv(triton.cdiv(h * w, bp), max(1, CHUNKS // (n * c_blocks)))
    chunks = triton.cdiv(h * w, tiles * bp)
    gx = torch.empty_like(x)
    gres = torch.empty_like(residual) if residual is not None else None
    ggate = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    part = torch.empty((chunks, n, c), dtype=torch.float32, device=x.device)
    uses_out = act in ("relu", "relu6")
    with triton_device(x):
        B.launcher(K.se_gate_act_backward_kernel)[(n, chunks, c_blocks)](
            grad, x, gate, residual if residual is not None else x, out if uses_out else x, gx,
            gres if gres is not None else x, part, n, c, h * w, w, tiles,
            *grad.stride(), *x.stride(), *gate.stride(), *_strides(residual), *_strides(out if uses_out else None),
            *gx.stride(), *_strides(gres),
            HAS_RESIDUAL=residual is not None, ACT=ACTS[act], BLOCK_P=bp, BLOCK_C=bc, num_warps=K.NUM_WARPS)
        B.launcher(K.se_gate_grad_combine_kernel)[(triton.cdiv(n * c, K.COMBINE_BLOCK),)](
            part, gate, ggate, c, n * c, chunks, *gate.stride(), BLOCK=K.COMBINE_BLOCK, num_warps=K.NUM_WARPS)
    return gx, ggate, gres
# ==== end of the triton implementation ========================================================
