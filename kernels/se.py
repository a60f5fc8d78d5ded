"""Squeeze-excitation gate fused with the residual add and activation, forward and backward.

    out = act(x * sigmoid(gate[n, c]) + residual)      HAS_RESIDUAL, ACT (tl.constexpr flags)

A program owns one sample n and a [BLOCK_P positions, BLOCK_C channels] tile of it, so the gate
is one vector per program. Tensors are addressed through their four strides (channels_last,
NCHW and channel slices of a larger buffer work without copies); offsets are int64; math in fp32.

Backward, with gz = dL/dz (relu/relu6 masked by the saved output, silu recomputed from x):
    `se_gate_act_backward_kernel`  gx = gz * s, grad of residual = gz, and per chunk of a
                                   sample's positions the partial sum(gz * x) per channel
    `se_gate_grad_combine_kernel`  sums the partials in chunk order (deterministic):
                                   grad gate = sum(gz * x) * s * (1 - s)
"""
from __future__ import annotations

import triton
import triton.language as tl

from fastres.kernels.bn_act import act_grad
from fastres.kernels.conv import apply_act


@triton.jit
def _tile_offsets(n, hw, HW, W, c64, sn, sc, sh, sw):
    """int64 offsets of the [positions hw of sample n, channels c] tile for strides s*."""
    pos = n.to(tl.int64) * sn + (hw // W).to(tl.int64) * sh + (hw % W).to(tl.int64) * sw
    return pos[:, None] + c64[None, :] * sc


@triton.jit
def _gate(gate_ptr, n, c, c_ok, sgn, sgc):
    """sigmoid(gate[n, c]) in fp32, shaped [1, BLOCK_C]."""
    g = tl.load(gate_ptr + n.to(tl.int64) * sgn + c.to(tl.int64) * sgc, mask=c_ok, other=0.0)
    return tl.sigmoid(g.to(tl.float32))[None, :]


@triton.jit
def se_gate_act_kernel(
    x_ptr, gate_ptr, res_ptr, out_ptr,
    C, HW, W,
    sxn, sxc, sxh, sxw,
    sgn, sgc,
    srn, src, srh, srw,
    son, soc, soh, sow,
    HAS_RESIDUAL: tl.constexpr, ACT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """out = act(x * sigmoid(gate) + residual).

    x_ptr     (N, C, H, W) input, strides sx*; HW = H*W
    gate_ptr  (N, C) gate logits, strides sg*
    res_ptr   (N, C, H, W) residual (HAS_RESIDUAL), strides sr*
    out_ptr   (N, C, H, W) output, strides so*
    Grid: (N, cdiv(HW, BLOCK_P), cdiv(C, BLOCK_C)).
    """
    n = tl.program_id(0)
    hw = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    ok = (hw < HW)[:, None] & c_ok[None, :]
    c64 = c.to(tl.int64)
    z = tl.load(x_ptr + _tile_offsets(n, hw, HW, W, c64, sxn, sxc, sxh, sxw), mask=ok, other=0.0)
    z = z.to(tl.float32) * _gate(gate_ptr, n, c, c_ok, sgn, sgc)
    if HAS_RESIDUAL:
        z += tl.load(res_ptr + _tile_offsets(n, hw, HW, W, c64, srn, src, srh, srw), mask=ok,
                     other=0.0).to(tl.float32)
    z = apply_act(z, ACT)
    tl.store(out_ptr + _tile_offsets(n, hw, HW, W, c64, son, soc, soh, sow),
             z.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def se_gate_act_backward_kernel(
    grad_ptr, x_ptr, gate_ptr, res_ptr, out_ptr, gx_ptr, gres_ptr, part_ptr,
    N, C, HW, W, TILES,
    sdn, sdc, sdh, sdw,
    sxn, sxc, sxh, sxw,
    sgn, sgc,
    srn, src, srh, srw,
    son, soc, soh, sow,
    san, sac, sah, saw,
    sen, sec, seh, sew,
    HAS_RESIDUAL: tl.constexpr, ACT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """gx, grad of residual and the partial gate sums over TILES*BLOCK_P positions of sample n.

    grad_ptr  (N, C, H, W) dL/dout, strides sd*; HW = H*W
    x_ptr     (N, C, H, W) input, strides sx*
    gate_ptr  (N, C) gate logits, strides sg*
    res_ptr   (N, C, H, W) residual, strides sr*: read only to recompute silu's pre-activation
    out_ptr   (N, C, H, W) saved output, strides so* (relu, relu6)
    gx_ptr    (N, C, H, W) grad of x = gz * sigmoid(gate), strides sa*
    gres_ptr  (N, C, H, W) grad of residual = gz, strides se* (HAS_RESIDUAL)
    part_ptr  (CHUNKS, N, C) fp32 partial sum(gz * x) of chunk program_id(1)
    Grid: (N, CHUNKS = cdiv(HW, TILES*BLOCK_P), cdiv(C, BLOCK_C)).
    """
    n = tl.program_id(0)
    chunk = tl.program_id(1)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    c64 = c.to(tl.int64)
    s = _gate(gate_ptr, n, c, c_ok, sgn, sgc)
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for i in range(TILES):
        hw = (chunk * TILES + i) * BLOCK_P + tl.arange(0, BLOCK_P)
        ok = (hw < HW)[:, None] & c_ok[None, :]
        gz = tl.load(grad_ptr + _tile_offsets(n, hw, HW, W, c64, sdn, sdc, sdh, sdw), mask=ok,
                     other=0.0).to(tl.float32)
        x = tl.load(x_ptr + _tile_offsets(n, hw, HW, W, c64, sxn, sxc, sxh, sxw), mask=ok,
                    other=0.0).to(tl.float32)
        if ACT == 3:
            z = x * s
            if HAS_RESIDUAL:
                z += tl.load(res_ptr + _tile_offsets(n, hw, HW, W, c64, srn, src, srh, srw), mask=ok,
                             other=0.0).to(tl.float32)
            gz = act_grad(gz, z, ACT)
        elif ACT != 0:
            y = tl.load(out_ptr + _tile_offsets(n, hw, HW, W, c64, son, soc, soh, sow), mask=ok, other=0.0)
            gz = act_grad(gz, y.to(tl.float32), ACT)
        if HAS_RESIDUAL:
            tl.store(gres_ptr + _tile_offsets(n, hw, HW, W, c64, sen, sec, seh, sew),
                     gz.to(gres_ptr.dtype.element_ty), mask=ok)
        tl.store(gx_ptr + _tile_offsets(n, hw, HW, W, c64, san, sac, sah, saw),
                 (gz * s).to(gx_ptr.dtype.element_ty), mask=ok)
        acc += tl.sum(gz * x, axis=0)    # masked lanes: gz = 0
    tl.store(part_ptr + (chunk.to(tl.int64) * N + n) * C + c, acc, mask=c_ok)


@triton.jit
def se_gate_grad_combine_kernel(part_ptr, gate_ptr, ggate_ptr, C, NC, CHUNKS, sgn, sgc,
                                BLOCK: tl.constexpr):
    """ggate (N, C) contiguous = sum over chunks of part (CHUNKS, N, C) * s * (1 - s), with
    s = sigmoid(gate) (strides sg*), in ggate's dtype. Grid: (cdiv(N*C, BLOCK),)."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < NC
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for k in range(CHUNKS):
        acc += tl.load(part_ptr + k * NC + i, mask=ok, other=0.0)
    g = tl.load(gate_ptr + (i // C) * sgn + (i % C) * sgc, mask=ok, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    tl.store(ggate_ptr + i, (acc * (s * (1.0 - s))).to(ggate_ptr.dtype.element_ty), mask=ok)


# ---- blocks ----------------------------------------------------------------------------------
ELEMENTS = 2048      # elements per tile (sm_80/90: at most 72 registers forward, 128 backward)
NUM_WARPS = 4
COMBINE_BLOCK = 1024


def pick_blocks(hw: int, channels: int, channels_contiguous: bool) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_C) of every kernel here, ELEMENTS per tile. channels_last: up to 64 channels
    wide (contiguous); NCHW: a sample's positions are contiguous per channel, so the tile spans up
    to all of them (at least ELEMENTS / 64) and as many channels as fill the rest."""
    if channels_contiguous:
        bc = min(triton.next_power_of_2(channels), 64)
        return ELEMENTS // bc, bc
    bp = min(max(triton.next_power_of_2(hw), ELEMENTS // 64), ELEMENTS)
    return bp, ELEMENTS // bp


def all_blocks() -> list[tuple[int, int]]:
    """Every (BLOCK_P, BLOCK_C) pick_blocks can return."""
    sizes = [1 << k for k in range(13)]
    return sorted({pick_blocks(hw, c, cl) for hw in sizes for c in sizes for cl in (False, True)})
