"""The triton backend of cat_conv2d_stats on CPU under TRITON_INTERPRET=1, both of its ways: each
part's BN-act written into its slot of one buffer then one conv (a wide output), and a sum of
per-part convs (each part's BN-act in its conv's input load, the running sum in the next conv's
epilogue; a narrow output). Each equals the reference's conv of the concatenation, forward
(against float64) and backward, fp32 and bf16. Run by tests/ops/test_triton.py in a subprocess
(see conftest.py)."""
import os

import pytest

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 for the whole process (run via tests/ops/test_triton.py)",
                allow_module_level=True)

import torch  # noqa: E402
from torch.library import opcheck  # noqa: E402

from fastres import backend as B  # noqa: E402
from tests.utils import assert_as_accurate, assert_close  # noqa: E402

CL = torch.channels_last
IDS = {torch.float32: "fp32", torch.bfloat16: "bf16"}


def args_of(dtype, sizes=(13, 13, 13, 13), prologue=(True, True, True, False), k=50):
    """Res2Net-like: four parts, the last without BN (a first block's pooled split)."""
    parts = [torch.randn(2, c, 6, 5).to(memory_format=CL).to(dtype) for c in sizes]
    c = sum(sizes)
    stats = [torch.var_mean(p.float(), (0, 2, 3), correction=0) for p in parts]
    pm = torch.cat([m for _, m in stats])
    pi = torch.cat([torch.rsqrt(v + 1e-5) for v, _ in stats])
    w = (torch.randn(k, c, 1, 1) * c ** -0.5).to(memory_format=CL).to(dtype)
    return [parts, torch.rand(c) + 0.5, torch.randn(c), pm, pi, "relu", list(prologue), [True] * len(sizes), w,
            torch.randn(k).to(dtype), [1, 1], [0, 0], [1, 1], 1]


def _f64(args):
    return [[p.double() for p in a] if isinstance(a, list) and a and isinstance(a[0], torch.Tensor)
            else a.double() if isinstance(a, torch.Tensor) else a for a in args]


# output channels: 52 input channels in 4 parts go to one concatenation for 50 outputs, to a sum of
# per-part convs for 12 (fastres.ops.cat_conv._concat_pays)
WAYS = {"concat": 50, "sum": 12}


@pytest.mark.parametrize("way", WAYS)
def test_the_way_is_the_one_that_moves_fewer_bytes(way):
    from fastres.ops.cat_conv import _concat_pays
    args = args_of(torch.float32, k=WAYS[way])
    assert _concat_pays(args[0], args[8], 6 * 5) == (way == "concat")


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=IDS.get)
@pytest.mark.parametrize("prologue", [(True, True, True, False), (True, True, True, True)], ids=["pooled", "all"])
def test_forward(prologue, dtype, way):
    args = args_of(dtype, prologue=prologue, k=WAYS[way])
    with B.recording() as rec:
        got = torch.ops.fastres.cat_conv2d_stats(*args, "triton")
    assert rec and {r[2] for r in rec} == {"triton"}, rec
    oracle = torch.ops.fastres.cat_conv2d_stats(*_f64(args), "reference")
    eager = torch.ops.fastres.cat_conv2d_stats(*args, "reference")
    for name, a, o, e in zip(("out", "mean", "var"), got, oracle, eager):
        if dtype == torch.float32:
            assert_close(a, o, dtype=dtype, reduced=2 * 30, name=name)
        else:
            assert_as_accurate(a, e, o, dtype=dtype, name=name)


@pytest.mark.parametrize("way", WAYS)
def test_backward_matches_reference(way):
    args = args_of(torch.float32, k=WAYS[way])
    leaves = [*args[0], args[1], args[2], args[8], args[9]]
    for t in leaves:
        t.requires_grad_()
    got, want = (torch.ops.fastres.cat_conv2d_stats(*args, b)[0] for b in ("triton", "reference"))
    g = torch.randn_like(want)
    for a, e in zip(torch.autograd.grad(got, leaves, g), torch.autograd.grad(want, leaves, g)):
        assert_close(a, e, reduced=2 * 30 * 52)


@pytest.mark.parametrize("way", WAYS)
def test_opcheck(way):
    opcheck(torch.ops.fastres.cat_conv2d_stats.default, (*args_of(torch.float32, k=WAYS[way]), "triton"))


@pytest.mark.parametrize("cl", [True, False], ids=["cl", "nchw"])
def test_cat_bn_act_slots_equal_the_reference(cl):
    """The backward's recomputed concatenation on Triton (each part's BN-act written into its slot)
    has the reference's values and torch.cat's layout."""
    parts, pw, pb, pm, pi, act, prologue = args_of(torch.float32)[:7]
    if not cl:
        parts = [p.contiguous() for p in parts]
    with B.recording() as rec:
        got = torch.ops.fastres.cat_bn_act(parts, pw, pb, pm, pi, act, prologue, "triton")
    assert [r[2] for r in rec] == ["triton"], rec
    want = torch.ops.fastres.cat_bn_act(parts, pw, pb, pm, pi, act, prologue, "reference")
    assert_close(got, want)
    assert got.stride() == want.stride()
    opcheck(torch.ops.fastres.cat_bn_act.default, (parts, pw, pb, pm, pi, act, prologue, "triton"))
