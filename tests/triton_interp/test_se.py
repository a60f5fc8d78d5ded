"""The triton se_gate_act forward and backward on CPU under TRITON_INTERPRET=1 against a float64
run of the reference: every activation, residual on/off, fp32 and bf16, odd shapes and layouts,
several gate-sum chunks. Run by tests/ops/test_triton.py (see conftest.py)."""
import os

import pytest

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 for the whole process (run via tests/ops/test_triton.py)",
                allow_module_level=True)

import torch  # noqa: E402
from torch.library import opcheck  # noqa: E402

import fastres  # noqa: E402
from fastres import backend as B  # noqa: E402
from fastres.nn.se import SqueezeExcite  # noqa: E402
from fastres.ops import ACTS  # noqa: E402
from fastres.ops import se as se_ops  # noqa: E402
from tests.utils import assert_as_accurate, assert_close  # noqa: E402

ops = torch.ops.fastres
CL = torch.channels_last
IDS = {torch.float32: "fp32", torch.bfloat16: "bf16"}


def make_args(shape, dtype, *, residual=True, layout="cl"):
    """(x, gate, residual): x in `layout` (a channel slice of a channels_last buffer for "slice"),
    the gate a column slice of a wider logit matrix (strided), an NCHW residual."""
    n, c, h, w = shape
    if layout == "slice":
        x = torch.randn(n, c + 7, h, w).to(dtype).to(memory_format=CL)[:, 3:3 + c]
    else:
        x = torch.randn(n, c, h, w).to(dtype)
        x = x.to(memory_format=CL) if layout == "cl" else x
    gate = (2 * torch.randn(n, c + 1)).to(dtype)[:, 1:]
    r = torch.randn(n, c, h, w).to(dtype) if residual else None
    return x, gate, r


def _f64(args):
    return tuple(a.double() if isinstance(a, torch.Tensor) else a for a in args)


def _ran_on_triton(fn, op):
    with B.recording() as rec:
        out = fn()
    assert [r[1:3] for r in rec] == [(op, "triton")], rec
    return out


def _compare(got, eager, oracle, dtype, name, reduced=1):
    assert got.shape == eager.shape and got.dtype == eager.dtype, f"{name}: {got.shape} {got.dtype}"
    if dtype == torch.float32:
        assert_close(got, oracle, dtype=dtype, reduced=reduced, name=name)
    else:
        assert_as_accurate(got, eager, oracle, dtype=dtype, name=name)


def check(x, gate, r, act, dtype):
    """Forward, then the backward from the triton output, against float64 and eager runs."""
    y = _ran_on_triton(lambda: ops.se_gate_act(x, gate, r, act, "triton"), "se_gate_act")
    _compare(y, ops.se_gate_act(x, gate, r, act, "reference"),
             ops.se_gate_act(*_f64((x, gate, r)), act, "reference"), dtype, "out")
    assert y.stride() == torch.empty_like(x).stride()
    args = (torch.randn(x.shape).to(dtype), x, gate, r, y, act)
    got = _ran_on_triton(lambda: ops.se_gate_act_backward(*args, "triton"), "se_gate_act_backward")
    eager = ops.se_gate_act_backward(*args, "reference")
    oracle = ops.se_gate_act_backward(*_f64(args), "reference")
    hw = x.shape[2] * x.shape[3]
    for name, g, e, o in zip(("gx", "ggate", "gres"), got, eager, oracle):
        _compare(g, e, o, dtype, name, reduced=hw if name == "ggate" else 1)
    assert got[0].stride() == torch.empty_like(x).stride()
    assert (got[2].numel() > 0) == (r is not None)


@pytest.mark.parametrize("residual", [False, True], ids=["", "res"])
@pytest.mark.parametrize("act", ACTS)
def test_flags(act, residual):
    check(*make_args((2, 37, 15, 15), torch.float32, residual=residual), act, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=IDS.get)
@pytest.mark.parametrize("layout", ["cl", "nchw", "slice"])
@pytest.mark.parametrize("shape", [(2, 70, 5, 5), (3, 5, 1, 1), (1, 37, 15, 15)], ids=str)
def test_layouts(shape, layout, dtype):
    check(*make_args(shape, dtype, layout=layout), "relu", dtype)


@pytest.mark.parametrize("chunks", [1, 3, 512], ids=lambda c: f"chunks{c}")
def test_gate_sum_chunks(monkeypatch, chunks):
    """The gate's sum over positions: many tiles in one chunk, uneven chunks, a tile per chunk."""
    monkeypatch.setattr(se_ops, "CHUNKS", chunks)
    check(*make_args((1, 6, 30, 30), torch.float32), "silu", torch.float32)


def test_autograd_runs_the_triton_backward():
    grads = {}
    for backend in ("triton", "reference"):
        torch.manual_seed(5)
        leaves = [t.requires_grad_() for t in make_args((2, 6, 4, 4), torch.float32)]
        with B.recording() as rec:
            y = ops.se_gate_act(*leaves, "relu6", backend)
            (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        assert ("se_gate_act_backward", backend) in [r[1:3] for r in rec]
        grads[backend] = [t.grad for t in leaves]
    for name, g, e in zip(("x", "gate", "residual"), grads["triton"], grads["reference"]):
        assert_close(g, e, dtype=torch.float32, reduced=16 if name == "gate" else 1, name=name)


@pytest.mark.parametrize("act", ["relu", "silu"])
def test_opcheck(act):
    x, gate, r = make_args((2, 5, 3, 3), torch.float32)
    opcheck(ops.se_gate_act.default, (x, gate, r, act, "triton"))
    y = ops.se_gate_act(x, gate, r, act, "triton")
    opcheck(ops.se_gate_act_backward.default, (torch.randn_like(y), x, gate, r, y, act, "triton"))


def test_supports_reasons():
    x, gate, r = make_args((2, 3, 4, 4), torch.float32, layout="nchw")
    assert se_ops.triton_se_supports(x, gate, r) is None
    assert "dtype torch.float64" in se_ops.triton_se_supports(x.double(), gate, r)
    assert "gate dtype torch.float64" in se_ops.triton_se_supports(x, gate.double(), r)
    assert "residual shape (2, 3, 4, 1)" in se_ops.triton_se_supports(x, gate, r[..., :1])
    assert "grad shape (2, 3, 4, 1)" in se_ops.triton_se_supports(x, gate, r, grad=r[..., :1])
    assert "empty" in se_ops.triton_se_supports(x[:0], gate[:0], None)


def test_float64_falls_back_with_reason():
    B._warned.clear()
    with pytest.warns(UserWarning, match="se_gate_act falls back from triton to reference: dtype torch.float64"):
        ops.se_gate_act(*_f64(make_args((1, 4, 2, 2), torch.float32)), "relu", "triton")


def test_explain_reports_triton():
    se = SqueezeExcite(8, 4, backend="triton")
    text = str(fastres.explain(se, torch.randn(2, 8, 5, 5)))
    assert any(line.split()[1:3] == ["se_gate_act", "triton"] for line in text.splitlines()), text
