"""The triton bn_act_pool2d (BN-act applied as each pooling window is read) on CPU under
TRITON_INTERPRET=1 against a float64 run of the reference: max and average pooling at the ResNet
stem's and DenseNet transition's windows and odd ones, with and without the BN-act, eval and
batch statistics, fp32 and bf16, channels_last, NCHW and a channel slice; the backward; opcheck.
Run by tests/ops/test_triton.py (see conftest.py)."""
import os

import pytest

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 for the whole process (run via tests/ops/test_triton.py)",
                allow_module_level=True)

import torch  # noqa: E402
from torch.library import opcheck  # noqa: E402

from fastres import backend as B  # noqa: E402
from tests.utils import assert_as_accurate, assert_close  # noqa: E402

ops = torch.ops.fastres
CL = torch.channels_last
IDS = {torch.float32: "fp32", torch.bfloat16: "bf16"}
WINDOWS = {   # name: (kind, kernel, stride, padding, input H, W)
    "stem-max3s2p1": ("max", [3, 3], [2, 2], [1, 1], 15, 12),
    "transition-avg2s2": ("avg", [2, 2], [2, 2], [0, 0], 14, 9),
    "avg3s2p1": ("avg", [3, 3], [2, 2], [1, 1], 7, 7),
    "max2s1": ("max", [2, 2], [1, 1], [0, 0], 5, 6),
}


def make(window, dtype, layout="cl", prologue="train", c=37):
    kind, k, s, p, h, w = WINDOWS[window]
    if layout == "slice":
        x = torch.randn(2, c + 5, h, w).to(dtype).to(memory_format=CL)[:, 2:2 + c]
    else:
        x = torch.randn(2, c, h, w).to(dtype)
        x = x.to(memory_format=CL) if layout == "cl" else x
    if prologue == "none":
        bn = (None, None, None, None, "identity", False)
    else:
        var, mean = torch.var_mean(x.float(), (0, 2, 3), correction=0)
        if prologue == "eval":
            mean, var = torch.randn(c), torch.rand(c) + 0.5
        bn = (torch.rand(c) + 0.5, torch.randn(c), mean, torch.rsqrt(var + 1e-5), "relu", prologue == "train")
    return (x, *bn, kind, k, s, p)


def _f64(args):
    return tuple(a.double() if isinstance(a, torch.Tensor) else a for a in args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=IDS.get)
@pytest.mark.parametrize("prologue", ["train", "eval", "none"])
@pytest.mark.parametrize("layout", ["cl", "nchw", "slice"])
@pytest.mark.parametrize("window", list(WINDOWS))
def test_forward_matches_float64(window, layout, prologue, dtype):
    args = make(window, dtype, layout, prologue)
    with B.recording() as rec:
        got = ops.bn_act_pool2d(*args, "triton")
    assert [r[1:3] for r in rec] == [("bn_act_pool2d", "triton")], rec
    eager = ops.bn_act_pool2d(*args, "reference")
    oracle = ops.bn_act_pool2d(*_f64(args), "reference")
    assert got.shape == eager.shape and got.dtype == eager.dtype and got.stride() == eager.stride()
    if dtype == torch.float32:
        assert_close(got, oracle, dtype=dtype)
    else:
        assert_as_accurate(got, eager, oracle, dtype=dtype)


@pytest.mark.parametrize("window", ["stem-max3s2p1", "transition-avg2s2"])
def test_backward_matches_reference(window):
    args = list(make(window, torch.float32))
    x, w, b = (args[i].detach().requires_grad_() for i in range(3))
    args[:3] = x, w, b
    got = ops.bn_act_pool2d(*args, "triton")
    want = ops.bn_act_pool2d(*args, "reference")
    g = torch.randn_like(want)
    for name, a, e in zip(("x", "weight", "bias"), torch.autograd.grad(got, (x, w, b), g),
                          torch.autograd.grad(want, (x, w, b), g)):
        assert_close(a, e, reduced=2 * 15 * 12, name=name)


def test_max_pooling_keeps_nan():
    """As ATen's max pooling: a NaN in the window is the window's maximum."""
    x = torch.zeros(1, 2, 4, 4)
    x[0, 1, 1, 1] = float("nan")
    got = ops.bn_act_pool2d(x, None, None, None, None, "identity", False, "max", [2, 2], [2, 2], [0, 0], "triton")
    assert torch.equal(got.isnan(), torch.nn.functional.max_pool2d(x, 2).isnan())


@pytest.mark.parametrize("window", ["stem-max3s2p1", "transition-avg2s2"])
def test_opcheck(window):
    opcheck(ops.bn_act_pool2d.default, (*make(window, torch.float32, c=6), "triton"))
