"""Implicit-GEMM 2-D convolution with a fused prologue and epilogue.

GEMM view, per group g: rows are the N*OH*OW output pixels, columns the K/G output channels of
the group, the reduction runs over the R*S filter taps times the C/G input channels (one flat loop
over taps x channel chunks of BLOCK_C). Grid: (row tiles of BLOCK_M pixels, cdiv(K/G, BLOCK_N), G),
the row tiles `pixel_tile`'s.

Narrow groups (ResNeXt's 4-32 channels per group) would leave most of a 16-to-64-wide tl.dot
tile empty, so with PACK_GROUPS one program computes GPT consecutive groups: its columns are
their GPT*K/G output channels, its reduction chunk their GPT*C/G input channels (contiguous in
channels_last), and the weight tile is block-diagonal (zero where a column's group is not the
row's). One dot then does the work of GPT tiny ones; grid (row tiles, 1, cdiv(G, GPT)). The
tile's channel extents GPT*C/G and GPT*K/G are runtime arguments (so the tile shape alone picks
the compiled variant, and their divisibility by 16 tells the compiler that a tile's channel run
is aligned for vector and async copies).
Every tensor is addressed through its four strides, so channels_last (the fast layout: the
channel chunk is contiguous), NCHW and channel slices of a larger buffer all work without copies.

Fused, each a `tl.constexpr` flag (every variant is its own specialised kernel):
  prologue, on every loaded input tile, before the dot:
    x = sum_i mix[i] * x_i          NUM_MIX > 0: a weighted sum of NUM_MIX equally strided inputs
                                    (slots of one buffer, s_mix elements apart), fp32, rounded to
                                    x's dtype; DAG connectivity (fastres.ops.mix)
    z = x * scale[c] + shift[c]     HAS_PRE_SCALE / HAS_PRE_SHIFT (a BN folded on the host), fp32
    a = pre_act(z)                  PRE_ACT
    a = 0 at padded pixels          re-zeroed AFTER the activation: pre_act(BN(0)) is not 0
    a rounded to x's dtype          (the reference rounds its prologue output the same way)
    a = a + addend                  HAS_ADDEND (Res2Net's relu(bn(x_i)) + y_{i-1}), rounded again
  epilogue, on the fp32 accumulator:
    out = act(acc + bias[k] + residual)   HAS_BIAS, HAS_RESIDUAL, ACT; cast to out's dtype
    per-channel (count, mean, M2) of the tile's rows of the stored (rounded) out, STATS: the
                                    partial batch statistics of the BN that follows in training,
                                    merged by kernels/bn_act.py's batch_stats_combine_kernel, so
                                    that BN takes no pass of its own over the output
    per-channel sum of the tile's rows of the stored out, MEANS: with row tiles that never cross
                                    a sample (PER_SAMPLE tiling, `pixel_tile`), the partial
                                    spatial sums of each sample's channels, whose means a
                                    squeeze-excitation that follows needs (no pass of its own)

Activations are coded as ints (ACTS below). Offsets into x, addend, residual and out are int64.
"""
from __future__ import annotations

from typing import NamedTuple

import triton
import triton.language as tl

ACTS = {"identity": 0, "relu": 1, "relu6": 2, "silu": 3}


@triton.jit
def apply_act(z, ACT: tl.constexpr):
    """z -> act(z) for ACT in ACTS (fp32 in, fp32 out)."""
    if ACT == 1:
        z = tl.maximum(z, 0.0)
    elif ACT == 2:
        z = tl.minimum(tl.maximum(z, 0.0), 6.0)
    elif ACT == 3:
        z = z / (1.0 + tl.exp(-z))
    return z


@triton.jit
def tile_moments(v, ok):
    """(count, mean, M2) per column of the fp32 tile v over its rows where `ok` (a mask that
    broadcasts to v: [rows, 1] or [rows, cols]); an exact two-pass mean and M2 of the values held
    in registers, which Chan's merge (kernels/bn_act.py) combines across tiles without cancellation."""
    cnt = tl.sum(ok.to(tl.float32), axis=0)
    v = tl.where(ok, v, 0.0)
    mean = tl.sum(v, axis=0) / tl.maximum(cnt, 1.0)
    d = tl.where(ok, v - mean[None, :], 0.0)
    return cnt, mean, tl.sum(d * d, axis=0)


@triton.jit
def conv2d_kernel(
    x_ptr, w_ptr, bias_ptr, pre_scale_ptr, pre_shift_ptr, addend_ptr, res_ptr, out_ptr,
    N, H, W, OH, OW, CG, KG, G, TILE_CG, TILE_KG,
    sxn, sxc, sxh, sxw,
    san, sac, sah, saw,
    swk, swc, swr, sws,
    srn, src, srh, srw, res_k,
    son, soc, soh, sow,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    R: tl.constexpr, S: tl.constexpr,
    HAS_ADDEND: tl.constexpr, HAS_PRE_SCALE: tl.constexpr, HAS_PRE_SHIFT: tl.constexpr,
    PRE_ACT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ACT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
    mix_ptr=None, s_mix=0, NUM_MIX: tl.constexpr = 0, PACK_GROUPS: tl.constexpr = False,
    stats_ptr=None, STATS: tl.constexpr = False, means_ptr=None, MEANS: tl.constexpr = False,
):
    """out = act(conv2d(pre_act(x * pre_scale + pre_shift) + addend, w) + bias + residual).

    x_ptr       (N, G*CG, H, W)     input, any strides (sx*)
    w_ptr       (G*KG, CG, R, S)    weight, any strides (sw*), x's dtype
    bias_ptr    (G*KG,)             epilogue bias (HAS_BIAS), any float dtype, added in fp32
    pre_scale_ptr, pre_shift_ptr (G*CG,) fp32 prologue affine (HAS_PRE_SCALE / HAS_PRE_SHIFT)
    addend_ptr  (N, G*CG, H, W)     prologue addend (HAS_ADDEND), x's dtype, strides sa*
    res_ptr     (N, res_k, OH, OW)  epilogue residual (HAS_RESIDUAL), strides sr*, added to the
                                    first res_k <= G*KG output channels
    out_ptr     (N, G*KG, OH, OW)   output, strides so*
    CG, KG, G                       input and output channels per group, groups
    TILE_CG, TILE_KG                input and output channels of the groups one program computes:
                                    CG, KG, or with PACK_GROUPS those of GPT consecutive groups,
                                    GPT*CG and GPT*KG (block-diagonal weight tile)
    stride_*, pad_*, dil_*          the convolution's geometry; R, S the filter size
    DOT_PRECISION                   tl.dot input_precision ("ieee" or "tf32"; ignored for 16-bit)
    mix_ptr     (NUM_MIX,)          fp32 weights of the NUM_MIX sum; x_ptr points at input 0, input
                                    i starts i * s_mix elements further, with x's strides (NUM_MIX
                                    is a count, unrolled: one specialisation per count)
    stats_ptr   (3, row tiles, G*KG) fp32 partial statistics of the output (STATS): count, mean,
                                    M2 of row tile program_id(0), per channel
    means_ptr   (N, cdiv(OH*OW, BLOCK_M), G*KG) fp32 partial spatial sums of the output (MEANS),
                                    which also makes the row tiles per sample (grid dimension 0
                                    is then N * cdiv(OH*OW, BLOCK_M), else cdiv(N*OH*OW, BLOCK_M))
    DOT_UPCAST                      feed tl.dot fp32 copies of the tiles: only for bf16 under
                                    TRITON_INTERPRET=1, whose dot multiplies bf16's raw bits;
                                    bf16 x bf16 products are exact in fp32, so numerics match
    Pointers of absent optional inputs may be any tensor (never read).
    """
    pid_n = tl.program_id(1)
    c0 = tl.program_id(2) * TILE_CG                          # the tile's first input channel
    n, oh, ow, m_ok = pixel_tile(tl.program_id(0), N, OH, OW, BLOCK_M, MEANS)

    offs_k = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.program_id(2) * TILE_KG + offs_k
    if PACK_GROUPS:
        k_ok = (offs_k < TILE_KG) & (k < G * KG)
        k_grp = offs_k // KG                                 # column's group within the tile
    else:
        k_ok = offs_k < KG
    w_k = w_ptr + k.to(tl.int64) * swk                       # [BLOCK_N] pointers
    offs_c = tl.arange(0, BLOCK_C)

    ih0 = oh * stride_h - pad_h
    iw0 = ow * stride_w - pad_w
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # one flat loop over taps x channel chunks, so the software pipeliner sees every iteration
    chunks = tl.cdiv(TILE_CG, BLOCK_C)
    for it in range(R * S * chunks):
        tap = it // chunks
        c = (it - tap * chunks) * BLOCK_C + offs_c
        r = tap // S
        s = tap - r * S
        ih = ih0 + r * dil_h
        iw = iw0 + s * dil_w
        pix_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        if PACK_GROUPS:
            c_ok = (c < TILE_CG) & (c0 + c < G * CG)
        else:
            c_ok = c < CG
        cx = (c0 + c).to(tl.int64)                                               # input channel
        a_ok = pix_ok[:, None] & c_ok[None, :]
        x_pix = n * sxn + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw           # [BLOCK_M]
        x_off = x_pix[:, None] + cx[None, :] * sxc
        a = tl.load(x_ptr + x_off, mask=a_ok, other=0.0)
        if HAS_ADDEND:   # zero at padded pixels, like a
            a_pix = n * san + ih.to(tl.int64) * sah + iw.to(tl.int64) * saw
            add = tl.load(addend_ptr + (a_pix[:, None] + cx[None, :] * sac), mask=a_ok, other=0.0)
        if NUM_MIX > 0:   # unrolled: a runtime loop here would stop the pipelining of the loads
            zm = a.to(tl.float32) * tl.load(mix_ptr)
            for i in tl.static_range(1, NUM_MIX):
                xi = tl.load(x_ptr + (i * (s_mix + tl.zeros((), tl.int64)) + x_off), mask=a_ok, other=0.0)
                zm += xi.to(tl.float32) * tl.load(mix_ptr + i)
            a = zm.to(x_ptr.dtype.element_ty)                                    # sum_i mix_i x_i, rounded
        if HAS_PRE_SCALE or HAS_PRE_SHIFT or PRE_ACT != 0:
            z = a.to(tl.float32)
            if HAS_PRE_SCALE:
                z = z * tl.load(pre_scale_ptr + cx, mask=c_ok, other=0.0)[None, :]
            if HAS_PRE_SHIFT:
                z = z + tl.load(pre_shift_ptr + cx, mask=c_ok, other=0.0)[None, :]
            z = apply_act(z, PRE_ACT)
            a = tl.where(a_ok, z, 0.0).to(x_ptr.dtype.element_ty)
        if HAS_ADDEND:
            a = (a.to(tl.float32) + add.to(tl.float32)).to(x_ptr.dtype.element_ty)   # + addend, rounded
        if PACK_GROUPS:   # block-diagonal: row c feeds column k only when both are of the same group
            c_grp = c // CG
            b = tl.load(w_k[None, :] + ((c - c_grp * CG)[:, None] * swc + r * swr + s * sws),
                        mask=c_ok[:, None] & k_ok[None, :] & (c_grp[:, None] == k_grp[None, :]), other=0.0)
        else:
            b = tl.load(w_k[None, :] + (c[:, None] * swc + r * swr + s * sws),
                        mask=c_ok[:, None] & k_ok[None, :], other=0.0)           # [BLOCK_C, BLOCK_N]
        if DOT_UPCAST:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)

    store_epilogue(acc, bias_ptr, res_ptr, out_ptr, n, oh, ow, m_ok, k, k_ok, srn, src, srh, srw, res_k,
                   son, soc, soh, sow, HAS_BIAS, HAS_RESIDUAL, ACT, stats_ptr, G * KG, STATS, means_ptr, MEANS)


@triton.jit
def pixel_tile(pid, N, OH, OW, BLOCK_M: tl.constexpr, PER_SAMPLE: tl.constexpr):
    """(n int64, oh, ow, ok) of the BLOCK_M output pixels of row tile `pid`, in (n, oh, ow) order.
    Tiles run over the N*OH*OW pixels as one flat range, or with PER_SAMPLE over each sample's
    OH*OW pixels apart (cdiv(OH*OW, BLOCK_M) tiles a sample, the last one masked), so that a
    tile's column sums belong to one sample."""
    if PER_SAMPLE:
        tiles = tl.cdiv(OH * OW, BLOCK_M)
        p = (pid % tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
        ok = p < OH * OW
        p += (pid // tiles) * (OH * OW)          # the flat index, as below
    else:
        p = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        ok = p < N * OH * OW
    ow = p % OW
    t = p // OW
    oh = t % OH
    n = (t // OH).to(tl.int64)
    return n, oh, ow, ok


@triton.jit
def store_epilogue(acc, bias_ptr, res_ptr, out_ptr, n, oh, ow, m_ok, k, k_ok, srn, src, srh, srw, res_k,
                   son, soc, soh, sow, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ACT: tl.constexpr,
                   stats_ptr, K, STATS: tl.constexpr, means_ptr, MEANS: tl.constexpr):
    """out[n, k, oh, ow] = act(acc + bias[k] + residual[n, k, oh, ow]), cast to out's dtype: the
    epilogue of every conv kernel; the residual has res_k channels, zero beyond. acc [BLOCK_M
    pixels, BLOCK_N channels] fp32; n int64. STATS: also the (count, mean, M2) of this tile's rows
    of the stored out, per channel, into the (3, num_programs(0), K) partials at stats_ptr (row
    tile program_id(0)). MEANS: also their sum per channel, into the (num_programs(0), K) partials
    at means_ptr (the tile's rows all of one sample: `pixel_tile` with PER_SAMPLE)."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + k, mask=k_ok, other=0.0).to(tl.float32)[None, :]
    out_ok = m_ok[:, None] & k_ok[None, :]
    k64 = k.to(tl.int64)
    if HAS_RESIDUAL:
        r_pix = n * srn + oh.to(tl.int64) * srh + ow.to(tl.int64) * srw
        r_ok = out_ok & (k < res_k)[None, :]
        acc += tl.load(res_ptr + (r_pix[:, None] + k64[None, :] * src), mask=r_ok, other=0.0).to(tl.float32)
    acc = apply_act(acc, ACT)
    o_pix = n * son + oh.to(tl.int64) * soh + ow.to(tl.int64) * sow
    out = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + (o_pix[:, None] + k64[None, :] * soc), out, mask=out_ok)
    if STATS:   # of the values stored, as a separate pass over out would see them; the row mask
        # alone (columns past K are not stored) keeps the count one value per tile
        cnt, mean, m2 = tile_moments(out.to(tl.float32), m_ok[:, None])
        base = stats_ptr + tl.program_id(0).to(tl.int64) * K + k64
        part = tl.num_programs(0).to(tl.int64) * K
        tl.store(base, tl.zeros_like(mean) + cnt, mask=k_ok)
        tl.store(base + part, mean, mask=k_ok)
        tl.store(base + 2 * part, m2, mask=k_ok)
    if MEANS:   # of the values stored, as the SE's mean over the output would see them
        total = tl.sum(tl.where(m_ok[:, None], out.to(tl.float32), 0.0), axis=0)
        tl.store(means_ptr + tl.program_id(0).to(tl.int64) * K + k64, total, mask=k_ok)


# ---- configs ---------------------------------------------------------------------------------
class Config(NamedTuple):
    BLOCK_M: int
    BLOCK_N: int
    BLOCK_C: int
    num_warps: int
    num_stages: int
    PACK_GROUPS: bool = False   # the launcher packs groups_per_tile(...) groups per program


NUM_WARPS = 4     # 8 warps gave wrong tl.dot results in conv kernels (triton#1254)
NUM_STAGES = 3
BLOCK_M = 64       # 128 rows with a fused prologue spill on sm_80 and sm_90 (4 warps)
BLOCK_NS = (32, 64, 128)    # output channels per tile: the smallest that covers K/G, capped
BLOCK_CS = (16, 32, 64)     # input channels per chunk: 128 bytes at most (64 x 16-bit, 32 x fp32)
CHUNK_BYTES = 128  # per pixel, of a channel chunk
PACK_BYTES = 64    # per pixel, of a packed-groups tile
MAX_MIX = 8        # inputs a NUM_MIX sum takes: each one's tile is staged in shared memory
MIX_BYTES = 384    # above 3 inputs, NUM_MIX x BLOCK_C x element size per pixel is capped at this


def _cover(n: int, choices: tuple[int, ...]) -> int:
    return next((b for b in choices if b >= n), choices[-1])


def groups_per_tile(channels_per_group: int, out_channels_per_group: int, groups: int, elem_bytes: int) -> int:
    """How many groups one program packs: the most (a power of two, at most `groups` rounded up)
    whose channels fit a PACK_BYTES-wide tile both ways; 1 when not even two fit. A tile of g
    groups issues g times the useful multiply-adds, but loads each pixel's channels as one
    contiguous run of two sectors instead of a narrow masked load per group. Counted in the
    interpreter (fastres.traffic access sectors), bf16 3x3 convs of resnext50_32x4d: 4 channels
    per group, 1568 -> 196 programs, 25% -> 86% of each fetched sector used, tile MACs 32x -> 8x
    the useful ones; 8 per group 50% -> 90%, 8.5x -> 4.2x; 16 and 32 per group no worse either
    way. A 128-byte tile would be no better coalesced and issue twice the MACs."""
    fit = (PACK_BYTES // elem_bytes) // max(channels_per_group, out_channels_per_group)
    if groups < 2 or fit < 2:
        return 1
    return min(1 << (fit.bit_length() - 1), triton.next_power_of_2(groups))


def pick_config(channels_per_group: int, out_channels_per_group: int, elem_bytes: int, num_mix: int = 0,
                groups: int = 1) -> Config:
    """The tile for one conv: BLOCK_N covers K/G, BLOCK_C covers C/G, both capped (a chunk of at
    most CHUNK_BYTES per pixel, so an fp32 A+B stage fits shared memory three times over). A sum of
    `num_mix` > 3 inputs stages that many A tiles: its chunk shrinks to MIX_BYTES / num_mix.
    Narrow groups are packed `groups_per_tile` to a program, the tile covering all of theirs."""
    gpt = 1 if num_mix else groups_per_tile(channels_per_group, out_channels_per_group, groups, elem_bytes)
    if gpt > 1:
        return Config(BLOCK_M, max(16, triton.next_power_of_2(gpt * out_channels_per_group)),
                      max(16, triton.next_power_of_2(gpt * channels_per_group)), NUM_WARPS, NUM_STAGES, True)
    limit = CHUNK_BYTES if num_mix <= 3 else MIX_BYTES // num_mix
    cs = tuple(b for b in BLOCK_CS if b * elem_bytes <= limit) or BLOCK_CS[:1]
    return Config(BLOCK_M, _cover(out_channels_per_group, BLOCK_NS), _cover(channels_per_group, cs),
                  NUM_WARPS, NUM_STAGES)


def all_configs(elem_bytes: int, num_mix: int = 0) -> list[Config]:
    """Every config pick_config can return for this element size (and NUM_MIX count)."""
    configs = {pick_config(c, k, elem_bytes, num_mix) for c in BLOCK_CS for k in BLOCK_NS}
    if not num_mix:
        width = CHUNK_BYTES // elem_bytes
        configs |= {pick_config(c, k, elem_bytes, groups=g) for c in range(1, width + 1)
                    for k in range(1, width + 1) for g in (2, 3, 5, 9, 17, 33, 1024)}
    return sorted(configs)
