"""The direct depthwise conv2d kernel (kernels/depthwise.py) on CPU under TRITON_INTERPRET=1, against a
float64 run of the reference: the dispatch from conv2d_triton, every fusion flag, fp32/bf16/fp16,
ReXNet-like and odd shapes, layouts, every tile pick_config can return, and a converted ReXNet block.
Run by tests/ops/test_triton.py in a subprocess (see conftest.py)."""
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
from fastres.ops.conv import conv2d_depthwise_triton, conv2d_triton  # noqa: E402
from tests.triton_interp.test_kernels import ALL, FUSIONS, IDS, _check, _check_conv, _f64, _ran_on_triton, conv_args  # noqa: E402
from tests.utils import assert_as_accurate, assert_close  # noqa: E402

from fastres.kernels import conv as KC  # noqa: E402  (after TRITON_INTERPRET is known to be set)
from fastres.kernels import depthwise as KD  # noqa: E402

ops = torch.ops.fastres
CL = torch.channels_last
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


# The interpreter costs ~2-10 ms per tap per program, nearly independent of the tile: every test
# runs one big tile (pick_config replaced) but those that check pick_config's own tiles.
PICK = KD.pick_config
ONE_TILE = KD.Config(BLOCK_M=256, BLOCK_C=128, num_warps=4)


@pytest.fixture(autouse=True)
def one_tile(monkeypatch):
    monkeypatch.setattr(KD, "pick_config", lambda out_channels, channels_contiguous, elem_bytes: ONE_TILE)


@pytest.fixture
def launches(monkeypatch):
    """Counts launches of the depthwise and of the generic implicit-GEMM conv kernel."""
    count = {"depthwise": 0, "generic": 0}

    class Spy:
        def __init__(self, kernel, key):
            self.kernel, self.key = kernel, key

        def __getitem__(self, grid):
            count[self.key] += 1
            return self.kernel[grid]

    monkeypatch.setattr(KD, "depthwise_conv2d_kernel", Spy(KD.depthwise_conv2d_kernel, "depthwise"))
    monkeypatch.setattr(KC, "conv2d_kernel", Spy(KC.conv2d_kernel, "generic"))
    return count


def _check_dw(args, dtype, launches, name=""):
    y = _check_conv(args, dtype, name)
    assert launches == {"depthwise": 1, "generic": 0}, f"{name}: {launches}"
    return y


def dw(n, c, h, w, rs=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1), mult=1):
    """A depthwise geometry in test_kernels' conv_args form."""
    return (n, c, h, w, mult * c, rs, stride, padding, dilation, c)


GEOMETRIES = {
    "rexnet128_14_s1": dw(1, 128, 14, 14),
    "rexnet128_15_s2": dw(1, 128, 15, 15, stride=(2, 2)),
    "rexnet72_15_s1": dw(1, 72, 15, 15),
    "rexnet72_14_s2": dw(1, 72, 14, 14, stride=(2, 2)),
    "c37": dw(2, 37, 7, 7),
    "dilation2": dw(1, 16, 9, 9, padding=(2, 2), dilation=(2, 2)),
    "1x1spatial": dw(3, 20, 1, 1, rs=(1, 1), padding=(0, 0)),
    "3x3_on_1x1": dw(2, 24, 1, 1),                                   # all taps but one padded
    "5x5": dw(1, 24, 9, 9, rs=(5, 5), padding=(2, 2)),
    "rect1x3_odd": dw(1, 12, 9, 7, rs=(1, 3), stride=(1, 2), padding=(0, 1)),
    "multiplier2": dw(1, 16, 7, 7, mult=2),                          # K = 2*C
}
SMALL = dw(1, 24, 5, 5)   # one program


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
@pytest.mark.parametrize("geom", list(GEOMETRIES))
def test_depthwise_geometry_all_fusions(geom, dtype, launches):
    _check_dw(conv_args(GEOMETRIES[geom], dtype, **ALL), dtype, launches, geom)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
@pytest.mark.parametrize("geom", ["c37", "3x3_on_1x1", "multiplier2"])
def test_depthwise_geometry_plain(geom, dtype, launches):
    _check_dw(conv_args(GEOMETRIES[geom], dtype), dtype, launches, geom)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
@pytest.mark.parametrize("fusion", list(FUSIONS))
def test_depthwise_fusion(fusion, dtype, launches):
    _check_dw(conv_args(SMALL, dtype, **FUSIONS[fusion]), dtype, launches, fusion)


def test_depthwise_padding_rezeroed_after_prologue(launches):
    """relu(BN(0)) = relu(shift) > 0 must not leak into the border: on zeros with a pure-shift
    prologue each output is the number of in-bounds taps."""
    x = torch.zeros(1, 16, 4, 4).to(memory_format=CL)
    w = torch.ones(16, 1, 3, 3).to(memory_format=CL)
    args = (x, w, None, [1, 1], [1, 1], [1, 1], 16, None, torch.ones(16), None, None, "relu", False,
            None, None, "identity")
    y = ops.conv2d(*args, "triton")
    assert launches["depthwise"] == 1
    taps = torch.tensor([[4, 6, 6, 4], [6, 9, 9, 6], [6, 9, 9, 6], [4, 6, 6, 4]], dtype=torch.float32)
    torch.testing.assert_close(y, taps.expand(1, 16, 4, 4), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
@pytest.mark.parametrize("layout", ["x_nchw", "w_nchw", "both_nchw"])
def test_depthwise_layouts(layout, dtype, launches):
    args = conv_args(dw(1, 8, 6, 7), dtype, **ALL, x_cl=layout == "w_nchw", w_cl=layout == "x_nchw")
    _check(_ran_on_triton(lambda: ops.conv2d(*args, "triton")), args, ops.conv2d, dtype, layout)
    assert launches == {"depthwise": 1, "generic": 0}


@pytest.mark.parametrize("layout", ["w_nchw", "both_nchw", "x_nchw"])
def test_depthwise_output_layout_as_aten(layout):
    args = conv_args(dw(1, 8, 6, 7), torch.float32, x_cl=layout == "w_nchw", w_cl=layout == "x_nchw")
    y, eager = ops.conv2d(*args, "triton"), ops.conv2d(*args, "reference")
    assert y.stride() == eager.stride()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=IDS.get)
def test_depthwise_channel_slices(dtype, launches):
    """Input, addend and residual as channel slices of channels_last buffers go in without a copy."""
    args = list(conv_args(dw(2, 24, 7, 7), dtype, **ALL))
    buf = torch.randn(2, 64, 7, 7).to(dtype).to(memory_format=CL)
    res = torch.randn(2, 40, 7, 7).to(dtype).to(memory_format=CL)
    args[0], args[13], args[14] = buf[:, 8:32], buf[:, 32:56], res[:, 5:29]
    _check_dw(tuple(args), dtype, launches, "slice")


def test_depthwise_every_config(monkeypatch):
    """Every tile pick_config can return, on one shape where the narrow tiles need several channel
    tiles and the widest two row tiles (C=5, 49 pixels; a 3x1 filter keeps it quick)."""
    monkeypatch.setattr(KD, "pick_config", PICK)   # all_configs asks it
    args = conv_args(dw(1, 5, 7, 7, rs=(3, 1), padding=(1, 0)), torch.float32, **ALL)
    oracle = ops.conv2d(*_f64(args), "reference")
    configs = KD.all_configs(4)
    assert len(configs) == 7
    for cfg in configs:
        y = conv2d_depthwise_triton(*args[:6], *args[7:12], *args[13:], config=cfg)
        assert_close(y, oracle, dtype=torch.float32, name=str(cfg))


def test_depthwise_picked_tiles(monkeypatch, launches):
    """Through the dispatch with pick_config's own tile: ReXNet-like C=72, 9 channel tiles of 8."""
    monkeypatch.setattr(KD, "pick_config", PICK)
    _check_dw(conv_args(GEOMETRIES["rexnet72_14_s2"], torch.float32, **ALL), torch.float32, launches)


def test_pick_config():
    def width(k, contiguous=True, elem_bytes=2):
        cfg = PICK(k, contiguous, elem_bytes)
        assert cfg.BLOCK_M * cfg.BLOCK_C == KD.ELEMENTS
        return cfg.BLOCK_C
    assert width(128) == 64 and width(24) == 32     # channels_last: the least padding, widest of equals
    assert width(72) == 16 and width(72, elem_bytes=4) == 8   # 72 = 4.5 x 16 = 9 x 8, not 64 + 56 masked
    assert width(11, elem_bytes=4) == 16                      # 2 x 8 = 1 x 16: the wider
    assert width(4) == 4 and width(9) == 16                   # up to one sector: K to a power of 2
    assert width(128, contiguous=False) == 1                  # NCHW: one channel wide
    assert KD.unsupported(128, 128, 128) is None and KD.unsupported(16, 32, 16) is None
    assert "not a depthwise conv" in KD.unsupported(128, 128, 32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=IDS.get)
def test_depthwise_matches_generic_kernel(dtype, launches):
    """The generic implicit-GEMM kernel (forced by passing its config) and the direct kernel agree."""
    args = conv_args(dw(1, 4, 5, 5), dtype, **ALL)
    y_dw = conv2d_triton(*args)
    y_gemm = conv2d_triton(*args, config=KC.pick_config(1, 1, args[0].element_size()))
    assert launches == {"depthwise": 1, "generic": 1}
    oracle, eager = ops.conv2d(*_f64(args), "reference"), ops.conv2d(*args, "reference")
    for name, y in (("depthwise", y_dw), ("generic", y_gemm)):
        if dtype == torch.float32:
            assert_close(y, oracle, dtype=dtype, name=name)
        else:
            assert_as_accurate(y, eager, oracle, dtype=dtype, name=name)


def test_grouped_not_depthwise_runs_generic_kernel(launches):
    y = _check_conv(conv_args((1, 8, 4, 4, 8, (3, 3), (1, 1), (1, 1), (1, 1), 4), torch.float32, **ALL),
                    torch.float32, "groups4")
    assert launches == {"depthwise": 0, "generic": 1} and y.shape == (1, 8, 4, 4)


def test_depthwise_opcheck():
    opcheck(ops.conv2d.default, (*conv_args(dw(1, 5, 4, 4, mult=2), torch.float32, **ALL), "triton"))


# ---- a converted ReXNet block --------------------------------------------------------------------
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("case", ["exp6-partial-residual", "exp1-s2"])
def test_rexnet_block_on_triton(case, train, launches):
    """timm's LinearBottleneck converted and run with backend="triton" (its depthwise conv through
    the direct kernel) matches the float64 timm block: outputs, gradients, running statistics."""
    pytest.importorskip("timm")
    from tests.nn.blockcheck import assert_matches_float64
    from tests.nn.test_rexnet import _timm_block
    in_chs, out_chs, stride, exp = {"exp6-partial-residual": (8, 12, 1, 6.0), "exp1-s2": (16, 24, 2, 1.0)}[case]
    ref = _timm_block(in_chs, out_chs, stride, exp, 0.0)
    new = fastres.convert(ref).to(memory_format=CL)
    new.backend = "triton"
    ref.double()
    x = torch.randn(2, in_chs, 7, 7).to(memory_format=CL)
    with B.recording() as rec:
        assert_matches_float64(ref, new, x, train=train)
    convs = [r for r in rec if r[1] in ("conv2d", "conv2d_stats", "conv2d_means")]
    assert len(convs) == (3 if exp != 1.0 else 2) and all(r[2] == "triton" for r in convs), rec
    assert launches["depthwise"] == 1
    assert [r[1] for r in convs].count("conv2d_means") == 0   # no SE here


def test_rexnet_se_block_means_from_the_epilogue(launches):
    """With SE, in eval the depthwise conv hands the SE its channel means (conv2d_means, one
    launch and no mean pass); in training they are taken from the BN's output. Both match the
    float64 timm block."""
    pytest.importorskip("timm")
    from tests.nn.blockcheck import assert_matches_float64
    from tests.nn.test_rexnet import ZERO_IN_TRAIN, _timm_block
    for train in (False, True):
        ref = _timm_block(8, 12, 1, 6.0, 1 / 12)
        new = fastres.convert(ref).to(memory_format=CL)
        new.backend = "triton"
        ref.double()
        with B.recording() as rec:   # N >= 3 for the SE's BN, as in tests/nn/test_rexnet.py
            assert_matches_float64(ref, new, torch.randn(4, 8, 7, 7).to(memory_format=CL), train=train,
                                   skip_grads=ZERO_IN_TRAIN if train else ())
        ops_run = [r[1] for r in rec if r[1].startswith("conv2d")]
        assert ops_run.count("conv2d_means") == (0 if train else 1), rec
        assert all(r[2] == "triton" for r in rec if r[1].startswith("conv2d")), rec


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
