"""Adds into channel slices: the native kernels residual_act_ and split_add (csrc/cpu/slices.cpp)
against the reference, the public op fastres::split_add, conv2d's partial-channel residual on the
reference and native backends (the triton kernels are checked in tests/triton_interp), and the
blocks that use them: ReXNet's shortcut and Res2Net's in-place eval chain."""
import pytest
import torch
import torch.nn.functional as TF
from torch.library import opcheck

import fastres
from fastres import backend as B
from fastres.ops import reference as ref
from tests.utils import assert_close

CL = torch.channels_last
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
ACTS = ["identity", "relu", "relu6", "silu"]
native_only = pytest.mark.skipif(B.NATIVE_MISSING is not None, reason=f"native kernels: {B.NATIVE_MISSING}")


def _fmt(t, cl):
    return t.to(memory_format=CL) if cl else t.contiguous()


def _conv(backend, x, w, residual, act, *, stats=False, **kw):
    op = torch.ops.fastres.conv2d_stats if stats else torch.ops.fastres.conv2d
    args = dict(bias=None, stride=[1, 1], padding=[1, 1], dilation=[1, 1], groups=1, pre_weight=None,
                pre_bias=None, pre_mean=None, pre_invstd=None, pre_act="identity", pre_training=False,
                addend=None, residual=residual, act=act)
    args.update(kw)
    return op(x, w, *args.values(), backend)


# ---- residual_act_ --------------------------------------------------------------------------------
@native_only
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["nchw", "cl", "cl_residual_nchw", "slices"])
@pytest.mark.parametrize("shape", [(2, 37, 5, 3), (3, 40, 1, 1), (1, 9, 7, 7)], ids=str)
def test_residual_act_matches_reference(shape, layout, dtype, act):
    """out[:, :C'] += residual, then act over every channel, in place, in out's memory format; a
    residual in another layout is taken as it is (copied by the kernel), and both may be channel
    slices of larger buffers."""
    n, k, h, w = shape
    cr = k * 2 // 3
    cl = layout != "nchw"
    out = _fmt(torch.randn(n, k + 3, h, w, dtype=dtype), cl)[:, 1:k + 1] if layout == "slices" \
        else _fmt(torch.randn(n, k, h, w, dtype=dtype), cl)
    r = _fmt(torch.randn(n, cr + 2, h, w, dtype=dtype), cl)[:, 2:] if layout == "slices" \
        else _fmt(torch.randn(n, cr, h, w, dtype=dtype), layout == "cl")
    before, strides = out.clone(), out.stride()
    torch.ops.fastres_native.residual_act_(out, r, act)
    assert out.stride() == strides
    assert_close(out, ref.bn_act(before, None, None, None, None, ref.widen(r, k), act), name=f"{act} {layout}")
    if act == "identity":   # the channels past the residual's are not touched
        assert torch.equal(out[:, cr:], before[:, cr:])


@native_only
def test_residual_act_leaves_the_rest_of_a_buffer_alone():
    buf = torch.randn(2, 12, 4, 4).to(memory_format=CL)
    before = buf.clone()
    torch.ops.fastres_native.residual_act_(buf[:, 3:9], torch.ones(2, 4, 4, 4), "relu")
    assert torch.equal(buf[:, :3], before[:, :3]) and torch.equal(buf[:, 9:], before[:, 9:])
    assert torch.equal(buf[:, 3:7], (before[:, 3:7] + 1).relu()) and torch.equal(buf[:, 7:9], before[:, 7:9].relu())


@native_only
def test_residual_act_errors():
    out = torch.randn(2, 6, 4, 4)
    with pytest.raises(RuntimeError, match=r"residual must be \(N, C' <= C, H, W\)"):
        torch.ops.fastres_native.residual_act_(out, torch.randn(2, 7, 4, 4), "relu")
    with pytest.raises(RuntimeError, match="residual must be"):
        torch.ops.fastres_native.residual_act_(out, torch.randn(2, 3, 4, 5), "relu")
    with pytest.raises(RuntimeError, match="dtype"):
        torch.ops.fastres_native.residual_act_(out, torch.randn(2, 3, 4, 4, dtype=torch.float64), "relu")
    with pytest.raises(RuntimeError, match="unknown activation"):
        torch.ops.fastres_native.residual_act_(out, torch.randn(2, 3, 4, 4), "gelu")
    with pytest.raises(RuntimeError, match="channel slice of an NCHW or channels_last"):
        torch.ops.fastres_native.residual_act_(out.transpose(2, 3), torch.randn(2, 3, 4, 4), "relu")


@native_only
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
def test_residual_act_opcheck(cl):
    out = _fmt(torch.randn(2, 6, 3, 4), cl)
    opcheck(torch.ops.fastres_native.residual_act_.default, (out, _fmt(torch.randn(2, 4, 3, 4), cl), "silu"))


# ---- split_add ------------------------------------------------------------------------------------
def _split_inputs(dtype, cl, shape=(2, 26, 7, 5)):
    """x and slot: neighbouring channel slices of one buffer (Res2Net's conv1 output); y fresh."""
    n, w, h, wd = shape
    buf = _fmt(torch.randn(n, 4 * w, h, wd, dtype=dtype), cl)
    return buf, buf[:, 2 * w:3 * w], _fmt(torch.randn(n, w, h, wd, dtype=dtype), cl), buf[:, w:2 * w]


@pytest.mark.parametrize("backend", ["reference", pytest.param("native", marks=native_only)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("shape", [(2, 26, 7, 5), (3, 13, 1, 1), (1, 1, 6, 6)], ids=str)
def test_split_add(shape, cl, dtype, backend):
    """x + y (rounded once, as ATen's add), and y written into slot, nothing else of the buffer."""
    buf, x, y, slot = _split_inputs(dtype, cl, shape)
    before = buf.clone()
    w = shape[1]
    with B.recording() as rec:
        s = fastres.functional.split_add(x, y, slot, backend=backend)
    assert [r[2] for r in rec] == [backend]
    assert torch.equal(s, before[:, 2 * w:3 * w] + y)
    assert torch.equal(buf[:, w:2 * w], y)
    assert torch.equal(buf[:, :w], before[:, :w]) and torch.equal(buf[:, 2 * w:], before[:, 2 * w:])
    fmt = CL if cl and shape[2] * shape[3] > 1 else torch.contiguous_format
    assert s.is_contiguous(memory_format=fmt)


@native_only
def test_split_add_copies_inputs_of_other_layouts():
    buf, x, y, slot = _split_inputs(torch.float32, True)
    s = torch.ops.fastres_native.split_add(x.contiguous(), y.contiguous(), slot)
    assert torch.equal(s, x + y) and torch.equal(slot, y)


@pytest.mark.parametrize("backend", ["reference", pytest.param("native", marks=native_only)])
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
def test_split_add_opcheck(cl, backend):
    _, x, y, slot = _split_inputs(torch.float32, cl)
    opcheck(torch.ops.fastres.split_add.default, (x, y, slot, backend))
    if backend == "native":
        opcheck(torch.ops.fastres_native.split_add.default, (x, y, slot))


def test_split_add_errors():
    _, x, y, slot = _split_inputs(torch.float32, True)
    with pytest.raises(ValueError, match="y must match slot's shape"):
        fastres.functional.split_add(x, y[:, :3], slot)
    with pytest.raises(ValueError, match="x must match slot's shape .* dtype torch.float32"):
        fastres.functional.split_add(x.double(), y, slot)
    with pytest.raises(ValueError, match="slot must be 4-D"):
        fastres.functional.split_add(x[0], y[0], slot[0])


# ---- conv2d with a partial-channel residual -------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", pytest.param("native", marks=native_only)])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("groups", [1, 6], ids=["dense", "depthwise"])
@pytest.mark.parametrize("stats", [False, True], ids=["conv2d", "conv2d_stats"])
def test_conv2d_partial_residual(stats, groups, act, backend):
    """A residual of C' < K channels goes onto the first C' output channels: as the reference given
    it zero-extended, forward and backward, the residual's gradient of its own shape."""
    x = torch.randn(2, 6, 7, 5).to(memory_format=CL).requires_grad_()
    w = torch.randn(12, 6 // groups, 3, 3).requires_grad_()
    r = torch.randn(2, 5, 7, 5).to(memory_format=CL).requires_grad_()
    with B.recording() as rec:
        got = _conv(backend, x, w, r, act, stats=stats, groups=groups)
    assert {b for _, _, b, _ in rec} == {backend}, rec
    want = _conv("reference", x, w, TF.pad(r, (0, 0, 0, 0, 0, 7)), act, stats=stats, groups=groups)
    got, want = (got[0], want[0]) if stats else (got, want)
    g = torch.randn_like(want)
    grads, wgrads = (torch.autograd.grad(y, (x, w, r), g) for y in (got, want))
    assert_close(got, want, name="out")
    for name, a, e in zip("xwr", grads, wgrads):
        assert a.shape == e.shape, name
        assert_close(a, e, reduced=2 * 7 * 5 * 6, name=f"grad {name}")


@pytest.mark.parametrize("act", ["relu", "silu"])
def test_conv2d_partial_residual_gradcheck(act):
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    r = torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, r: _conv("reference", x, w, r, act), (x, w, r))


@pytest.mark.parametrize("backend", ["reference", pytest.param("native", marks=native_only)])
def test_conv2d_partial_residual_opcheck(backend):
    x, w = torch.randn(2, 6, 5, 5).to(memory_format=CL), torch.randn(8, 6, 3, 3)
    r = torch.randn(2, 3, 5, 5).to(memory_format=CL)
    args = (x, w, None, [1, 1], [1, 1], [1, 1], 1, None, None, None, None, "identity", False, None, r, "relu")
    opcheck(torch.ops.fastres.conv2d.default, args + (backend,))


@pytest.mark.parametrize("shape", [(2, 9, 5, 5), (2, 3, 5, 4), (1, 3, 5, 5), (2, 3, 5)], ids=str)
def test_conv2d_residual_that_does_not_fit(shape):
    x, w = torch.randn(2, 6, 5, 5), torch.randn(8, 6, 3, 3)
    with pytest.raises(ValueError, match=r"residual must be \(N, C', OH, OW\) = \(2, C' <= 8, 5, 5\)"):
        _conv("reference", x, w, torch.randn(shape), "relu")


# ---- the blocks -----------------------------------------------------------------------------------
@native_only
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("in_chs,out_chs", [(16, 27), (16, 16)])
def test_rexnet_shortcut_onto_the_first_channels(in_chs, out_chs, train, monkeypatch):
    """ReXNet's shortcut goes onto the first in_channels output channels: the block equals the
    block without it plus the zero-extended input. In eval the narrow shortcut reaches the kernel
    as it is (oneDNN, then residual_act_ on those channels), never zero-extended."""
    import copy

    from fastres.nn.rexnet import LinearBottleneck
    torch.manual_seed(0)
    blk = LinearBottleneck(in_chs, out_chs, 1, exp_ratio=6.0, se_ratio=0.25, ch_div=1, backend="native")
    for m in blk.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2)
    plain = copy.deepcopy(blk)
    plain.use_shortcut = False
    blk.train(train), plain.train(train)
    x = torch.randn(2, in_chs, 8, 8).to(memory_format=CL)
    calls = []
    real = torch.ops.fastres_native.residual_act_
    monkeypatch.setattr(torch.ops.fastres_native, "residual_act_", lambda *a: calls.append(a[1].shape) or real(*a))
    with torch.no_grad():
        y, y0 = blk(x), plain(x)
    assert_close(y, y0 + TF.pad(x, (0, 0, 0, 0, 0, out_chs - in_chs)))
    assert calls == ([] if train or in_chs == out_chs else [x.shape])


@native_only
def test_res2net_eval_chain_in_place():
    """Without autograd, on oneDNN, a Res2Net block builds the concatenation in conv1's output
    (split_add per hierarchical add, no cat) and gives what the concatenating chain gives; with
    autograd recording, or on a stage's first block, it concatenates."""
    from fastres.nn.res2net import Bottle2neck
    torch.manual_seed(0)
    blk = Bottle2neck(64, 16, backend="native").eval()
    first = Bottle2neck(64, 16, stride=2, downsample=torch.nn.Conv2d(64, 64, 1, 2), backend="native").eval()
    x = torch.randn(2, 64, 9, 9).to(memory_format=CL)
    with torch.no_grad():
        assert blk._in_place(x) and not first._in_place(x)
        with B.recording() as rec:
            y = blk(x)
        ops = [op for _, op, _, _ in rec]
        assert ops.count("split_add") == len(blk.convs) - 1, ops
    assert not blk._in_place(x.clone().requires_grad_())
    with B.recording() as rec:
        want = blk(x.clone().requires_grad_())   # eval under autograd: the concatenating chain
    assert "split_add" not in [op for _, op, _, _ in rec]
    assert_close(y, want.detach())
