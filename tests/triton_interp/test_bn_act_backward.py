"""The triton bn_act_backward on CPU under TRITON_INTERPRET=1 against a float64 run of the
reference: every activation, eval and training mode, residual, output_mask, fp32 and bf16, odd
shapes and layouts, several reduction chunks. Run by tests/ops/test_triton.py (see conftest.py)."""
import os

import pytest

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 for the whole process (run via tests/ops/test_triton.py)",
                allow_module_level=True)

import torch  # noqa: E402
from torch.library import opcheck  # noqa: E402

from fastres import backend as B  # noqa: E402
from fastres.ops import ACTS  # noqa: E402
from fastres.ops import bn_act as bn_act_ops  # noqa: E402
from tests.utils import assert_as_accurate, assert_close  # noqa: E402

ops = torch.ops.fastres
CL = torch.channels_last
IDS = {torch.float32: "fp32", torch.bfloat16: "bf16"}
ALL = [True, True, True, True]
NAMES = ("gx", "gres", "gw", "gb")


def make_args(shape, dtype, act, *, training, residual=True, layout="cl", mask=ALL):
    """bn_act_backward arguments: x in `layout` (a channel slice of a channels_last buffer for
    "slice"), an NCHW residual and grad, fp32 BN parameters; training uses x's batch statistics."""
    n, c, h, w = shape
    if layout == "slice":
        x = torch.randn(n, c + 7, h, w).to(dtype).to(memory_format=CL)[:, 3:3 + c]
    else:
        x = torch.randn(n, c, h, w).to(dtype)
        x = x.to(memory_format=CL) if layout == "cl" else x
    weight, bias = torch.rand(c) + 0.5, torch.randn(c)
    if training:
        mean, var = ops.batch_stats(x, "reference")
        invstd = torch.rsqrt(var + 1e-5)
    else:
        mean, invstd = torch.randn(c), torch.rand(c) + 0.5
    r = torch.randn(n, c, h, w).to(dtype) if residual else None
    out = ops.bn_act(x, weight, bias, mean, invstd, r, act, training, "reference")
    grad = torch.randn(n, c, h, w).to(dtype)
    return (grad, x, weight, bias, mean, invstd, r, out, act, training, list(mask))


def _f64(args):
    return tuple(a.double() if isinstance(a, torch.Tensor) else a for a in args)


def check(args, dtype):
    """Each gradient the mask asks for against float64; the others empty."""
    with B.recording() as rec:
        got = ops.bn_act_backward(*args, "triton")
    assert [r[1:3] for r in rec] == [("bn_act_backward", "triton")], rec
    oracle = ops.bn_act_backward(*_f64(args), "reference")
    eager = ops.bn_act_backward(*args, "reference")
    count = args[1].numel() // args[1].shape[1]
    for name, g, o, e in zip(NAMES, got, oracle, eager):
        assert g.shape == e.shape and g.dtype == e.dtype, f"{name}: {g.shape} {g.dtype} vs {e.shape} {e.dtype}"
        if dtype == torch.float32:
            assert_close(g, o, dtype=dtype, reduced=count if name in ("gw", "gb") else 1, name=name)
        else:
            assert_as_accurate(g, e, o, dtype=dtype, name=name)
    return got


@pytest.mark.parametrize("residual", [False, True], ids=["", "res"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("act", ACTS)
def test_flags(act, training, residual):
    check(make_args((2, 37, 5, 5), torch.float32, act, training=training, residual=residual), torch.float32)


MASKS = {"x": [True, False, False, False], "res": [False, True, False, False],
         "w": [False, False, True, False], "b": [False, False, False, True],
         "x_res": [True, True, False, False], "w_b": [False, False, True, True], "none": [False] * 4}


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("mask", list(MASKS))
def test_output_mask(mask, training):
    got = check(make_args((2, 37, 5, 5), torch.float32, "silu", training=training, mask=MASKS[mask]),
                torch.float32)
    assert [g.numel() > 0 for g in got] == MASKS[mask]


def test_no_affine_no_statistics():
    """Without weight, bias, mean and invstd: gw and gb are empty even when asked for."""
    grad, x, _, _, _, _, r, _, act, _, mask = make_args((2, 6, 3, 3), torch.float32, "relu", training=False)
    out = ops.bn_act(x, None, None, None, None, r, act, False, "reference")
    got = check((grad, x, None, None, None, None, r, out, act, False, mask), torch.float32)
    assert got[2].numel() == got[3].numel() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=IDS.get)
@pytest.mark.parametrize("layout", ["cl", "nchw", "slice"])
@pytest.mark.parametrize("shape", [(2, 37, 5, 5), (1, 7, 1, 1), (3, 3, 15, 15)], ids=str)
def test_layouts(shape, layout, dtype):
    args = make_args(shape, dtype, "relu", training=True, layout=layout)
    gx, gres, _, _ = check(args, dtype)
    assert gx.stride() == torch.empty_like(args[1]).stride()
    assert gres.stride() == torch.empty_like(args[0]).stride()


@pytest.mark.parametrize("chunks", [1, 6, 512], ids=lambda c: f"chunks{c}")
def test_several_tiles_and_chunks(monkeypatch, chunks):
    """Two channel blocks; partial sums over many tiles per chunk (chunks1), three uneven chunks
    per channel block (chunks6), one tile per chunk (chunks512)."""
    monkeypatch.setattr(bn_act_ops, "STATS_CHUNKS", chunks)
    check(make_args((2, 70, 9, 9), torch.float32, "relu6", training=True), torch.float32)


def test_deterministic():
    args = make_args((4, 3, 17, 17), torch.float32, "identity", training=True)
    a, b = ops.bn_act_backward(*args, "triton"), ops.bn_act_backward(*args, "triton")
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_autograd_runs_the_triton_backward():
    """bn_act's registered backward reaches the triton kernels and gives the reference's grads."""
    grads = {}
    for backend in ("triton", "reference"):
        torch.manual_seed(3)
        grad, x, w, b, mean, invstd, r, _, _, _, _ = make_args((2, 5, 4, 4), torch.float32, "silu", training=True)
        leaves = [t.requires_grad_() for t in (x, w, b, r)]
        with B.recording() as rec:
            y = ops.bn_act(x, w, b, mean, invstd, r, "silu", True, backend)
            y.backward(grad)
        assert ("bn_act_backward", backend) in [r[1:3] for r in rec]
        grads[backend] = [t.grad for t in leaves]
    for name, g, e in zip(("x", "weight", "bias", "residual"), grads["triton"], grads["reference"]):
        assert_close(g, e, dtype=torch.float32, reduced=32, name=name)


def test_opcheck():
    opcheck(ops.bn_act_backward.default, (*make_args((2, 5, 3, 3), torch.float32, "relu", training=True), "triton"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=IDS.get)
@pytest.mark.parametrize("residual", [False, True], ids=["", "res"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("act", ["relu", "relu6"])
def test_relu_family_without_saved_output_recomputes(act, training, residual, dtype):
    """No saved output: the mask comes from the output recomputed from x (and the residual) and
    rounded as the forward stored it (in bf16, z just below 6 is stored as 6: masked), so the
    grads are those of a run given the output of the same backend's forward. Inputs near 6 make
    that rounding matter."""
    args = list(make_args((2, 37, 5, 5), dtype, act, training=training, residual=residual))
    args[1] = (args[1].float() * 3 + 3).to(dtype)
    args[7] = ops.bn_act(*args[1:7], act, training, "triton")
    with_out = check(tuple(args), dtype)
    args[7] = None
    for g, e in zip(check(tuple(args), dtype), with_out):
        assert_close(g, e, dtype=torch.float32, reduced=50, name="recomputed vs saved mask")


def test_float64_falls_back_with_reason():
    args = _f64(make_args((1, 4, 2, 2), torch.float32, "relu", training=False))
    B._warned.clear()
    with pytest.warns(UserWarning, match="bn_act_backward falls back from triton to reference: dtype torch.float64"):
        ops.bn_act_backward(*args, "triton")
