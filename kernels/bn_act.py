"""Per-channel affine + residual + activation, and per-channel batch statistics.

Both kernels see a 4-D tensor (N, C, H, W) as a [P = N*H*W positions, C channels] matrix,
addressed through its four strides (channels_last, NCHW and channel slices of a larger buffer
work without copies). A tile is [BLOCK_P, BLOCK_C]: wide in C for channels_last, one channel
wide for NCHW (see `pick_blocks`).

Fused in `bn_act_kernel` (each a `tl.constexpr` flag):
    out = act(x * scale[c] + shift[c] + residual)     HAS_SCALE, HAS_SHIFT, HAS_RESIDUAL, ACT
with a BN (weight, bias, mean, invstd) folded into fp32 (scale, shift) on the host; math in fp32,
one rounding to out's dtype.

Batch statistics, two stages, fp32 throughout:
    `batch_stats_partial_kernel`  each program reduces a chunk of positions for BLOCK_C channels to
                                  (count, mean, M2): per tile an exact two-pass mean/M2 over the
                                  values held in registers, tiles merged with Chan's parallel update
    `batch_stats_combine_kernel`  merges the chunks' partials the same way; var = M2 / count
                                  (in two levels for many chunks, e.g. a conv epilogue's per-tile
                                  partials)
Shifted sums never subtract two large sums, so a large mean does not cancel the variance away.

Backward of bn_act, z = (x - mean) * invstd * weight + bias (+ residual), y = act(z), in fp32:
    `bn_act_backward_kernel`  gz = dL/dz from dL/dy (relu/relu6 masked by the saved y or by y
                              recomputed from x and rounded as the forward stored it; silu's z
                              recomputed from x), then, by flags: grad of residual (= gz), the
                              chunk's partial sums sum(gz) and sum(gz * (x - mean)), and either
                              gx = gz * scale (eval) or the training-mode
                              gx = scale * (gz - k0 - (x - mean) * k1) of pass 2
    `bn_act_backward_combine_kernel`  sums the partials in a fixed order (deterministic) into
                              s0 = sum(gz), s1 = invstd * sum(gz * (x - mean)) and, for training,
                              k0 = s0 / P, k1 = s1 * invstd / P
"""
from __future__ import annotations

import triton
import triton.language as tl

from fastres.kernels.conv import apply_act, tile_moments


@triton.jit
def _position_offsets(p, HW, W, sn, sh, sw):
    """int64 offsets of positions p (flattened n, h, w) for strides (sn, sh, sw)."""
    n = (p // HW).to(tl.int64)
    hw = p % HW
    return n * sn + (hw // W).to(tl.int64) * sh + (hw % W).to(tl.int64) * sw


@triton.jit
def bn_act_kernel(
    x_ptr, scale_ptr, shift_ptr, res_ptr, out_ptr,
    P, C, HW, W,
    sxn, sxc, sxh, sxw,
    srn, src, srh, srw,
    son, soc, soh, sow,
    HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ACT: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """out = act(x * scale + shift + residual).

    x_ptr       (N, C, H, W) input, strides sx*; P = N*H*W, HW = H*W
    scale_ptr, shift_ptr (C,) fp32 (HAS_SCALE / HAS_SHIFT)
    res_ptr     (N, C, H, W) residual (HAS_RESIDUAL), strides sr*, any float dtype
    out_ptr     (N, C, H, W) output, strides so*
    Grid: (cdiv(P, BLOCK_P), cdiv(C, BLOCK_C)).
    """
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    p_ok = p < P
    c_ok = c < C
    ok = p_ok[:, None] & c_ok[None, :]
    c64 = c.to(tl.int64)
    z = tl.load(x_ptr + (_position_offsets(p, HW, W, sxn, sxh, sxw)[:, None] + c64[None, :] * sxc),
                mask=ok, other=0.0).to(tl.float32)
    if HAS_SCALE:
        z = z * tl.load(scale_ptr + c, mask=c_ok, other=0.0)[None, :]
    if HAS_SHIFT:
        z = z + tl.load(shift_ptr + c, mask=c_ok, other=0.0)[None, :]
    if HAS_RESIDUAL:
        r_off = _position_offsets(p, HW, W, srn, srh, srw)[:, None] + c64[None, :] * src
        z = z + tl.load(res_ptr + r_off, mask=ok, other=0.0).to(tl.float32)
    z = apply_act(z, ACT)
    o_off = _position_offsets(p, HW, W, son, soh, sow)[:, None] + c64[None, :] * soc
    tl.store(out_ptr + o_off, z.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Chan et al.'s parallel merge of two (count, mean, M2) summaries (elementwise)."""
    n = n_a + n_b
    frac = tl.where(n > 0, n_b / tl.maximum(n, 1.0), 0.0)
    delta = mean_b - mean_a
    return n, mean_a + delta * frac, m2_a + m2_b + delta * delta * n_a * frac


@triton.jit
def batch_stats_partial_kernel(
    x_ptr, part_ptr,
    P, C, HW, W, TILES,
    sxn, sxc, sxh, sxw,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """(count, mean, M2) of TILES*BLOCK_P consecutive positions, per channel.

    x_ptr     (N, C, H, W) input, strides sx*; P = N*H*W, HW = H*W
    part_ptr  (3, CHUNKS, C) fp32 output: counts, means, M2 of chunk program_id(0)
    Grid: (CHUNKS = cdiv(P, TILES*BLOCK_P), cdiv(C, BLOCK_C)).
    """
    chunk = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    c_off = c.to(tl.int64) * sxc
    cnt = tl.zeros((BLOCK_C,), dtype=tl.float32)
    mean = tl.zeros((BLOCK_C,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for i in range(TILES):
        p = (chunk * TILES + i) * BLOCK_P + tl.arange(0, BLOCK_P)
        ok = (p < P)[:, None] & c_ok[None, :]
        v = tl.load(x_ptr + (_position_offsets(p, HW, W, sxn, sxh, sxw)[:, None] + c_off[None, :]),
                    mask=ok, other=0.0).to(tl.float32)
        t_cnt, t_mean, t_m2 = tile_moments(v, ok)
        cnt, mean, m2 = _merge(cnt, mean, m2, t_cnt, t_mean, t_m2)
    chunks = tl.num_programs(0)
    base = part_ptr + chunk.to(tl.int64) * C + c
    tl.store(base, cnt, mask=c_ok)
    tl.store(base + chunks * C, mean, mask=c_ok)
    tl.store(base + 2 * chunks * C, m2, mask=c_ok)


@triton.jit
def batch_stats_combine_kernel(part_ptr, mean_ptr, var_ptr, C, CHUNKS, SPAN, BLOCK_C: tl.constexpr,
                               FINAL: tl.constexpr = True):
    """Merge the (3, CHUNKS, C) partials, in chunk order. FINAL: all of them into mean (C,) and
    biased variance (C,) at mean_ptr / var_ptr, grid (cdiv(C, BLOCK_C),), SPAN >= CHUNKS. Else
    program (i, s) merges chunks [s*SPAN, (s+1)*SPAN) into the (3, SLICES, C) partials at mean_ptr
    (a first level for many chunks), grid (cdiv(C, BLOCK_C), SLICES); fp32 throughout."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    s = tl.program_id(1)
    cnt = tl.zeros((BLOCK_C,), dtype=tl.float32)
    mean = tl.zeros((BLOCK_C,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for i in range(s * SPAN, tl.minimum(s * SPAN + SPAN, CHUNKS)):
        base = part_ptr + i * C + c
        cnt, mean, m2 = _merge(cnt, mean, m2, tl.load(base, mask=c_ok, other=0.0),
                               tl.load(base + CHUNKS * C, mask=c_ok, other=0.0),
                               tl.load(base + 2 * CHUNKS * C, mask=c_ok, other=0.0))
    if FINAL:
        tl.store(mean_ptr + c, mean, mask=c_ok)
        tl.store(var_ptr + c, m2 / tl.maximum(cnt, 1.0), mask=c_ok)
    else:
        slices = tl.num_programs(1)
        base = mean_ptr + s * C + c
        tl.store(base, cnt, mask=c_ok)
        tl.store(base + slices * C, mean, mask=c_ok)
        tl.store(base + 2 * slices * C, m2, mask=c_ok)


@triton.jit
def act_grad(g, v, ACT: tl.constexpr):
    """dL/dz from g = dL/dy (fp32): v is y (relu, relu6: the mask ATen reads) or z (silu)."""
    if ACT == 1:
        g = tl.where(v > 0, g, 0.0)
    elif ACT == 2:
        g = tl.where((v > 0) & (v < 6), g, 0.0)
    elif ACT == 3:
        s = tl.sigmoid(v)
        g = g * (s * (1.0 + v * (1.0 - s)))
    return g


@triton.jit
def bn_act_backward_kernel(
    grad_ptr, x_ptr, scale_ptr, shift_ptr, res_ptr, out_ptr, mean_ptr, k_ptr,
    gx_ptr, gres_ptr, part_ptr,
    P, C, HW, W, TILES,
    sgn, sgc, sgh, sgw,
    sxn, sxc, sxh, sxw,
    srn, src, srh, srw,
    son, soc, soh, sow,
    sdn, sdc, sdh, sdw,
    sen, sec, seh, sew,
    ACT: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    STORE_GRES: tl.constexpr, SUM_G: tl.constexpr, SUM_GX: tl.constexpr, GX: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, RECOMPUTE: tl.constexpr = False,
):
    """One pass over TILES*BLOCK_P consecutive positions for BLOCK_C channels.

    grad_ptr    (N, C, H, W) dL/dy, strides sg*; P = N*H*W, HW = H*W
    x_ptr       (N, C, H, W) input, strides sx* (read for RECOMPUTE, SUM_GX and GX == 2)
    scale_ptr, shift_ptr (C,) fp32 folded BN: z = x * scale + shift (HAS_SCALE / HAS_SHIFT)
    res_ptr     (N, C, H, W) residual, strides sr*: HAS_RESIDUAL, read only to recompute z
    out_ptr     (N, C, H, W) saved output y, strides so*: the relu family's mask unless RECOMPUTE
    RECOMPUTE   z recomputed from x (+ residual) for the activation's derivative: silu always,
                relu/relu6 when no output was saved (y = act(z) rounded to x's dtype, as stored)
    mean_ptr    (C,) fp32 mean (zeros without one) for SUM_GX and GX == 2
    k_ptr       (2, C) fp32 k0, k1 of bn_act_backward_combine_kernel (GX == 2)
    gx_ptr      (N, C, H, W) grad of x, strides sd*: GX 0 none, 1 gz * scale, 2 the training form
    gres_ptr    (N, C, H, W) grad of residual = gz, strides se* (STORE_GRES)
    part_ptr    (2, CHUNKS, C) fp32 partial sum(gz) (SUM_G) and sum(gz * (x - mean)) (SUM_GX) of
                chunk program_id(0); zeros for a sum not asked for
    Grid: (CHUNKS = cdiv(P, TILES*BLOCK_P), cdiv(C, BLOCK_C)).
    """
    chunk = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    c64 = c.to(tl.int64)
    LOAD_X: tl.constexpr = RECOMPUTE or SUM_GX or (GX == 2)
    if HAS_SCALE:
        scale = tl.load(scale_ptr + c, mask=c_ok, other=0.0)[None, :]
    if HAS_SHIFT:
        shift = tl.load(shift_ptr + c, mask=c_ok, other=0.0)[None, :]
    if SUM_GX or GX == 2:
        mean = tl.load(mean_ptr + c, mask=c_ok, other=0.0)[None, :]
    if GX == 2:
        k0 = tl.load(k_ptr + c, mask=c_ok, other=0.0)[None, :]
        k1 = tl.load(k_ptr + C + c, mask=c_ok, other=0.0)[None, :]
    s0 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    s1 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for i in range(TILES):
        p = (chunk * TILES + i) * BLOCK_P + tl.arange(0, BLOCK_P)
        ok = (p < P)[:, None] & c_ok[None, :]
        g_off = _position_offsets(p, HW, W, sgn, sgh, sgw)[:, None] + c64[None, :] * sgc
        gz = tl.load(grad_ptr + g_off, mask=ok, other=0.0).to(tl.float32)
        if LOAD_X:
            x_off = _position_offsets(p, HW, W, sxn, sxh, sxw)[:, None] + c64[None, :] * sxc
            x = tl.load(x_ptr + x_off, mask=ok, other=0.0).to(tl.float32)
        if RECOMPUTE:
            z = x
            if HAS_SCALE:
                z = z * scale
            if HAS_SHIFT:
                z = z + shift
            if HAS_RESIDUAL:
                r_off = _position_offsets(p, HW, W, srn, srh, srw)[:, None] + c64[None, :] * src
                z = z + tl.load(res_ptr + r_off, mask=ok, other=0.0).to(tl.float32)
            if ACT != 3:   # the relu family's mask: the output as the forward rounded it
                z = apply_act(z, ACT).to(x_ptr.dtype.element_ty).to(tl.float32)
            gz = act_grad(gz, z, ACT)
        elif ACT != 0:
            o_off = _position_offsets(p, HW, W, son, soh, sow)[:, None] + c64[None, :] * soc
            gz = act_grad(gz, tl.load(out_ptr + o_off, mask=ok, other=0.0).to(tl.float32), ACT)
        if STORE_GRES:
            e_off = _position_offsets(p, HW, W, sen, seh, sew)[:, None] + c64[None, :] * sec
            tl.store(gres_ptr + e_off, gz.to(gres_ptr.dtype.element_ty), mask=ok)
        if SUM_G:
            s0 += tl.sum(gz, axis=0)
        if SUM_GX:
            s1 += tl.sum(gz * (x - mean), axis=0)    # masked lanes: gz = 0
        if GX != 0:
            gx = gz
            if GX == 2:
                gx = gx - k0 - (x - mean) * k1
            if HAS_SCALE:
                gx = gx * scale
            d_off = _position_offsets(p, HW, W, sdn, sdh, sdw)[:, None] + c64[None, :] * sdc
            tl.store(gx_ptr + d_off, gx.to(gx_ptr.dtype.element_ty), mask=ok)
    if SUM_G or SUM_GX:
        base = part_ptr + chunk.to(tl.int64) * C + c
        tl.store(base, s0, mask=c_ok)
        tl.store(base + tl.num_programs(0) * C, s1, mask=c_ok)


@triton.jit
def bn_act_backward_combine_kernel(part_ptr, invstd_ptr, sums_ptr, C, CHUNKS, count,
                                   TRAINING: tl.constexpr, BLOCK_C: tl.constexpr):
    """Sum the (2, CHUNKS, C) partials in chunk order into sums (4, C) fp32:
    s0 = sum(gz), s1 = invstd * sum(gz * (x - mean)), and with TRAINING k0 = s0 / count,
    k1 = s1 * invstd / count (count = P). invstd_ptr (C,) fp32 (ones without statistics).
    Grid: (cdiv(C, BLOCK_C),)."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    s0 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    s1 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for i in range(CHUNKS):
        s0 += tl.load(part_ptr + i * C + c, mask=c_ok, other=0.0)
        s1 += tl.load(part_ptr + (CHUNKS + i) * C + c, mask=c_ok, other=0.0)
    invstd = tl.load(invstd_ptr + c, mask=c_ok, other=0.0)
    s1 = s1 * invstd
    tl.store(sums_ptr + c, s0, mask=c_ok)
    tl.store(sums_ptr + C + c, s1, mask=c_ok)
    if TRAINING:
        tl.store(sums_ptr + 2 * C + c, s0 / count, mask=c_ok)
        tl.store(sums_ptr + 3 * C + c, s1 * invstd / count, mask=c_ok)


# ---- blocks ----------------------------------------------------------------------------------
ELEMENTS = 2048      # elements per tile (4096 one channel wide spills on sm_90: int64 offsets)
# The backward addresses up to six tensors: 2048 one channel wide (NCHW) needs ~210 registers on
# sm_80/90, 1024 at most 144.
BACKWARD_ELEMENTS = 1024
NUM_WARPS = 4


def pick_blocks(channels: int, channels_contiguous: bool, elements: int = ELEMENTS) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_C) with `elements` per tile: up to 64 channels wide when channels are
    contiguous in memory (channels_last), else one channel (NCHW: positions are contiguous)."""
    bc = min(triton.next_power_of_2(channels), 64) if channels_contiguous else 1
    return elements // bc, bc


def all_blocks(elements: int = ELEMENTS) -> list[tuple[int, int]]:
    """Every (BLOCK_P, BLOCK_C) pick_blocks can return for `elements`."""
    return sorted({pick_blocks(c, cl, elements) for c in (1, 2, 4, 8, 16, 32, 64) for cl in (False, True)})
