"""Max / average pooling of a BN-act pre-activation, the BN-act applied as each window is read:

    out = pool(act(x * scale[c] + shift[c]))      HAS_SCALE, HAS_SHIFT, ACT; MAX or average

The input is seen as bn_act's [positions, channels] matrix, here over output positions (N*OH*OW),
through its four strides; a tile is [BLOCK_P output positions, BLOCK_C channels], the tiles of
kernels.bn_act.pick_blocks for ELEMENTS per tile. The R x S window is unrolled; a position
outside the input is skipped by max pooling and counts as 0 in the average (count_include_pad:
the divisor is R*S, which is the padded window's size whenever 2 * padding <= kernel, as the
launcher requires). A NaN in a window is its maximum, as in ATen. Math in fp32, one rounding to
the output's dtype; no argmax is kept (the backward recomputes it).
"""
from __future__ import annotations

import triton
import triton.language as tl

from fastres.kernels.conv import apply_act

ELEMENTS = 1024   # elements per tile: 2048 one channel wide spills on sm_90 (a 3x3 window's int64 offsets)


@triton.jit
def bn_act_pool2d_kernel(
    x_ptr, scale_ptr, shift_ptr, out_ptr,
    P, C, H, W, OHW, OW,
    sxn, sxc, sxh, sxw,
    son, soc, soh, sow,
    stride_h, stride_w, pad_h, pad_w,
    R: tl.constexpr, S: tl.constexpr, MAX: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, ACT: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """x_ptr (N, C, H, W); scale_ptr, shift_ptr (C,) fp32; out_ptr (N, C, OH, OW), P = N*OH*OW,
    OHW = OH*OW. Grid: (cdiv(P, BLOCK_P), cdiv(C, BLOCK_C))."""
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    p_ok = p < P
    c_ok = c < C
    c64 = c.to(tl.int64)
    n = (p // OHW).to(tl.int64)
    oh = (p % OHW) // OW
    ow = (p % OHW) % OW
    if HAS_SCALE:
        scale = tl.load(scale_ptr + c, mask=c_ok, other=0.0)[None, :]
    if HAS_SHIFT:
        shift = tl.load(shift_ptr + c, mask=c_ok, other=0.0)[None, :]
    if MAX:
        acc = tl.full((BLOCK_P, BLOCK_C), float("-inf"), tl.float32)
    else:
        acc = tl.zeros((BLOCK_P, BLOCK_C), tl.float32)
    for r in tl.static_range(R):
        ih = oh * stride_h - pad_h + r
        for s in tl.static_range(S):
            iw = ow * stride_w - pad_w + s
            inside = p_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            ok = inside[:, None] & c_ok[None, :]
            off = n * sxn + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw
            z = tl.load(x_ptr + (off[:, None] + c64[None, :] * sxc), mask=ok, other=0.0).to(tl.float32)
            if HAS_SCALE:
                z = z * scale
            if HAS_SHIFT:
                z = z + shift
            z = apply_act(z, ACT)
            if MAX:
                acc = tl.maximum(acc, tl.where(ok, z, float("-inf")), propagate_nan=tl.PropagateNan.ALL)
            else:
                acc += tl.where(ok, z, 0.0)
    if not MAX:
        acc = acc / (R * S)
    o_off = n * son + oh.to(tl.int64) * soh + ow.to(tl.int64) * sow
    tl.store(out_ptr + (o_off[:, None] + c64[None, :] * soc), acc.to(out_ptr.dtype.element_ty),
             mask=p_ok[:, None] & c_ok[None, :])
