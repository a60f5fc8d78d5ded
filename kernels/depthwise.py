"""Depthwise 2-D convolution (groups == input channels) as a direct kernel with a fused prologue
and epilogue.

No GEMM: a program owns a tile of BLOCK_M output pixels (flattened n, oh, ow) x BLOCK_C output
channels, loops over the R*S filter taps, multiplies each loaded input tile by the tap's
per-channel weight vector and accumulates in fp32. With a channel multiplier m (K = m*C) output
channel k reads input channel k // m. Grid: (row tiles, cdiv(K, BLOCK_C)), the row tiles those of
kernels/conv.py's `pixel_tile`.
Every tensor is addressed through its strides: channels_last (the fast layout: a tile row is a
contiguous channel vector), NCHW and channel slices of a larger buffer all work without copies.

Fused, each a `tl.constexpr` flag with the names and numerics of kernels/conv.py:
  prologue, on every loaded input tile:
    z = x * scale[c] + shift[c]     HAS_PRE_SCALE / HAS_PRE_SHIFT (a BN folded on the host), fp32
    a = pre_act(z)                  PRE_ACT
    a = 0 at padded pixels          re-zeroed AFTER the activation: pre_act(BN(0)) is not 0
    a rounded to x's dtype          (as the reference rounds its prologue output)
    a = a + addend                  HAS_ADDEND, rounded again
  epilogue, on the fp32 accumulator:
    out = act(acc + bias[k] + residual)   HAS_BIAS, HAS_RESIDUAL, ACT; cast to out's dtype
    the output's partial batch statistics STATS, its partial per-sample sums MEANS, as in
    kernels/conv.py

Work per output element: R*S multiply-adds and R*S input loads (neighbouring taps hit cache),
where the implicit-GEMM kernel, given 1-channel groups, pads each tap's reduction to a 16-wide
tl.dot chunk and the group's single output channel to a 32-wide tile.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import triton
import triton.language as tl

from fastres.kernels.conv import apply_act, pixel_tile, store_epilogue


@triton.jit
def depthwise_conv2d_kernel(
    x_ptr, w_ptr, bias_ptr, pre_scale_ptr, pre_shift_ptr, addend_ptr, res_ptr, out_ptr,
    N, H, W, OH, OW, K, MULT,
    sxn, sxc, sxh, sxw,
    san, sac, sah, saw,
    swk, swr, sws,
    srn, src, srh, srw, res_k,
    son, soc, soh, sow,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    R: tl.constexpr, S: tl.constexpr,
    HAS_ADDEND: tl.constexpr, HAS_PRE_SCALE: tl.constexpr, HAS_PRE_SHIFT: tl.constexpr,
    PRE_ACT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ACT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, stats_ptr=None, STATS: tl.constexpr = False,
    means_ptr=None, MEANS: tl.constexpr = False,
):
    """out = act(depthwise_conv2d(pre_act(x * pre_scale + pre_shift) + addend, w) + bias + residual).

    x_ptr       (N, C, H, W)        input, any strides (sx*)
    w_ptr       (K, 1, R, S)        weight, K = MULT * C, strides (swk, swr, sws), x's dtype
    bias_ptr    (K,)                epilogue bias (HAS_BIAS), any float dtype, added in fp32
    pre_scale_ptr, pre_shift_ptr (C,) fp32 prologue affine (HAS_PRE_SCALE / HAS_PRE_SHIFT)
    addend_ptr  (N, C, H, W)        prologue addend (HAS_ADDEND), x's dtype, strides sa*
    res_ptr     (N, res_k, OH, OW)  epilogue residual (HAS_RESIDUAL), strides sr*, added to the
                                    first res_k <= K output channels
    out_ptr     (N, K, OH, OW)      output, strides so*
    MULT                            channel multiplier: output channel k reads input channel k // MULT
    stride_*, pad_*, dil_*          the convolution's geometry; R, S the filter size
    stats_ptr   (3, row tiles, K) fp32 partial statistics of the output (STATS)
    means_ptr   (N, cdiv(OH*OW, BLOCK_M), K) fp32 partial spatial sums of the output (MEANS, with
                                    per-sample row tiles), as in kernels/conv.py
    Pointers of absent optional inputs may be any tensor (never read).
    """
    n, oh, ow, m_ok = pixel_tile(tl.program_id(0), N, OH, OW, BLOCK_M, MEANS)

    k = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    k_ok = k < K
    k64 = k.to(tl.int64)
    cx = (k // MULT).to(tl.int64)                    # the input channel each output channel reads
    w_k = w_ptr + k64 * swk
    if HAS_PRE_SCALE:
        scale = tl.load(pre_scale_ptr + cx, mask=k_ok, other=0.0)[None, :]
    if HAS_PRE_SHIFT:
        shift = tl.load(pre_shift_ptr + cx, mask=k_ok, other=0.0)[None, :]

    ih0 = oh * stride_h - pad_h
    iw0 = ow * stride_w - pad_w
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for tap in range(R * S):
        r = tap // S
        s = tap - r * S
        ih = ih0 + r * dil_h
        iw = iw0 + s * dil_w
        pix_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        a_ok = pix_ok[:, None] & k_ok[None, :]
        x_pix = n * sxn + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw
        a = tl.load(x_ptr + (x_pix[:, None] + cx[None, :] * sxc), mask=a_ok, other=0.0)
        if HAS_PRE_SCALE or HAS_PRE_SHIFT or PRE_ACT != 0:
            z = a.to(tl.float32)
            if HAS_PRE_SCALE:
                z = z * scale
            if HAS_PRE_SHIFT:
                z = z + shift
            z = apply_act(z, PRE_ACT)
            a = tl.where(a_ok, z, 0.0).to(x_ptr.dtype.element_ty)
        if HAS_ADDEND:   # zero at padded pixels, like a
            a_pix = n * san + ih.to(tl.int64) * sah + iw.to(tl.int64) * saw
            add = tl.load(addend_ptr + (a_pix[:, None] + cx[None, :] * sac), mask=a_ok, other=0.0)
            a = (a.to(tl.float32) + add.to(tl.float32)).to(x_ptr.dtype.element_ty)   # + addend, rounded
        wt = tl.load(w_k + (r * swr + s * sws), mask=k_ok, other=0.0)                # [BLOCK_C]
        acc += a.to(tl.float32) * wt.to(tl.float32)[None, :]

    store_epilogue(acc, bias_ptr, res_ptr, out_ptr, n, oh, ow, m_ok, k, k_ok, srn, src, srh, srw, res_k,
                   son, soc, soh, sow, HAS_BIAS, HAS_RESIDUAL, ACT, stats_ptr, K, STATS, means_ptr, MEANS)


# ---- configs ---------------------------------------------------------------------------------
class Config(NamedTuple):
    BLOCK_M: int
    BLOCK_C: int
    num_warps: int


ELEMENTS = 2048     # outputs per tile: 16 fp32 accumulators per thread at 4 warps
NUM_WARPS = 4
WIDTHS = (8, 16, 32, 64)   # channels per tile (channels_last); at least one 32-byte sector per pixel


def unsupported(in_channels: int, out_channels: int, groups: int) -> Optional[str]:
    """Why the depthwise kernel cannot run this grouped conv (None when it can)."""
    if groups != in_channels:
        return f"groups ({groups}) != input channels ({in_channels}): not a depthwise conv"
    if out_channels % in_channels:
        return f"output channels ({out_channels}) are not a multiple of the input channels ({in_channels})"
    return None


def pick_config(out_channels: int, channels_contiguous: bool, elem_bytes: int) -> Config:
    """The tile. channels_last: of the widths that load whole 32-byte sectors per pixel, the one
    that pads K least (the widest of equals; K = 72 takes 16 + ... + 8 masked, not 64 + 56);
    fewer channels than one sector: K rounded up to a power of two. NCHW: one channel wide
    (neighbouring pixels are contiguous)."""
    if not channels_contiguous:
        bc = 1
    else:
        widths = [b for b in WIDTHS if b * elem_bytes >= 32]
        if out_channels <= widths[0]:
            bc = triton.next_power_of_2(out_channels)
        else:
            bc = min(widths, key=lambda b: (triton.cdiv(out_channels, b) * b, -b))
    return Config(ELEMENTS // bc, bc, NUM_WARPS)


def all_configs(elem_bytes: int) -> list[Config]:
    """Every config pick_config can return for this element size."""
    return sorted({pick_config(k, cl, elem_bytes) for k in range(1, 2 * WIDTHS[-1] + 1) for cl in (False, True)})
