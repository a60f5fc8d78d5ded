"""fastres::cat_conv2d_stats, a conv of a concatenation whose parts carry their own BN-act: the
reference against the same maths written out in eager ops, float64 gradcheck, the native backend
against the reference, opcheck, clear errors, and that the concatenation is not saved for
backward (the triton backend is checked in tests/triton_interp/test_cat_conv.py)."""
import pytest
import torch
import torch.nn.functional as TF
from torch.library import opcheck

from fastres import backend as B
from fastres import functional as F
from tests.utils import assert_close

CL = torch.channels_last
SIZES = (3, 3, 2)


def make(dtype=torch.float32, cl=True, prologue=(True, True, False), training=True, grad=True, hw=(5, 4)):
    """parts, their prologue vectors (over all channels), conv weight and bias; the prologue's
    mean/invstd are the parts' batch statistics (training) or running-like values."""
    parts = [torch.randn(2, c, *hw, dtype=dtype) for c in SIZES]
    parts = [p.to(memory_format=CL) if cl else p for p in parts]
    stats = [torch.var_mean(p, (0, 2, 3), correction=0) if training else (torch.rand(p.shape[1], dtype=dtype) + .5,
             torch.randn(p.shape[1], dtype=dtype)) for p in parts]
    pm = torch.cat([m for _, m in stats])
    pi = torch.cat([torch.rsqrt(v + 1e-5) for v, _ in stats])
    pw, pb = torch.rand(8, dtype=dtype) + 0.5, torch.randn(8, dtype=dtype)
    w, b = torch.randn(7, 8, 1, 1, dtype=dtype), torch.randn(7, dtype=dtype)
    if grad:
        for t in (*parts, pw, pb, w, b):
            t.requires_grad_()
    return parts, pw, pb, pm, pi, list(prologue), [training] * 3, w, b


def run(backend, parts, pw, pb, pm, pi, prologue, training, w, b, act="relu"):
    return torch.ops.fastres.cat_conv2d_stats(parts, pw, pb, pm, pi, act, prologue, training, w, b, [1, 1], [0, 0],
                                              [1, 1], 1, backend)


def written_out(parts, pw, pb, pm, pi, prologue, training, w, b, act="relu"):
    """The same maths in eager ops; with training the statistics are recomputed from the parts, so
    their gradient terms are included."""
    acts, off = [], 0
    for p, pro, train in zip(parts, prologue, training):
        c = p.shape[1]
        if pro:
            if train:
                var, mean = torch.var_mean(p, (0, 2, 3), correction=0)
                invstd = torch.rsqrt(var + 1e-5)
            else:
                mean, invstd = pm[off:off + c], pi[off:off + c]
            z = (p - mean[:, None, None]) * invstd[:, None, None] * pw[off:off + c, None, None] + pb[off:off + c, None, None]
            acts.append({"relu": TF.relu, "silu": TF.silu}[act](z))
        else:
            acts.append(p)
        off += c
    y = TF.conv2d(torch.cat(acts, 1), w, b)
    return y, y.mean((0, 2, 3)), y.var((0, 2, 3), correction=0)


def _leaves(args):
    parts, pw, pb, *_, w, b = args
    return [*parts, pw, pb, w, b]


@pytest.mark.parametrize("backend", ["reference", "native"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("prologue", [(True, True, False), (True, True, True), (False, True, False)], ids=str)
@pytest.mark.parametrize("cl", [True, False], ids=["cl", "nchw"])
def test_matches_written_out(cl, prologue, training, backend):
    if backend == "native" and B.NATIVE_MISSING is not None:
        pytest.skip(B.NATIVE_MISSING)
    args = make(cl=cl, prologue=prologue, training=training)
    with B.recording() as rec:
        got = run(backend, *args)
    assert {r[2] for r in rec} == {backend}, rec
    want = written_out(*args)
    for name, a, e in zip(("out", "mean", "var"), got, want):
        assert_close(a, e, reduced=2 * 20, name=name)
    g = torch.randn_like(want[0])
    for name, a, e in zip(("part0", "part1", "part2", "pre_weight", "pre_bias", "weight", "bias"),
                          torch.autograd.grad(got[0], _leaves(args), g), torch.autograd.grad(want[0], _leaves(args), g)):
        assert a.shape == e.shape, name
        assert_close(a, e, reduced=2 * 20 * 8, name=f"grad {name}")


@pytest.mark.parametrize("act", ["relu", "silu"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck(training, act):
    args = make(torch.float64, prologue=(True, False, True), training=training, hw=(3, 3))

    def f(p0, p1, p2, pw, pb, w, b):
        parts = [p0, p1, p2]
        if training:   # the statistics as a function of the parts, as a training BN computes them
            stats = [torch.var_mean(p, (0, 2, 3), correction=0) for p in parts]
            pm = torch.cat([m for _, m in stats]).detach()
            pi = torch.cat([torch.rsqrt(v + 1e-5) for v, _ in stats]).detach()
        else:
            pm, pi = args[3], args[4]
        return run("reference", parts, pw, pb, pm, pi, args[5], args[6], w, b, act)[0]
    # with training the prologue's backward includes the statistics' terms, so the gradient is
    # that of the written-out maths, whose statistics depend on the parts
    if training:
        leaves = _leaves(args)
        g = torch.randn(2, 7, 3, 3, dtype=torch.float64)
        got = torch.autograd.grad(f(*leaves), leaves, g)
        want = torch.autograd.grad(written_out(*args, act=act)[0], leaves, g)
        for a, e in zip(got, want):
            assert_close(a, e)
    else:
        assert torch.autograd.gradcheck(f, tuple(_leaves(args)))


def test_written_out_gradcheck_anchors_the_training_case():
    """The written-out maths (the oracle of the training gradients above) against finite differences."""
    args = make(torch.float64, prologue=(True, False, True), training=True, hw=(3, 3))
    rest = args[3:7]

    def f(p0, p1, p2, pw, pb, w, b):
        return written_out([p0, p1, p2], pw, pb, *rest, w, b)[0]
    assert torch.autograd.gradcheck(f, tuple(_leaves(args)))


@pytest.mark.parametrize("backend", ["reference", "native"])
def test_opcheck(backend):
    if backend == "native" and B.NATIVE_MISSING is not None:
        pytest.skip(B.NATIVE_MISSING)
    parts, pw, pb, pm, pi, prologue, training, w, b = make()
    opcheck(torch.ops.fastres.cat_conv2d_stats.default,
            (parts, pw, pb, pm, pi, "relu", prologue, training, w, b, [1, 1], [0, 0], [1, 1], 1, backend))


def written_out_input(parts, pw, pb, pm, pi, prologue, act="relu"):
    """cat_bn_act's result in eager ops: each part's BN-act with the given statistics, then cat."""
    acts, off = [], 0
    for p, pro in zip(parts, prologue):
        c = p.shape[1]
        z = (p - pm[off:off + c, None, None]) * pi[off:off + c, None, None] * pw[off:off + c, None, None] \
            + pb[off:off + c, None, None]
        acts.append({"relu": TF.relu, "silu": TF.silu}[act](z) if pro else p)
        off += c
    return torch.cat(acts, 1)


@pytest.mark.parametrize("backend", ["reference", "native"])
@pytest.mark.parametrize("prologue", [(True, True, False), (False, False, False)], ids=str)
@pytest.mark.parametrize("cl", [True, False], ids=["cl", "nchw"])
def test_cat_bn_act_is_the_concatenated_prologues(cl, prologue, backend):
    """The backward's recomputed input: values and layout (strides) those of torch.cat of the
    BN-acts, also for parts that carry no prologue (a copy, never the input itself)."""
    if backend == "native" and B.NATIVE_MISSING is not None:
        pytest.skip(B.NATIVE_MISSING)
    parts, pw, pb, pm, pi, prologue, *_ = make(cl=cl, prologue=prologue, grad=False)
    with B.recording() as rec:
        got = torch.ops.fastres.cat_bn_act(parts, pw, pb, pm, pi, "relu", prologue, backend)
    assert {r[2] for r in rec if r[1] == "cat_bn_act"} == {backend}, rec
    want = written_out_input(parts, pw, pb, pm, pi, prologue)
    assert_close(got, want)
    assert got.stride() == want.stride()
    one = torch.ops.fastres.cat_bn_act(parts[:1], pw[:3], pb[:3], pm[:3], pi[:3], "relu", [False], backend)
    assert one.data_ptr() != parts[0].data_ptr()
    assert_close(one, parts[0])


@pytest.mark.parametrize("backend", ["reference", "native"])
def test_cat_bn_act_opcheck(backend):
    if backend == "native" and B.NATIVE_MISSING is not None:
        pytest.skip(B.NATIVE_MISSING)
    parts, pw, pb, pm, pi, prologue, *_ = make(grad=False)
    opcheck(torch.ops.fastres.cat_bn_act.default, (parts, pw, pb, pm, pi, "relu", prologue, backend))


def test_concatenation_not_saved():
    """What autograd keeps: the parts and the per-channel vectors, not the (N, C, H, W) input of
    the conv."""
    args = make()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        run("reference", *args)
    big = [t for t in saved if t.dim() == 4 and t.shape[:2] == (2, sum(SIZES))]
    assert not big, [tuple(t.shape) for t in saved]
    assert {id(t) for t in args[0]} <= {id(t) for t in saved}


def test_functional_joins_the_prologues():
    """F.cat_conv2d_stats from per-part bn_prologue dicts (None: no BN) gives the op's result."""
    parts, pw, pb, pm, pi, prologue, training, w, b = make(prologue=(True, False, True))
    cut = lambda v: torch.split(v, SIZES)  # noqa: E731
    pres = [dict(pre_weight=cut(pw)[i], pre_bias=cut(pb)[i], pre_mean=cut(pm)[i], pre_invstd=cut(pi)[i],
                 pre_training=True) if prologue[i] else None for i in range(3)]
    y, (mean, var) = F.cat_conv2d_stats(parts, pres, w, b, backend="reference")
    want = written_out(parts, pw, pb, pm, pi, prologue, training, w, b)
    assert_close(y, want[0])
    assert_close(mean, want[1], reduced=40)


def test_errors():
    parts, pw, pb, pm, pi, prologue, training, w, b = make(grad=False)
    op = torch.ops.fastres.cat_conv2d_stats
    tail = ([1, 1], [0, 0], [1, 1], 1, "reference")
    with pytest.raises(ValueError, match="needs at least one part"):
        op([], pw, pb, pm, pi, "relu", [], [], w, b, *tail)
    with pytest.raises(ValueError, match="one entry per part"):
        op(parts, pw, pb, pm, pi, "relu", prologue[:2], training, w, b, *tail)
    with pytest.raises(ValueError, match=r"part 1 must be \(N, C_i, H, W\) = \(2, \*, 5, 4\)"):
        op([parts[0], parts[1][:, :, :4], parts[2]], pw, pb, pm, pi, "relu", prologue, training, w, b, *tail)
    with pytest.raises(ValueError, match=r"pre_weight must have one value per channel of the parts \(8,\)"):
        op(parts, pw[:5], pb, pm, pi, "relu", prologue, training, w, b, *tail)
    with pytest.raises(ValueError, match="pre_training=True needs the batch mean and invstd"):
        op(parts, pw, pb, None, pi, "relu", prologue, training, w, b, *tail)
    with pytest.raises(ValueError, match=r"weight must be \(K, C/groups, R, S\) with C = 8"):
        op(parts, pw, pb, pm, pi, "relu", prologue, training, w[:, :6], b, *tail)
    with pytest.raises(ValueError, match="unknown activation"):
        op(parts, pw, pb, pm, pi, "gelu", prologue, training, w, b, *tail)
    with pytest.raises(ValueError, match=r"fastres.cat_bn_act: pre_bias must have one value per channel"):
        torch.ops.fastres.cat_bn_act(parts, pw, pb[:5], pm, pi, "relu", prologue, "reference")
