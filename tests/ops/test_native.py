"""The compiled kernels (torch.ops.fastres_native.*, csrc/) on CPU against the reference.

affine_act(x, scale, shift, residual, act) is the reference bn_act with weight=scale, bias=shift
and no statistics; its backward is the reference bn_act_backward in eval mode. Half-precision
kernels are compared with the reference run on the same half inputs (both compute in fp32).
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
FLAGS = list(itertools.product([False, True], repeat=3))
MASKS = [list(m) for m in itertools.product([False, True], repeat=4)]
ODD_SHAPES = [(2, 37, 15, 15), (3, 16, 1, 1), (1, 8, 7, 7), (2, 1, 5, 3), (0, 5, 4, 4)]


def _ids(flags):
    return "".join(c for c, f in zip("sbr", flags) if f) or "none"


def _fmt(t, cl):
    return t.to(memory_format=CL) if cl else t.contiguous()


def _inputs(shape, dtype, cl, flags, res_cl=None):
    """x (scaled so relu6 clips), per-channel scale/shift in the accumulation dtype, residual."""
    has_scale, has_shift, has_res = flags
    pdt = torch.float32 if dtype in HALF else dtype
    C = shape[1]
    x = _fmt(3 * torch.randn(shape, dtype=dtype), cl)
    s = torch.rand(C, dtype=pdt) + 0.5 if has_scale else None
    b = torch.randn(C, dtype=pdt) if has_shift else None
    r = _fmt(torch.randn(shape, dtype=dtype), cl if res_cl is None else res_cl) if has_res else None
    return x, s, b, r


def _ref_forward(x, s, b, r, act):
    return ref.bn_act(x, s, b, None, None, r, act)


def _ref_backward(g, x, s, b, r, out, act, mask):
    return ref.bn_act_backward(g, x, s, b, None, None, r, out, act, False, mask)


def _check_forward(x, s, b, r, act):
    y = native.affine_act(x, s, b, r, act)
    assert y.dtype == x.dtype
    assert y.stride() == torch.empty_like(x).stride(), "output must keep the input's memory format"
    assert_close(y, _ref_forward(x, s, b, r, act), name=f"forward {act}")


def _check_backward(x, s, b, r, act, masks=MASKS):
    out = _ref_forward(x, s, b, r, act)
    g = _fmt(torch.randn(x.shape, dtype=x.dtype), x.is_contiguous(memory_format=CL))
    saved = out if act in ("relu", "relu6") else None
    reduced = max(1, x.numel() // max(x.shape[1], 1))
    for mask in masks:
        got = native.affine_act_backward(g, x, s, b, r, saved, act, mask)
        want = _ref_backward(g, x, s, b, r, saved, act, mask)
        for name, a, e, n in zip(("x", "residual", "scale", "shift"), got, want, (1, 1, reduced, reduced)):
            assert a.dtype == e.dtype, f"grad {name}: dtype {a.dtype} != {e.dtype}"
            assert_close(a, e, reduced=n, name=f"grad {name} {act} mask={mask}")


# ---- affine_act ----------------------------------------------------------------------------------
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("flags", FLAGS, ids=_ids)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
def test_affine_act(act, flags, dtype, cl):
    _check_forward(*_inputs((2, 37, 15, 15), dtype, cl, flags), act)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("flags", FLAGS, ids=_ids)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
def test_affine_act_backward(act, flags, dtype, cl):
    """Every output_mask: grads asked for match, the others are empty like the reference's."""
    _check_backward(*_inputs((2, 37, 6, 5), dtype, cl, flags), act)


@pytest.mark.parametrize("shape", ODD_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("act", ["relu6", "silu"])
def test_odd_shapes(shape, dtype, cl, act):
    args = _inputs(shape, dtype, cl, (True, True, True))
    _check_forward(*args, act)
    _check_backward(*args, act, masks=[[True] * 4])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cl", [False, True], ids=["x_nchw", "x_cl"])
@pytest.mark.parametrize("act", ACTS)
def test_residual_in_other_format(dtype, cl, act):
    args = _inputs((2, 37, 15, 15), dtype, cl, (True, True, True), res_cl=not cl)
    _check_forward(*args, act)
    _check_backward(*args, act, masks=[[True] * 4])


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
    x, s, b, r = _inputs((2, 16, 9, 9), torch.float32, cl, (True, True, True))
    out = native.affine_act(x, s, b, r, "relu")
    g = torch.randn_like(x)
    assert out.is_contiguous(memory_format=CL if cl else torch.contiguous_format)
    assert _copies(lambda: native.affine_act(x, s, b, r, "relu"), x.shape) == []
    assert _copies(lambda: native.affine_act_backward(g, x, s, b, r, out, "relu", [True] * 4), x.shape) == []
    assert _copies(lambda: native.batch_stats(x), x.shape) == []
    r_other = _fmt(r, not cl)
    assert _copies(lambda: native.affine_act(x, s, b, r_other, "relu"), x.shape) != []


def test_strided_input_falls_back_to_a_copy():
    x = torch.randn(2, 8, 10, 12)[:, :, ::2, 1:]
    s = torch.rand(8) + 0.5
    _check_forward(x, s, None, None, "relu")


def test_errors():
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(RuntimeError, match="unknown activation"):
        native.affine_act(x, None, None, None, "gelu")
    with pytest.raises(RuntimeError, match="saved output"):
        native.affine_act_backward(x, x, None, None, None, None, "relu", [True] * 4)
    with pytest.raises(RuntimeError, match="one value per channel"):
        native.affine_act(x, torch.ones(4), None, None, "relu")
    with pytest.raises(RuntimeError, match="4-D"):
        native.batch_stats(torch.randn(2, 3, 4))


# ---- batch_stats ---------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", ODD_SHAPES[:-1], ids=lambda s: "x".join(map(str, s)))
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


def test_results_do_not_depend_on_thread_count():
    x = _fmt(torch.randn(4, 24, 20, 20), True)
    s, b = torch.rand(24), torch.randn(24)
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native.batch_stats(x), native.affine_act_backward(x, x, s, b, None, None, "silu", [True] * 4)
        torch.set_num_threads(2)
        two = native.batch_stats(x), native.affine_act_backward(x, x, s, b, None, None, "silu", [True] * 4)
    finally:
        torch.set_num_threads(prev)
    for a, e in zip(itertools.chain(*one), itertools.chain(*two)):
        assert torch.equal(a, e)


# ---- registration --------------------------------------------------------------------------------
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
def test_opcheck_schema(cl):
    """The schemas' aliasing and mutation claims hold (fake/autograd registration is the Python
    layer's business, so those opcheck tests do not apply to the kernel-level ops)."""
    x, s, b, r = _inputs((2, 5, 3, 4), torch.float32, cl, (True, True, True))
    y = native.affine_act(x, s, b, r, "relu")
    utils = ("test_schema",)
    opcheck(native.affine_act.default, (x, s, b, r, "relu"), test_utils=utils)
    opcheck(native.affine_act.default, (x, None, None, None, "identity"), test_utils=utils)
    opcheck(native.affine_act_backward.default, (torch.randn_like(x), x, s, b, r, y, "relu", [True] * 4),
            test_utils=utils)
    opcheck(native.batch_stats.default, (x,), test_utils=utils)


@pytest.mark.parametrize("op", ["affine_act", "affine_act_backward", "batch_stats"])
def test_built_with_cuda_says_which_kernels_exist(op):
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    assert has(f"fastres_native::{op}", "CPU")
    assert has(f"fastres_native::{op}", "CUDA") == _C.built_with_cuda
