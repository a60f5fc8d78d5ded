"""The triton backend of conv2d, bn_act and batch_stats on CPU under TRITON_INTERPRET=1, against a
float64 run of the reference: every fusion flag, fp32 and bf16, odd shapes, layouts, every tile
config the launcher can pick. Run by tests/ops/test_triton.py in a subprocess (see conftest.py)."""
import os
import sys

import pytest

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 for the whole process (run via tests/ops/test_triton.py)",
                allow_module_level=True)

import torch  # noqa: E402
from torch.library import opcheck  # noqa: E402

import fastres  # noqa: E402
from fastres import backend as B  # noqa: E402
from fastres.ops import ACTS  # noqa: E402
from fastres.ops import bn_act as bn_act_ops  # noqa: E402
from fastres.ops.conv import conv2d_triton  # noqa: E402
from tests.utils import assert_as_accurate, assert_close  # noqa: E402

from fastres.kernels import conv as KC  # noqa: E402  (after TRITON_INTERPRET is known to be set)

ops = torch.ops.fastres
CL = torch.channels_last
DTYPES = [torch.float32, torch.bfloat16]
IDS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def test_kernels_are_interpreted():
    from triton.runtime.interpreter import InterpretedFunction
    assert isinstance(KC.conv2d_kernel, InterpretedFunction), "kernels were decorated before TRITON_INTERPRET=1"
    assert "triton" in fastres.available_backends("cpu")


def _f64(args):
    return tuple(a.double() if isinstance(a, torch.Tensor) else a for a in args)


def _ran_on_triton(fn):
    with B.recording() as rec:
        out = fn()
    assert rec and all(r[2] == "triton" for r in rec), rec
    return out


def _check(actual, args, op, dtype, name=""):
    """actual vs the float64 reference; bf16 may be as far off as twice eager bf16 is."""
    oracle = op(*_f64(args), "reference")
    if dtype == torch.float32:
        assert_close(actual, oracle, dtype=dtype, name=name)
    else:
        assert_as_accurate(actual, op(*args, "reference"), oracle, dtype=dtype, name=name)


# ---- conv2d ------------------------------------------------------------------------------------
# name: (N, C, H, W, K, (R, S), stride, padding, dilation, groups)
GEOMETRIES = {
    "odd15": (2, 37, 15, 15, 50, (3, 3), (1, 1), (1, 1), (1, 1), 1),
    "stride2": (2, 37, 15, 15, 50, (3, 3), (2, 2), (1, 1), (1, 1), 1),
    "dilation2": (1, 16, 15, 15, 24, (3, 3), (1, 1), (2, 2), (2, 2), 1),
    "groups32x4": (1, 128, 7, 7, 128, (3, 3), (1, 1), (1, 1), (1, 1), 32),   # ResNeXt: packed groups
    "groups8_6to5": (2, 48, 5, 5, 40, (3, 3), (1, 1), (1, 1), (1, 1), 8),    # C/G=6, K/G=5: not powers of 2
    "groups15_s2": (1, 60, 7, 7, 60, (3, 3), (2, 2), (1, 1), (1, 1), 15),    # a partial last tile of groups
    "groups2x32": (1, 64, 5, 5, 64, (3, 3), (1, 1), (1, 1), (1, 1), 2),      # two per tile in 16-bit only
    "1x1spatial": (3, 20, 1, 1, 30, (1, 1), (1, 1), (0, 0), (1, 1), 1),
    "3x3_on_1x1": (2, 24, 1, 1, 16, (3, 3), (1, 1), (1, 1), (1, 1), 1),   # all taps but one padded
    "down1x1": (2, 24, 8, 8, 40, (1, 1), (2, 2), (0, 0), (1, 1), 1),
    "stem7x7": (1, 3, 16, 16, 16, (7, 7), (2, 2), (3, 3), (1, 1), 1),
    "rect1x3": (1, 12, 9, 7, 20, (1, 3), (1, 2), (0, 1), (1, 1), 1),
}
ALL = dict(pre="bn", pre_act="relu", addend=True, bias=True, residual=True, act="silu")


def conv_args(geom, dtype, *, pre=None, pre_act="identity", pre_training=False, addend=False,
              bias=False, residual=False, act="identity", x_cl=True, w_cl=True):
    """Positional args of ops.conv2d (without the backend). pre: None, 'bn' (all four BN tensors),
    or a subset of 'w', 'b', 'm' (mean and invstd). residual "partial": on the first 2/3 of the
    output channels, ReXNet's shortcut."""
    n, c, h, w, k, (r, s), stride, padding, dilation, groups = geom
    fmt = (lambda t: t.to(memory_format=CL))
    x = torch.randn(n, c, h, w).to(dtype)
    x = fmt(x) if x_cl else x
    wt = (torch.randn(k, c // groups, r, s) * (c // groups * r * s) ** -0.5).to(dtype)
    wt = fmt(wt) if w_cl else wt
    pre = "wbm" if pre == "bn" else (pre or "")
    pw = torch.rand(c) + 0.5 if "w" in pre else None
    pb = torch.randn(c) if "b" in pre else None
    pm, pi = (torch.randn(c), torch.rand(c) + 0.5) if "m" in pre else (None, None)
    if pre_training:
        var, pm = torch.var_mean(x.float(), (0, 2, 3), correction=0)
        pi = torch.rsqrt(var + 1e-5)
    add = torch.randn_like(x) if addend else None
    oh = (h + 2 * padding[0] - dilation[0] * (r - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (s - 1) - 1) // stride[1] + 1
    res = torch.randn(n, k * 2 // 3 if residual == "partial" else k, oh, ow).to(dtype) if residual else None
    if res is not None and x_cl:
        res = fmt(res)
    b = torch.randn(k).to(dtype) if bias else None
    return (x, wt, b, list(stride), list(padding), list(dilation), groups, pw, pb, pm, pi, pre_act,
            pre_training, add, res, act)


def _check_conv(args, dtype, name=""):
    y = _ran_on_triton(lambda: ops.conv2d(*args, "triton"))
    _check(y, args, ops.conv2d, dtype, name)
    eager = ops.conv2d(*args, "reference")
    for fmt in (CL, torch.contiguous_format):
        assert y.is_contiguous(memory_format=fmt) == eager.is_contiguous(memory_format=fmt), f"{name}: {fmt}"
    return y


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
@pytest.mark.parametrize("geom", list(GEOMETRIES))
def test_conv2d_geometry_all_fusions(geom, dtype):
    _check_conv(conv_args(GEOMETRIES[geom], dtype, **ALL), dtype, geom)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
@pytest.mark.parametrize("geom", ["odd15", "groups32x4", "3x3_on_1x1"])
def test_conv2d_geometry_plain(geom, dtype):
    _check_conv(conv_args(GEOMETRIES[geom], dtype), dtype, geom)


SMALL = (2, 37, 6, 6, 50, (3, 3), (1, 1), (1, 1), (1, 1), 1)
FUSIONS = {
    "pre_weight": dict(pre="w"),
    "pre_bias": dict(pre="b"),            # shift only: padded pixels must stay 0, not BN(0)
    "pre_stats": dict(pre="m"),
    "pre_bn": dict(pre="bn"),
    "pre_train": dict(pre="wb", pre_training=True, pre_act="relu"),
    "addend": dict(addend=True),
    "addend_pre": dict(addend=True, pre="bn", pre_act="relu6"),
    "bias": dict(bias=True),
    "residual": dict(residual=True),
    "bias_residual": dict(bias=True, residual=True, act="relu"),
    "partial_residual": dict(bias=True, residual="partial", act="relu6"),
    **{f"pre_act_{a}": dict(pre="bn", pre_act=a) for a in ACTS},
    **{f"act_{a}": dict(bias=True, act=a) for a in ACTS},
}


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
@pytest.mark.parametrize("fusion", list(FUSIONS))
def test_conv2d_fusion(fusion, dtype):
    _check_conv(conv_args(SMALL, dtype, **FUSIONS[fusion]), dtype, fusion)


def test_conv2d_padding_rezeroed_after_prologue():
    """relu(BN(0)) = relu(shift) > 0 must not leak into the border: a pure-shift prologue on a
    padded conv of zeros gives exactly what the interior taps see."""
    x = torch.zeros(1, 16, 4, 4).to(memory_format=CL)
    w = torch.ones(16, 16, 3, 3).to(memory_format=CL)
    args = (x, w, None, [1, 1], [1, 1], [1, 1], 1, None, torch.ones(16), None, None, "relu", False,
            None, None, "identity")
    y = ops.conv2d(*args, "triton")
    taps = torch.tensor([[4, 6, 6, 4], [6, 9, 9, 6], [6, 9, 9, 6], [4, 6, 6, 4]], dtype=torch.float32)
    torch.testing.assert_close(y, (16 * taps).expand(1, 16, 4, 4), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
@pytest.mark.parametrize("layout", ["x_nchw", "w_nchw", "both_nchw"])
def test_conv2d_layouts(layout, dtype):
    args = conv_args(SMALL, dtype, **ALL, x_cl=layout == "w_nchw", w_cl=layout == "x_nchw")
    _check_conv(args, dtype, layout)


def test_conv2d_channel_slice_input():
    """A channel slice of a channels_last buffer (Res2Net's split) goes in without a copy."""
    buf = torch.randn(2, 64, 7, 7).to(memory_format=CL)
    args = list(conv_args((2, 24, 7, 7, 16, (3, 3), (1, 1), (1, 1), (1, 1), 1), torch.float32, **ALL))
    args[0] = buf[:, 8:32]
    args[13] = buf[:, 32:56]
    _check_conv(tuple(args), torch.float32, "slice")


# tiles: (geometry, packed-groups tiles or the others, how many there are at least in 16-bit)
EVERY_CONFIG = {
    # C=37, K=50, M=50 < BLOCK_M: several tiles need multiple channel chunks and output-channel tiles
    "plain": ((2, 37, 5, 5, 50, (3, 3), (1, 1), (1, 1), (1, 1), 1), False, 6),
    # C/G=6, K/G=5, 8 groups: the narrow packed tiles split the packed groups' channels into
    # several chunks and their columns into several tiles
    "packed": ((2, 48, 5, 5, 40, (3, 3), (1, 1), (1, 1), (1, 1), 8), True, 4),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=IDS.get)
@pytest.mark.parametrize("tiles", list(EVERY_CONFIG))
def test_conv2d_every_config(tiles, dtype):
    """Every tile the heuristic can pick, forced on one shape, against float64."""
    geom, packed, least = EVERY_CONFIG[tiles]
    args = conv_args(geom, dtype, **ALL)
    oracle = ops.conv2d(*_f64(args), "reference")
    eager = ops.conv2d(*args, "reference")
    configs = [c for c in KC.all_configs(torch.empty(0, dtype=dtype).element_size()) if c.PACK_GROUPS == packed]
    assert len(configs) >= (least if dtype != torch.float32 else 1)
    for cfg in configs:
        y = conv2d_triton(*args, config=cfg)
        if dtype == torch.float32:
            assert_close(y, oracle, dtype=dtype, name=str(cfg))
        else:
            assert_as_accurate(y, eager, oracle, dtype=dtype, name=str(cfg))


def test_conv2d_large_m_several_row_tiles():
    geom = (4, 8, 20, 20, 8, (3, 3), (1, 1), (1, 1), (1, 1), 1)   # 1600 rows: 25 row tiles
    _check_conv(conv_args(geom, torch.float32, bias=True, act="relu"), torch.float32)


def test_conv2d_backward_on_reference_matches():
    """Forward on triton, backward on the reference: the same gradients as the reference run."""
    grads = {}
    for backend in ("triton", "reference"):
        torch.manual_seed(1)
        args = list(conv_args(SMALL, torch.float32, pre="bn", pre_act="relu", bias=True, residual=True, act="relu"))
        leaves = [args[i].requires_grad_() for i in (0, 1, 2, 7, 8, 14)]
        y = ops.conv2d(*args, backend)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        grads[backend] = [t.grad for t in leaves]
    for i, (g, e) in enumerate(zip(grads["triton"], grads["reference"])):
        assert_close(g, e, dtype=torch.float32, reduced=SMALL[0] * 36, name=f"grad {i}")


def test_conv2d_opcheck():
    args = conv_args((1, 5, 4, 4, 6, (3, 3), (1, 1), (1, 1), (1, 1), 1), torch.float32, **ALL)
    opcheck(ops.conv2d.default, (*args, "triton"))


# ---- conv2d_stats: the output's batch statistics from the epilogue -------------------------------
def _check_stats_of(y, mean, var):
    assert mean.dtype == var.dtype == torch.float32
    v64, m64 = torch.var_mean(y.double(), (0, 2, 3), correction=0)
    count = y.numel() // y.shape[1]
    assert_close(mean, m64, dtype=torch.float32, reduced=count, name="mean")
    assert_close(var, v64, dtype=torch.float32, reduced=count, name="var")


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
@pytest.mark.parametrize("geom", ["odd15", "stride2", "groups32x4", "groups15_s2", "1x1spatial", "depthwise"])
def test_conv2d_stats(geom, dtype):
    """The statistics of the stored (rounded) output, every fusion on; the output itself is conv2d's."""
    g = GEOMETRIES.get(geom) or (2, 16, 9, 9, 32, (3, 3), (1, 1), (1, 1), (1, 1), 16)   # depthwise, x2
    args = conv_args(g, dtype, **ALL)
    y, mean, var = _ran_on_triton(lambda: ops.conv2d_stats(*args, "triton"))
    torch.testing.assert_close(y, ops.conv2d(*args, "triton"), rtol=0, atol=0)
    _check_stats_of(y, mean, var)


@pytest.mark.parametrize("chunks", [2, 512], ids=lambda c: f"max{c}")
def test_conv2d_stats_large_mean_and_many_tiles(monkeypatch, chunks):
    """mean 1e4, std ~1 over 25 row tiles, merged in one level or (STATS_CHUNKS=2) two: per-tile
    (count, mean, M2) never subtracts two large sums."""
    monkeypatch.setattr(bn_act_ops, "STATS_CHUNKS", chunks)
    args = list(conv_args((4, 8, 20, 20, 8, (1, 1), (1, 1), (0, 0), (1, 1), 1), torch.float32, bias=True))
    args[2] = torch.full((8,), 1e4) + torch.arange(8.0)
    y, mean, var = ops.conv2d_stats(*args, "triton")
    _check_stats_of(y, mean, var)
    assert (var - y.double().var((0, 2, 3), correction=0)).abs().max() < 1e-3


def test_conv2d_stats_opcheck():
    args = conv_args((1, 5, 4, 4, 6, (3, 3), (1, 1), (1, 1), (1, 1), 1), torch.float32, **ALL)
    opcheck(ops.conv2d_stats.default, (*args, "triton"))


# ---- conv2d_means: each sample's channel means from the epilogue ---------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
@pytest.mark.parametrize("geom", ["odd15", "stride2", "groups32x4", "1x1spatial", "depthwise"])
def test_conv2d_means(geom, dtype):
    """The means of the stored (rounded) output per sample and channel, every fusion on, from row
    tiles that never cross a sample (odd15: 225 pixels, four 64-row tiles a sample, the last one
    mostly masked; 1x1spatial: one pixel a tile); the output is conv2d's, bit for bit."""
    g = GEOMETRIES.get(geom) or (3, 16, 9, 9, 32, (3, 3), (1, 1), (1, 1), (1, 1), 16)   # depthwise, x2
    args = conv_args(g, dtype, **ALL)
    y, means = _ran_on_triton(lambda: ops.conv2d_means(*args, "triton"))
    torch.testing.assert_close(y, ops.conv2d(*args, "triton"), rtol=0, atol=0)
    assert means.dtype == torch.float32
    assert_close(means, y.double().mean((2, 3)), dtype=torch.float32, reduced=y.shape[2] * y.shape[3], name="means")
    _check(means, args, lambda *a: ops.conv2d_means(*a)[1], dtype, geom)


@pytest.mark.parametrize("geom", ["odd15", "depthwise"])
def test_conv2d_means_backward(geom):
    """Gradients through the output and the means at once match the float64 reference: each
    mean's gradient spreads evenly over its sample's pixels, then through the epilogue's ReLU,
    the conv and the BN-ReLU prologue."""
    g = GEOMETRIES.get(geom) or (2, 16, 9, 9, 32, (3, 3), (1, 1), (1, 1), (1, 1), 16)
    grads = {}
    for backend in ("triton", "reference"):
        torch.manual_seed(1)
        args = list(conv_args(g, torch.float32, pre="bn", pre_act="relu", bias=True, residual=True, act="relu"))
        if backend == "reference":
            args = list(_f64(args))
        leaves = [args[i].requires_grad_() for i in (0, 1, 2, 7, 8, 14)]
        y, means = ops.conv2d_means(*args, backend)
        torch.manual_seed(2)
        gy, gm = torch.randn(y.shape).to(y), torch.randn(means.shape).to(means) * y.shape[2] * y.shape[3]
        ((y * gy).sum() + (means * gm).sum()).backward()
        grads[backend] = [t.grad for t in leaves]
    for i, (got, want) in enumerate(zip(grads["triton"], grads["reference"])):
        assert_close(got, want, dtype=torch.float32, reduced=g[0] * g[2] * g[3], name=f"grad {i}")


def test_conv2d_means_depthwise_tiles():
    """Every depthwise tile, with BLOCK_M rows that split a sample's 15x15 pixels unevenly."""
    from fastres.kernels import depthwise as KD
    from fastres.ops.conv import conv2d_depthwise_triton
    args = conv_args((3, 24, 15, 15, 24, (3, 3), (1, 1), (1, 1), (1, 1), 24), torch.float32, bias=True, act="relu6")
    x, w, b, stride, padding, dilation, _, pw, pb, pm, pi, pre_act, _, add, res, act = args
    for cfg in KD.all_configs(4):
        y, means = conv2d_depthwise_triton(x if cfg.BLOCK_C > 1 else x.contiguous(), w, b, stride, padding, dilation,
                                           pw, pb, pm, pi, pre_act, add, res, act, config=cfg, means=True)
        assert_close(means, y.double().mean((2, 3)), dtype=torch.float32, reduced=225, name=str(cfg))


def test_conv2d_means_opcheck():
    args = conv_args((2, 5, 4, 4, 6, (3, 3), (1, 1), (1, 1), (1, 1), 1), torch.float32, **ALL)
    opcheck(ops.conv2d_means.default, (*args, "triton"))


def test_conv2d_float64_falls_back_with_reason():
    args = conv_args(SMALL, torch.float64)
    B._warned.clear()
    with pytest.warns(UserWarning, match="conv2d falls back from triton to reference: dtype torch.float64"):
        ops.conv2d(*args, "triton")


# ---- bn_act ------------------------------------------------------------------------------------
def bn_args(shape, dtype, flags, act, *, layout="cl"):
    n, c, h, w = shape
    if layout == "slice":   # channels [3, 3 + c) of a channels_last buffer
        x = torch.randn(n, c + 7, h, w).to(dtype).to(memory_format=CL)[:, 3:3 + c]
    else:
        x = torch.randn(n, c, h, w).to(dtype)
        x = x.to(memory_format=CL) if layout == "cl" else x
    wt = torch.rand(c) + 0.5 if "w" in flags else None
    b = torch.randn(c) if "b" in flags else None
    mean, invstd = (torch.randn(c), torch.rand(c) + 0.5) if "m" in flags else (None, None)
    r = torch.randn(n, c, h, w).to(dtype) if "r" in flags else None   # NCHW: a different layout
    return (x, wt, b, mean, invstd, r, act, False)


def _check_bn_act(args, dtype):
    y = _ran_on_triton(lambda: ops.bn_act(*args, "triton"))
    _check(y, args, ops.bn_act, dtype)
    assert y.stride() == torch.empty_like(args[0]).stride()


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("flags", ["", "w", "b", "wb", "m", "wbm", "r", "wbmr"])
def test_bn_act_flags(flags, act):
    _check_bn_act(bn_args((2, 37, 5, 5), torch.float32, flags, act), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=IDS.get)
@pytest.mark.parametrize("layout", ["cl", "nchw", "slice"])
@pytest.mark.parametrize("shape", [(2, 70, 5, 5), (1, 7, 1, 1), (3, 3, 15, 15)], ids=str)
def test_bn_act_layouts(shape, layout, dtype):
    _check_bn_act(bn_args(shape, dtype, "wbmr", "relu", layout=layout), dtype)


def test_bn_act_opcheck():
    opcheck(ops.bn_act.default, (*bn_args((2, 5, 3, 3), torch.float32, "wbmr", "silu"), "triton"))


# ---- batch_stats -------------------------------------------------------------------------------
def _check_stats(x):
    mean, var = _ran_on_triton(lambda: ops.batch_stats(x, "triton"))
    assert mean.dtype == var.dtype == torch.float32
    v64, m64 = torch.var_mean(x.double(), (0, 2, 3), correction=0)
    count = x.numel() // x.shape[1]
    assert_close(mean, m64, dtype=torch.float32, reduced=count, name="mean")
    assert_close(var, v64, dtype=torch.float32, reduced=count, name="var")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=IDS.get)
@pytest.mark.parametrize("layout", ["cl", "nchw", "slice"])
@pytest.mark.parametrize("shape", [(2, 70, 5, 5), (1, 7, 1, 1), (4, 3, 33, 33)], ids=str)
def test_batch_stats(shape, layout, dtype):
    x = bn_args(shape, dtype, "", "identity", layout=layout)[0]
    _check_stats(x)


@pytest.mark.parametrize("chunks", [1, 2, 512], ids=lambda c: f"chunks{c}")
def test_batch_stats_large_mean_is_stable(monkeypatch, chunks):
    """mean 1e4, std 1: E[x^2] - E[x]^2 in fp32 would lose the variance entirely."""
    monkeypatch.setattr(bn_act_ops, "STATS_CHUNKS", chunks)
    x = (1e4 + torch.randn(4, 3, 33, 33)).to(memory_format=CL)
    _check_stats(x)
    _, var = ops.batch_stats(x, "triton")
    assert (var - 1).abs().max() < 0.1


def test_batch_stats_opcheck():
    opcheck(ops.batch_stats.default, (torch.randn(2, 5, 3, 3), "triton"))


def test_batch_stats_empty_falls_back():
    B._warned.clear()
    with pytest.warns(UserWarning, match="batch_stats falls back from triton to reference: empty input"):
        mean, _ = ops.batch_stats(torch.randn(0, 4, 3, 3), "triton")
    assert mean.isnan().all()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
