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
Shifted sums never subtract two large sums, so a large mean does not cancel the variance away.
"""
from __future__ import annotations

import triton
import triton.language as tl

from fastres.kernels.conv import apply_act


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
        t_cnt = tl.sum(ok.to(tl.float32), axis=0)
        t_mean = tl.sum(v, axis=0) / tl.maximum(t_cnt, 1.0)
        d = tl.where(ok, v - t_mean[None, :], 0.0)
        cnt, mean, m2 = _merge(cnt, mean, m2, t_cnt, t_mean, tl.sum(d * d, axis=0))
    chunks = tl.num_programs(0)
    base = part_ptr + chunk.to(tl.int64) * C + c
    tl.store(base, cnt, mask=c_ok)
    tl.store(base + chunks * C, mean, mask=c_ok)
    tl.store(base + 2 * chunks * C, m2, mask=c_ok)


@triton.jit
def batch_stats_combine_kernel(part_ptr, mean_ptr, var_ptr, C, CHUNKS, BLOCK_C: tl.constexpr):
    """Merge the (3, CHUNKS, C) partials into mean (C,) and biased variance (C,), fp32.
    Grid: (cdiv(C, BLOCK_C),)."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    cnt = tl.zeros((BLOCK_C,), dtype=tl.float32)
    mean = tl.zeros((BLOCK_C,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for i in range(CHUNKS):
        base = part_ptr + i * C + c
        cnt, mean, m2 = _merge(cnt, mean, m2, tl.load(base, mask=c_ok, other=0.0),
                               tl.load(base + CHUNKS * C, mask=c_ok, other=0.0),
                               tl.load(base + 2 * CHUNKS * C, mask=c_ok, other=0.0))
    tl.store(mean_ptr + c, mean, mask=c_ok)
    tl.store(var_ptr + c, m2 / tl.maximum(cnt, 1.0), mask=c_ok)


# ---- blocks ----------------------------------------------------------------------------------
ELEMENTS = 2048      # elements per tile (4096 one channel wide spills on sm_90: int64 offsets)
NUM_WARPS = 4


def pick_blocks(channels: int, channels_contiguous: bool) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_C) of both kernels: up to 64 channels wide when channels are contiguous in
    memory (channels_last), else one channel (NCHW: positions are contiguous)."""
    bc = min(triton.next_power_of_2(channels), 64) if channels_contiguous else 1
    return ELEMENTS // bc, bc


def all_blocks() -> list[tuple[int, int]]:
    """Every (BLOCK_P, BLOCK_C) pick_blocks can return."""
    return sorted({pick_blocks(c, cl) for c in (1, 2, 4, 8, 16, 32, 64) for cl in (False, True)})
