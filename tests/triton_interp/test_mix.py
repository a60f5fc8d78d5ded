"""The triton backend of mix_conv2d on CPU under TRITON_INTERPRET=1: the weighted sum formed in the
conv's input load equals the eager sum then conv (float64 reference), fp32 and bf16, odd channel
counts, channels_last and NCHW slots of one buffer. Run by tests/ops/test_triton.py in a
subprocess (see conftest.py)."""
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
# name: (S states, N, C, H, W, K)
SHAPES = {"s3_c37": (3, 2, 37, 6, 6, 37), "s1_c16": (1, 2, 16, 5, 5, 24), "s5_c7": (5, 1, 7, 7, 5, 7)}


def mix_args(shape, dtype, *, cl=True, act="relu", bias=True):
    s, n, c, h, w, k = shape
    buf = torch.randn(s * n, c, h, w)
    buf = (buf.to(memory_format=CL) if cl else buf).to(dtype).view(s, n, c, h, w)   # slots of one buffer
    mix = torch.randn(s)
    wt = (torch.randn(k, c, 3, 3) * (9 * c) ** -0.5).to(dtype).to(memory_format=CL)
    b = torch.randn(k).to(dtype) if bias else None
    return (buf, mix, wt, b, [1, 1], [1, 1], [1, 1], 1, act)


def _f64(args):
    return tuple(a.double() if isinstance(a, torch.Tensor) else a for a in args)


def _check(args, dtype, name):
    with B.recording() as rec:
        y = ops.mix_conv2d(*args, "triton")
    assert rec and all(r[2] == "triton" for r in rec), rec
    oracle = ops.mix_conv2d(*_f64(args), "reference")
    eager = ops.mix_conv2d(*args, "reference")
    if dtype == torch.float32:
        assert_close(y, oracle, dtype=dtype, name=name)
    else:
        assert_as_accurate(y, eager, oracle, dtype=dtype, name=name)
    assert y.stride() == eager.stride(), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=IDS.get)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_mix_conv2d_matches_eager_sum(shape, dtype):
    _check(mix_args(SHAPES[shape], dtype), dtype, shape)


@pytest.mark.parametrize("act", ["identity", "silu"])
def test_mix_conv2d_nchw_slots(act):
    _check(mix_args(SHAPES["s3_c37"], torch.float32, cl=False, act=act, bias=False), torch.float32, act)


def test_mix_conv2d_reads_only_its_slots():
    """A view of the first slots of a larger buffer: the later slots (NaN here) are never read."""
    s, n, c, h, w, k = SHAPES["s3_c37"]
    args = list(mix_args((s + 2, n, c, h, w, k), torch.float32))
    args[0][s:] = float("nan")
    args[0], args[1] = args[0][:s], args[1][:s]
    _check(tuple(args), torch.float32, "prefix")


def test_mix_conv2d_backward_on_reference_matches():
    """Forward on triton, backward on the reference: the same gradients as the reference run."""
    grads = {}
    for backend in ("triton", "reference"):
        torch.manual_seed(1)
        args = list(mix_args(SHAPES["s3_c37"], torch.float32))
        leaves = [args[i].requires_grad_() for i in range(4)]
        y = ops.mix_conv2d(*args, backend)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        grads[backend] = [t.grad for t in leaves]
    reduced = SHAPES["s3_c37"][1] * 36 * 37
    for i, (g, e) in enumerate(zip(grads["triton"], grads["reference"])):
        assert_close(g, e, dtype=torch.float32, reduced=reduced, name=f"grad {i}")


def test_mix_conv2d_opcheck():
    opcheck(ops.mix_conv2d.default, (*mix_args((2, 1, 5, 4, 4, 6), torch.float32), "triton"))
