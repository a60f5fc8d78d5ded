"""fastres::mix_conv2d, conv(sum_i mix[i] * states[i]): the reference against the eager sum then
conv, float64 gradcheck, opcheck, the native backend against the reference, and clear errors."""
import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import fastres  # noqa: F401
from fastres import backend as B
from fastres.ops import ACTS
from fastres.ops.mix import weighted_sum
from tests.utils import assert_close

ops = torch.ops.fastres
CL = torch.channels_last
CASES = {  # name: (S, N, C, H, W, K, kernel, stride, padding, groups)
    "s3_3x3": (3, 2, 5, 6, 6, 4, 3, 1, 1, 1),
    "s1": (1, 2, 4, 5, 5, 6, 3, 1, 1, 1),
    "s4_stride2_groups": (4, 1, 6, 7, 7, 4, 3, 2, 1, 2),
    "s2_1x1_spatial": (2, 3, 5, 1, 1, 3, 1, 1, 0, 1),
}


def _buffer(s, n, c, h, w, *, dtype=torch.float64, cl=False):
    """S slots of one (S*N, C, H, W) buffer, each slot channels_last when `cl`."""
    t = torch.randn(s * n, c, h, w, dtype=dtype)
    return (t.to(memory_format=CL) if cl else t).view(s, n, c, h, w)


def _eager(states, mix, w, b, stride, padding, groups, act):
    a = sum(mix[i] * states[i] for i in range(states.shape[0]))
    y = F.conv2d(a, w, b, stride, padding, 1, groups)
    return {"identity": lambda t: t, "relu": F.relu, "relu6": F.relu6, "silu": F.silu}[act](y)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("case", list(CASES))
def test_reference_matches_eager_sum(case, act):
    s, n, c, h, w, k, r, stride, pad, g = CASES[case]
    f64 = dict(dtype=torch.float64, requires_grad=True)
    states = _buffer(s, n, c, h, w).requires_grad_()
    mix = torch.randn(s, **f64)
    wt, b = torch.randn(k, c // g, r, r, **f64), torch.randn(k, **f64)
    args = (states, mix, wt, b, [stride] * 2, [pad] * 2, [1, 1], g, act)
    y = ops.mix_conv2d(*args, "reference")
    e = _eager(states, mix, wt, b, stride, pad, g, act)
    assert_close(y, e, name="forward")
    proj = torch.randn_like(e)
    grads = torch.autograd.grad((y * proj).sum(), (states, mix, wt, b))
    expect = torch.autograd.grad((e * proj).sum(), (states, mix, wt, b))
    for name, gr, ex in zip(("states", "mix", "weight", "bias"), grads, expect):
        assert_close(gr, ex, name=f"grad {name}")
    assert torch.autograd.gradcheck(lambda *t: ops.mix_conv2d(*t, *args[4:], "reference"), args[:4], fast_mode=True)
    opcheck(ops.mix_conv2d.default, args + ("reference",))


def test_gradcheck_full_jacobian():
    states = _buffer(3, 1, 3, 4, 4).requires_grad_()
    mix = torch.randn(3, dtype=torch.float64, requires_grad=True)
    wt = torch.randn(2, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    fn = lambda st, m, w: ops.mix_conv2d(st, m, w, None, [1, 1], [1, 1], [1, 1], 1, "relu", "reference")
    assert torch.autograd.gradcheck(fn, (states, mix, wt))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("act", ["identity", "relu"])
def test_native_matches_reference(act, cl, dtype):
    if B.NATIVE_MISSING is not None:
        pytest.skip(f"native backend unavailable: {B.NATIVE_MISSING}")
    states = _buffer(4, 2, 7, 6, 6, dtype=torch.float32, cl=cl).to(dtype)
    mix = torch.randn(4)
    wt = (torch.randn(5, 7, 3, 3) / 8).to(dtype)
    b = torch.randn(5).to(dtype)
    args = (states, mix, wt, b, [1, 1], [1, 1], [1, 1], 1, act)
    with B.recording() as rec:
        y = ops.mix_conv2d(*args, "native")
    assert [r[2] for r in rec] == ["native"], rec
    oracle = ops.mix_conv2d(*(t.double() if isinstance(t, torch.Tensor) else t for t in args), "reference")
    assert_close(y, oracle, dtype=dtype)
    assert y.is_contiguous(memory_format=CL) == cl


@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
def test_weighted_sum_one_pass_keeps_layout(cl):
    """The matrix-vector sum over the buffer's memory equals the running sum, layout kept."""
    states = _buffer(5, 2, 3, 4, 4, dtype=torch.float32, cl=cl)
    mix = torch.randn(5)
    a = weighted_sum(states, mix)
    assert_close(a, sum(mix[i].double() * states[i].double() for i in range(5)), dtype=torch.float32)
    assert a.stride() == states[0].stride()
    part = weighted_sum(states[:3], mix[:3])   # a prefix of the buffer
    assert_close(part, sum(mix[i].double() * states[i].double() for i in range(3)), dtype=torch.float32)


def test_backward_through_later_buffer_writes():
    """A DAG's use: each output is written into the next slot after the op read the earlier
    ones; the gradients equal those of the same computation on separate tensors."""
    w = torch.randn(4, 4, 3, 3, dtype=torch.float64) / 6
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    grads = []
    for use_buffer in (True, False):
        xi = x.clone().requires_grad_()
        buf = torch.zeros(4, 2, 4, 5, 5, dtype=torch.float64)
        hs = [xi]
        buf[0].copy_(xi)
        for j in range(1, 4):
            mix = torch.linspace(0.5, 1.5, j, dtype=torch.float64)
            if use_buffer:
                h = ops.mix_conv2d(buf[:j], mix, w, None, [1, 1], [1, 1], [1, 1], 1, "relu", "reference")
                buf[j].copy_(h)
            else:
                h = _eager(torch.stack(hs), mix, w, None, 1, 1, 1, "relu")
                hs.append(h)
        out = buf.sum(0) if use_buffer else sum(hs)
        (out * torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view_as(out)).sum().backward()
        grads.append(xi.grad)
    assert_close(grads[0], grads[1], name="input grad")


def test_bad_inputs_raise_clear_errors():
    st, w = torch.randn(3, 2, 4, 5, 5), torch.randn(4, 4, 3, 3)
    call = lambda st, mix, w, act="relu": ops.mix_conv2d(st, mix, w, None, [1, 1], [1, 1], [1, 1], 1, act, "reference")
    with pytest.raises(ValueError, match=r"states must be 5-D \(S, N, C, H, W\)"):
        call(st[0], torch.ones(2), w)
    with pytest.raises(ValueError, match=r"one weight per state, shape \(3,\), got \(2,\)"):
        call(st, torch.ones(2), w)
    with pytest.raises(ValueError, match=r"weight must be \(K, C/groups, R, S\) with C = 4"):
        call(st, torch.ones(3), torch.randn(4, 3, 3, 3))
    with pytest.raises(TypeError, match="must be floating point"):
        call(st, torch.ones(3, dtype=torch.int64), w)
    with pytest.raises(ValueError, match="unknown activation 'gelu'"):
        call(st, torch.ones(3), w, act="gelu")


def test_triton_support_reasons():
    """Why the fused triton sum declines a case (checked without running a kernel)."""
    pytest.importorskip("triton")
    from fastres.kernels.conv import MAX_MIX
    from fastres.ops.mix import _triton_supports
    w = torch.randn(4, 4, 3, 3)
    geom = ([1, 1], [1, 1], [1, 1], 1, "relu")
    assert _triton_supports(torch.randn(3, 2, 4, 5, 5), torch.ones(3), w, None, *geom) is None
    many = torch.randn(MAX_MIX + 1, 1, 4, 5, 5)
    assert f"at most {MAX_MIX} states" in _triton_supports(many, torch.ones(MAX_MIX + 1), w, None, *geom)
    assert "dtype torch.float64" in _triton_supports(torch.randn(2, 1, 4, 5, 5).double(), torch.ones(2),
                                                      w.double(), None, *geom)
