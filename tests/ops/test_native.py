"""The compiled kernels (torch.ops.fastres_native.*, csrc/) on CPU against the reference, and the
public ops routed to them (backend="native").

fastres_native::bn_act / bn_act_backward take the arguments of fastres.ops.reference.bn_act /
bn_act_backward and must return what they return. Half-precision kernels are compared with the
reference run on the same half inputs (both compute in fp32 and round once).
"""
import itertools

import pytest
import torch
from torch.library import opcheck

import fastres  # noqa: F401
from fastres.backend import NATIVE_MISSING
from fastres.ops import ACTS
from fastres.ops import reference as ref
from tests.utils import assert_close

if NATIVE_MISSING is not None:
    pytest.skip(f"native kernels unavailable: {NATIVE_MISSING}", allow_module_level=True)

from fastres import _C  # noqa: E402

native = torch.ops.fastres_native
CL = torch.channels_last
HALF = (torch.float16, torch.bfloat16)
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
TERMS = "wbmir"  # weight, bias, mean, invstd, residual
COMBOS = [set(c) for k in range(len(TERMS) + 1) for c in itertools.combinations(TERMS, k)]
MASKS = [list(m) for m in itertools.product([False, True], repeat=4)]
ODD_SHAPES = [(2, 37, 15, 15), (3, 16, 1, 1), (1, 8, 7, 7), (2, 1, 5, 3), (0, 5, 4, 4)]
GRADS = ("x", "residual", "weight", "bias")


def _fmt(t, cl):
    return t.to(memory_format=CL) if cl else t.contiguous()


def _shape_id(s):
    return "x".join(map(str, s))


def _inputs(shape, dtype, cl, terms, training, other_cl=None):
    """x, then weight, bias, mean, invstd (accumulation dtype; the batch statistics of x when
    training, else running-like values) and residual, each None unless in `terms`."""
    pdt = torch.float32 if dtype in HALF else dtype
    C = shape[1]
    x = _fmt(3 * torch.randn(shape, dtype=dtype) + 1, cl)
    if training:
        mean, var = ref.batch_stats(x)
        invstd = torch.rsqrt(var + 1e-5)
    else:
        mean, invstd = torch.randn(C, dtype=pdt), torch.rand(C, dtype=pdt) + 0.5
    vals = {"w": torch.rand(C, dtype=pdt) + 0.5, "b": torch.randn(C, dtype=pdt), "m": mean, "i": invstd,
            "r": _fmt(torch.randn(shape, dtype=dtype), cl if other_cl is None else other_cl)}
    return (x,) + tuple(vals[k] if k in terms else None for k in TERMS)


def _check_forward(args, act, name=""):
    y = native.bn_act(*args, act)
    x = args[0]
    assert y.dtype == x.dtype
    assert y.stride() == torch.empty_like(x).stride(), "output must keep the input's memory format"
    assert_close(y, ref.bn_act(*args, act), name=f"forward {act} {name}")
    return y


def _masked(full, mask, args, grad):
    """What the reference returns for `mask`, given its all-True result (test_masked_matches_reference)."""
    asked = (mask[0], mask[1], mask[2] and args[1] is not None, mask[3] and args[2] is not None)
    return [f if a else grad.new_empty(0) for f, a in zip(full, asked)]


def _check_backward(args, act, training, masks=MASKS, grad_cl=None, name=""):
    x = args[0]
    out = ref.bn_act(*args, act)
    saved = out if act in ("relu", "relu6") else None
    g = _fmt(torch.randn(x.shape, dtype=x.dtype), x.is_contiguous(memory_format=CL) if grad_cl is None else grad_cl)
    full = ref.bn_act_backward(g, *args, saved, act, training, [True] * 4)
    reduced = max(1, x.numel() // max(x.shape[1], 1))
    for mask in masks:
        got = native.bn_act_backward(g, *args, saved, act, training, mask)
        for gname, a, e, n in zip(GRADS, got, _masked(full, mask, args, g), (1, 1, reduced, reduced)):
            label = f"grad {gname} {act} train={training} mask={mask} {name}"
            assert a.dtype == e.dtype, f"{label}: dtype {a.dtype} != {e.dtype}"
            assert_close(a, e, reduced=n, name=label)
        if saved is not None:   # without a saved output: the same mask, from the output recomputed
            own = native.bn_act_backward(g, *args, native.bn_act(*args, act), act, training, mask)
            for gname, a, e in zip(GRADS, native.bn_act_backward(g, *args, None, act, training, mask), own):
                assert_close(a, e, dtype=torch.float32, reduced=reduced, name=f"recomputed {gname} {act} {name}")


def _terms_id(terms):
    return "".join(sorted(terms, key=TERMS.index)) or "none"


# ---- bn_act --------------------------------------------------------------------------------------
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
def test_bn_act(act, dtype, cl):
    """Every combination of the optional terms, with running and with batch statistics."""
    for terms, training in itertools.product(COMBOS, [False, True]):
        _check_forward(_inputs((2, 37, 15, 15), dtype, cl, terms, training), act, name=_terms_id(terms))


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
def test_bn_act_backward(act, training, dtype, cl):
    """Every combination of the optional terms × every output_mask: the grads asked for match,
    the others are empty like the reference's."""
    for terms in COMBOS:
        _check_backward(_inputs((2, 37, 6, 5), dtype, cl, terms, training), act, training, name=_terms_id(terms))


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("act", ACTS)
def test_masked_matches_reference(training, act):
    """_masked reproduces the reference's own answer for each mask (values, dtypes, empties)."""
    for terms in (set(TERMS), {"m", "i"}):
        args = _inputs((2, 5, 3, 4), torch.bfloat16, False, terms, training)
        out = ref.bn_act(*args, act)
        g = torch.randn_like(args[0])
        full = ref.bn_act_backward(g, *args, out, act, training, [True] * 4)
        for mask in MASKS:
            want = ref.bn_act_backward(g, *args, out, act, training, mask)
            for a, e in zip(_masked(full, mask, args, g), want):
                assert a.dtype == e.dtype and torch.equal(a, e)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
def test_relu6_recomputed_mask_rounds_like_the_forward(cl, training):
    """bf16 pre-activations around 6: z a little below 6 is stored as y = 6 (masked). Without a saved
    output the backward must recompute that rounded y, not test z < 6."""
    x = _fmt((torch.rand(2, 37, 6, 5) * 0.2 + 5.9).bfloat16(), cl)
    args = (x, torch.full((37,), 1.003), torch.zeros(37), torch.zeros(37), torch.ones(37), None)
    y = native.bn_act(*args, "relu6")
    assert ((y == 6) & (x.float() * 1.003 < 6)).any(), "the inputs must include values that round up to 6"
    g = torch.randn(x.shape).bfloat16()
    for mask in MASKS:
        want = native.bn_act_backward(g, *args, y, "relu6", training, mask)
        got = native.bn_act_backward(g, *args, None, "relu6", training, mask)
        for gname, a, e in zip(GRADS, got, want):
            assert_close(a, e, dtype=torch.float32, reduced=x.numel() // 37, name=f"{gname} mask={mask}")


@pytest.mark.parametrize("shape", ODD_SHAPES, ids=_shape_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
def test_odd_shapes(shape, dtype, cl):
    for act, training in itertools.product(["relu6", "silu"], [False, True]):
        args = _inputs(shape, dtype, cl, set(TERMS), training)
        _check_forward(args, act)
        _check_backward(args, act, training)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cl", [False, True], ids=["x_nchw", "x_cl"])
@pytest.mark.parametrize("act", ACTS)
def test_residual_and_grad_in_other_format(dtype, cl, act):
    for training in (False, True):
        args = _inputs((2, 37, 15, 15), dtype, cl, set(TERMS), training, other_cl=not cl)
        _check_forward(args, act)
        _check_backward(args, act, training, masks=[[True] * 4], grad_cl=not cl)


@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("act", ["identity", "relu"])
def test_training_backward_large_mean(cl, act):
    """x = 1000 + N(0, 1) in fp32 against a float64 run on the same values: the x grad's sums must
    be taken around the mean (Σ gz·(x - mean)), as Σ gz·x - mean·Σ gz loses the digits. (silu is
    left out: its z = x * scale + shift, the reference's and ATen's form, itself carries an
    error of |mean * scale| * eps in fp32, so its gz does not match a float64 run that closely.)"""
    shape = (4, 24, 20, 20)
    x = _fmt(1000 + torch.randn(shape), cl)
    mean, var = native.batch_stats(x)
    invstd = torch.rsqrt(var + 1e-5)
    w, b = torch.rand(24) + 0.5, torch.randn(24)
    g = _fmt(torch.randn(shape), cl)
    out = ref.bn_act(x.double(), w.double(), b.double(), mean.double(), invstd.double(), None, act).float()
    got = native.bn_act_backward(g, x, w, b, mean, invstd, None, out, act, True, [True] * 4)
    want = ref.bn_act_backward(g.double(), x.double(), w.double(), b.double(), mean.double(), invstd.double(),
                               None, out.double(), act, True, [True] * 4)
    n = x.numel() // x.shape[1]
    for gname, a, e, red in zip(GRADS, got, want, (1, 1, n, n)):
        assert_close(a, e, dtype=torch.float32, reduced=red, name=f"grad {gname}")
    # The weight grad S1 from the uncentred sums, in fp32, is far outside its bound (so this test
    # can fail); that error also reaches the x grad through S1 / n.
    gz = want[1].float()  # dL/dz = the residual grad
    s1 = ((gz * x).sum((0, 2, 3)) - mean * gz.sum((0, 2, 3))) * invstd
    with pytest.raises(AssertionError):
        assert_close(s1, want[2], dtype=torch.float32, reduced=n, name="uncentred")


# ---- memory formats, errors, determinism -----------------------------------------------------------
def _copies(fn, shape) -> list[str]:
    """The copies of `shape`-sized tensors that fn makes (per-channel vectors do not count)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    return [e.name for e in prof.events() if e.name in ("aten::copy_", "aten::clone", "aten::_to_copy")
            and list(shape) in e.input_shapes]


@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
def test_no_copy_of_contiguous_inputs(cl):
    """Contiguous NCHW and channels_last tensors are read in place; only a residual in the other
    format is copied (which shows the profiler check sees copies)."""
    x, w, b, m, i, r = _inputs((2, 16, 9, 9), torch.float32, cl, set(TERMS), True)
    out = native.bn_act(x, w, b, m, i, r, "relu")
    g = torch.randn_like(x)
    assert out.is_contiguous(memory_format=CL if cl else torch.contiguous_format)
    assert _copies(lambda: native.bn_act(x, w, b, m, i, r, "relu"), x.shape) == []
    for training in (False, True):
        assert _copies(lambda: native.bn_act_backward(g, x, w, b, m, i, r, out, "relu", training, [True] * 4),
                       x.shape) == []
    assert _copies(lambda: native.batch_stats(x), x.shape) == []
    r_other = _fmt(r, not cl)
    assert _copies(lambda: native.bn_act(x, w, b, m, i, r_other, "relu"), x.shape) != []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(2, 37, 5, 7), (3, 16, 4, 4), (2, 8, 1, 1)], ids=_shape_id)
def test_channel_slice_of_channels_last_is_read_in_place(shape, dtype):
    """bn_act and batch_stats read a channel slice of a wider channels_last buffer (DenseNet's
    prefix of its features) where it is: the results are the reference's, the output is dense
    channels_last, and no x-sized copy is made. The backward takes a dense copy and is exact too."""
    n, c, h, w = shape
    buf = _fmt(torch.randn(n, c + 11, h, w, dtype=dtype) * 3 + 1, True)
    for x in (buf[:, :c], buf[:, 5:5 + c]):
        assert not x.is_contiguous(memory_format=CL) or h * w == 1
        _, wt, b, m, i, r = _inputs(shape, dtype, True, set(TERMS), False)
        y = _check_forward((x, wt, b, m, i, r), "relu")
        assert y.is_contiguous(memory_format=CL)
        assert _copies(lambda: native.bn_act(x, wt, b, m, i, r, "relu"), x.shape) == []
        for got, want in zip(native.batch_stats(x), ref.batch_stats(x)):
            assert_close(got, want, reduced=n * h * w, name="batch_stats")
        assert _copies(lambda: native.batch_stats(x), x.shape) == []
        _check_backward((x, wt, b, m, i, r), "relu", False, masks=[[True] * 4], name="slice")


def test_strided_input_falls_back_to_a_copy():
    x = torch.randn(2, 8, 10, 12)[:, :, ::2, 1:]
    w = torch.rand(8) + 0.5
    _check_forward((x, w, None, None, None, None), "relu")


# ---- se_gate_act ----------------------------------------------------------------------------------
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("shape", [(3, 37, 5, 7), (2, 300, 28, 28), (2, 16, 1, 1), (0, 4, 3, 3)], ids=_shape_id)
def test_se_gate_act(shape, act, dtype, cl):
    """Forward and backward against the reference: every activation, with and without the residual,
    several tiles per image in channels_last (300 x 28 x 28), 1x1 and empty inputs."""
    for residual in (False, True):
        x = _fmt(torch.randn(shape, dtype=dtype), cl)
        gate = torch.randn(shape[:2], dtype=dtype)
        r = _fmt(torch.randn(shape, dtype=dtype), not cl) if residual else None   # the other layout
        y = native.se_gate_act(x, gate, r, act)
        assert y.stride() == torch.empty_like(x).stride()
        assert_close(y, ref.se_gate_act(x, gate, r, act), name=f"forward {act}")
        g = torch.randn(shape, dtype=dtype)
        got = native.se_gate_act_backward(g, x, gate, r, y, act)
        want = ref.se_gate_act_backward(g, x, gate, r, y, act)
        for name, a, e, n in zip(("x", "gate", "residual"), got, want, (1, shape[2] * shape[3], 1)):
            if e is None:
                assert a.numel() == 0, name
                continue
            assert a.dtype == e.dtype and a.shape == e.shape, name
            assert_close(a, e, reduced=n, name=f"grad {name} {act}")


def test_se_gate_act_through_the_op():
    """torch.ops.fastres.se_gate_act on the native backend: opcheck, and autograd reaches the kernel."""
    x = torch.randn(2, 6, 4, 5).to(memory_format=CL)
    gate, r = torch.randn(2, 6), torch.randn(2, 6, 4, 5)
    opcheck(torch.ops.fastres.se_gate_act.default, (x, gate, r, "relu", "native"))
    with fastres.backend.recording() as rec:
        xg = x.clone().requires_grad_()
        torch.ops.fastres.se_gate_act(xg, gate, r, "silu", "native").sum().backward()
    assert [(op, b) for _, op, b, _ in rec] == [("se_gate_act", "native"), ("se_gate_act_backward", "native")]


def test_errors():
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(RuntimeError, match="unknown activation"):
        native.bn_act(x, None, None, None, None, None, "gelu")
    with pytest.raises(RuntimeError, match="one value per channel"):
        native.bn_act(x, torch.ones(4), None, None, None, None, "relu")
    with pytest.raises(RuntimeError, match="one value per channel"):
        native.bn_act(x, None, None, torch.ones(2), None, None, "relu")
    with pytest.raises(RuntimeError, match="output_mask must have 4 entries"):
        native.bn_act_backward(x, x, None, None, None, None, None, None, "silu", False, [True] * 3)
    with pytest.raises(RuntimeError, match="4-D"):
        native.batch_stats(torch.randn(2, 3, 4))
    with pytest.raises(RuntimeError, match=r"gate must be \(N, C\) = \(2, 3\)"):
        native.se_gate_act(x, torch.randn(2, 4), None, "relu")
    with pytest.raises(RuntimeError, match="saved output"):
        native.se_gate_act_backward(x, x, torch.randn(2, 3), None, None, "relu")


def test_results_do_not_depend_on_thread_count():
    args = _inputs((4, 24, 20, 20), torch.float32, True, set(TERMS), True)
    g = torch.randn_like(args[0])

    gate = torch.randn(4, 24)

    def run():
        return (*native.batch_stats(args[0]), native.bn_act(*args, "silu"),
                *native.bn_act_backward(g, *args, None, "silu", True, [True] * 4),
                *native.se_gate_act_backward(g, args[0], gate, args[-1], None, "silu"))

    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(2)
        two = run()
    finally:
        torch.set_num_threads(prev)
    for a, e in zip(one, two):
        assert torch.equal(a, e)


# ---- batch_stats ---------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", ODD_SHAPES[:-1], ids=_shape_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
def test_batch_stats(shape, dtype, cl):
    x = _fmt(torch.randn(shape, dtype=dtype) * 2 + 0.5, cl)
    mean, var = native.batch_stats(x)
    emean, evar = ref.batch_stats(x)
    n = x.numel() // x.shape[1]
    for name, a, e in (("mean", mean, emean), ("var", var, evar)):
        assert a.dtype == e.dtype and a.shape == e.shape, name
        assert_close(a, e, reduced=n, name=name)


@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("shape", [(4, 7, 24, 24), (64, 3, 1, 1), (2, 300, 9, 9)], ids=str)
def test_batch_stats_large_mean(shape, cl):
    """1000 + N(0, 1) in fp32: E[x^2] - E[x]^2 would lose every digit of the variance."""
    x = _fmt(1000 + torch.randn(shape), cl)
    mean, var = native.batch_stats(x)
    emean, evar = ref.batch_stats(x.double())  # exact statistics of the same fp32 values
    assert_close(mean, emean.float(), name="mean")
    assert_close(var, evar.float(), name="var")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_batch_stats_empty_is_nan(dtype):
    mean, var = native.batch_stats(torch.empty(0, 5, 3, 3, dtype=dtype))
    assert mean.shape == var.shape == (5,)
    assert mean.dtype == (torch.float32 if dtype in HALF else dtype)
    assert mean.isnan().all() and var.isnan().all()


@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
def test_no_channels(cl):
    """A (2, 0, 3, 3) input: empty outputs and statistics, as the reference gives, not a crash."""
    x = _fmt(torch.randn(2, 0, 3, 3), cl)
    mean, var = native.batch_stats(x)
    assert mean.shape == var.shape == (0,)
    v = torch.empty(0)
    assert native.bn_act(x, v, v, v, v, None, "relu").shape == x.shape
    got = native.bn_act_backward(x, x, v, v, v, v, None, None, "relu", True, [True, False, True, True])
    want = ref.bn_act_backward(x, x, v, v, v, v, None, None, "relu", True, [True, False, True, True])
    assert [tuple(t.shape) for t in got] == [tuple(t.shape) for t in want]


# ---- the public ops on the native backend ------------------------------------------------------------
def _public_args(act, training, cl, dtype=torch.float32):
    ops = torch.ops.fastres
    x = _fmt(3 * torch.randn(2, 6, 5, 4, dtype=dtype) + 1, cl).requires_grad_()
    w = (torch.rand(6, dtype=dtype) + 0.5).requires_grad_()
    b = torch.randn(6, dtype=dtype).requires_grad_()
    r = _fmt(torch.randn(2, 6, 5, 4, dtype=dtype), cl).requires_grad_()
    if training:
        mean, var = ops.batch_stats(x.detach(), "reference")
        invstd = torch.rsqrt(var + 1e-5)
    else:
        mean, invstd = torch.randn(6, dtype=dtype), torch.rand(6, dtype=dtype) + 0.5
    return x, w, b, mean, invstd, r


@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("act", ACTS)
def test_public_bn_act_native_matches_reference(act, training, cl):
    x, w, b, mean, invstd, r = _public_args(act, training, cl)
    leaves = (x, w, b, r)
    results = {}
    for backend in ("native", "reference"):
        with fastres.backend.recording() as rec:
            y = torch.ops.fastres.bn_act(x, w, b, mean, invstd, r, act, training, backend)
            g = torch.autograd.grad(y, leaves, torch.ones_like(y) + torch.arange(y.numel()).view(y.shape) % 3)
        assert {backend} == {entry[2] for entry in rec}, rec
        results[backend] = (y, *g)
    n = x.numel() // x.shape[1]
    for name, a, e, red in zip(("out", "x", "weight", "bias", "residual"), results["native"], results["reference"],
                               (1, 1, n, n, 1)):
        assert_close(a, e, reduced=red, name=name)


@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("act", ["relu", "silu"])
def test_public_opcheck_native(act, training, cl):
    x, w, b, mean, invstd, r = _public_args(act, training, cl, torch.float64)
    opcheck(torch.ops.fastres.bn_act.default, (x, w, b, mean, invstd, r, act, training, "native"))


@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
def test_public_batch_stats_native(cl):
    x = _fmt(torch.randn(3, 5, 4, 4, dtype=torch.float64), cl).requires_grad_()
    got, want = (torch.ops.fastres.batch_stats(x, backend) for backend in ("native", "reference"))
    for a, e in zip(got, want):
        assert_close(a, e, reduced=x.numel() // 5)
    opcheck(torch.ops.fastres.batch_stats.default, (x, "native"))


# ---- registration --------------------------------------------------------------------------------
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
def test_opcheck_schema(cl):
    """The kernel-level schemas' aliasing and mutation claims hold (fake/autograd registration is
    the public ops' business, checked above)."""
    x, w, b, m, i, r = _inputs((2, 5, 3, 4), torch.float32, cl, set(TERMS), True)
    y = native.bn_act(x, w, b, m, i, r, "relu")
    utils = ("test_schema",)
    opcheck(native.bn_act.default, (x, w, b, m, i, r, "relu"), test_utils=utils)
    opcheck(native.bn_act.default, (x, None, None, None, None, None, "identity"), test_utils=utils)
    g = torch.randn_like(x)
    for training in (False, True):
        opcheck(native.bn_act_backward.default, (g, x, w, b, m, i, r, y, "relu", training, [True] * 4),
                test_utils=utils)
    opcheck(native.batch_stats.default, (x,), test_utils=utils)


@pytest.mark.parametrize("op", ["bn_act", "bn_act_backward", "batch_stats", "se_gate_act",
                                "se_gate_act_backward", "residual_act_", "split_add"])
def test_built_with_cuda_says_which_kernels_exist(op):
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    assert has(f"fastres_native::{op}", "CPU")
    assert has(f"fastres_native::{op}", "CUDA") == _C.built_with_cuda


def test_cuda_kernels_compile_without_spills():
    """The CUDA half of fastres._C (built for sm_80 and sm_90, never run here): every kernel
    instance, the SE ones included, without stack frames or local memory (ptxas spills)."""
    import re
    import subprocess

    from fastres import gpu_report
    if not _C.built_with_cuda:
        pytest.skip("fastres._C was built without CUDA")
    try:
        tool = gpu_report.cuobjdump()
    except ImportError:
        pytest.skip("cuobjdump ships with triton, which is not installed")
    text = subprocess.run([tool, "--dump-resource-usage", _C.__file__], check=True, capture_output=True,
                          text=True).stdout
    usage = re.findall(r"Function (\S+):\s+REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", text)
    names = " ".join(u[0] for u in usage)
    for kernel in ("bn_act_kernel", "bn_act_reduce_kernel", "batch_stats_kernel", "se_gate_act_kernel",
                   "se_gate_grad_kernel", "residual_act_kernel", "split_add_kernel"):
        assert kernel in names, f"{kernel} missing from the CUDA build"
    spills = [(name, stack, local) for name, _, stack, local in usage if int(stack) or int(local)]
    assert not spills, spills
    assert max(int(u[1]) for u in usage) <= 255


# ---- the CPU kernel builds (one per ISA) ----------------------------------------------------------
def test_loaded_cpu_build_is_the_one_torch_runs_at():
    """The CPU kernels come from the build matching torch's CPU capability, and from it alone:
    two builds would register two CPU implementations of each op."""
    import platform
    import sys

    from fastres import backend as B
    assert B.NATIVE_CPU_ISA == B.cpu_kernel_isa(torch.backends.cpu.get_cpu_capability(), platform.machine())
    assert [m for m in sys.modules if m.startswith("fastres._cpu_")] == [f"fastres._cpu_{B.NATIVE_CPU_ISA}"]


def test_cpu_kernel_isa_follows_torchs_capability():
    from fastres.backend import cpu_kernel_isa
    assert cpu_kernel_isa("AVX512", "x86_64") == "avx512"
    assert cpu_kernel_isa("AVX2", "x86_64") == "avx2"
    assert cpu_kernel_isa("DEFAULT", "x86_64") is None  # the x86-64 builds need AVX2
    assert cpu_kernel_isa("SVE256", "aarch64") == cpu_kernel_isa("DEFAULT", "aarch64") == "default"


def test_avx2_build_passes_this_file():
    """This file's checks on the AVX2 build as well, where this CPU runs the AVX-512 one: env
    ATEN_CPU_CAPABILITY=avx2 lowers torch's capability, so the AVX2 build loads."""
    import os
    import subprocess
    import sys

    from fastres import backend as B
    if B.NATIVE_CPU_ISA != "avx512":
        pytest.skip(f"this process runs the {B.NATIVE_CPU_ISA} build; no other build runs on this CPU to check")
    env = dict(os.environ, ATEN_CPU_CAPABILITY="avx2")
    run = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-x", "-p", "no:cacheprovider",
                          "-k", "not avx2_build"], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and " failed" not in run.stdout
