"""Every torch.ops.fastres op: opcheck, float64 gradcheck against finite differences, and the
reference against plain PyTorch compositions, for each fusion flag."""
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import fastres
from fastres.ops import ACTS
from tests.utils import assert_close

ops = torch.ops.fastres
CL = torch.channels_last


def _act(z, act):
    return {"identity": lambda t: t, "relu": F.relu, "relu6": F.relu6, "silu": F.silu}[act](z)


def _fmt(t, cl):
    return t.to(memory_format=CL) if cl else t


def _stats(x):
    mean, var = ops.batch_stats(x, "reference")
    return mean.detach(), torch.rsqrt(var.detach() + 1e-5)


def _bn_ref(x, w, b, mean, invstd, r, act):
    z = x
    if mean is not None:
        z = (z - mean.view(1, -1, 1, 1)) * invstd.view(1, -1, 1, 1)
    z = z * (w.view(1, -1, 1, 1) if w is not None else 1) + (b.view(1, -1, 1, 1) if b is not None else 0)
    return _act(z + (r if r is not None else 0), act)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("mode", ["affine", "eval", "train"])
@pytest.mark.parametrize("flags", list(itertools.product([False, True], repeat=3)), ids=lambda f: "wbr" if f else "")
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
def test_bn_act(act, mode, flags, cl):
    """mode affine: no statistics; eval: given statistics; train: the batch statistics of x, whose
    gradient the op's backward must include (checked against finite differences of the composite)."""
    has_w, has_b, has_res = flags
    f64 = dict(dtype=torch.float64, requires_grad=True)
    x = _fmt(torch.randn(2, 5, 4, 3, **f64), cl)
    w = torch.rand(5, **f64) + 0.5 if has_w else None
    b = torch.randn(5, **f64) if has_b else None
    r = torch.randn(2, 5, 4, 3, **f64) if has_res else None
    running = (torch.randn(5, dtype=torch.float64), torch.rand(5, dtype=torch.float64) + 0.5)

    def f(x, w, b, r):
        mean, invstd = {"affine": (None, None), "eval": running, "train": _stats(x)}[mode]
        return ops.bn_act(x, w, b, mean, invstd, r, act, mode == "train", "reference")

    out = f(x, w, b, r)
    var, mean = torch.var_mean(x, (0, 2, 3), correction=0)
    stats = {"affine": (None, None), "eval": running, "train": (mean, torch.rsqrt(var + 1e-5))}[mode]
    assert_close(out, _bn_ref(x, w, b, *stats, r, act), name="forward")
    assert out.is_contiguous(memory_format=CL) == cl
    assert torch.autograd.gradcheck(f, (x, w, b, r))
    opcheck(ops.bn_act.default, (x, w, b, *_stats(x), r, act, mode == "train", "reference"))


@pytest.mark.parametrize("training", [False, True])
def test_bn_act_backward_opcheck(training):
    x, g = torch.randn(2, 5, 4, 3, dtype=torch.float64), torch.randn(2, 5, 4, 3, dtype=torch.float64)
    w, b, r = torch.rand(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64), torch.randn_like(x)
    mean, invstd = _stats(x)
    out = ops.bn_act(x, w, b, mean, invstd, r, "relu", training, "reference")
    for mask in ([True, True, True, True], [True, False, False, True], [False, False, True, False]):
        opcheck(ops.bn_act_backward.default, (g, x, w, b, mean, invstd, r, out, "relu", training, mask, "reference"))


def test_bn_act_train_needs_stats():
    with pytest.raises(ValueError, match="training=True needs the batch mean and invstd"):
        ops.bn_act(torch.randn(2, 3, 2, 2), None, None, None, None, None, "relu", True, "reference")


@pytest.mark.parametrize("shape", [(3, 4, 5, 5), (1, 7, 1, 1), (8, 3, 2, 2)])
def test_batch_stats(shape):
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    mean, var = ops.batch_stats(x, "reference")
    assert_close(mean, x.mean((0, 2, 3)))
    assert_close(var, x.var((0, 2, 3), unbiased=False))
    assert torch.autograd.gradcheck(lambda t: ops.batch_stats(t, "reference"), (x,))
    opcheck(ops.batch_stats.default, (x, "reference"))


def test_batch_stats_half_is_fp32_and_stable():
    x = 1000 + torch.randn(4, 3, 8, 8)
    mean, var = ops.batch_stats(x.bfloat16(), "reference")
    assert mean.dtype == var.dtype == torch.float32
    m64, v64 = ops.batch_stats(x.double(), "reference")
    mean, var = ops.batch_stats(x, "reference")
    assert_close(var, v64.float(), dtype=torch.float32)


CONV_CASES = [  # (C, K, H, W, kernel, stride, padding, dilation, groups)
    (6, 4, 7, 7, 3, 1, 1, 1, 1),
    (6, 4, 8, 6, 3, 2, 1, 1, 2),
    (4, 6, 9, 9, 3, 1, 2, 2, 1),
    (5, 3, 1, 1, 1, 1, 0, 1, 1),
    (8, 8, 5, 5, 3, 1, 1, 1, 8),  # depthwise
]


def _conv_ref(x, w, bias, stride, padding, dilation, groups, pw, pb, pmean, pinvstd, pre_act, pre_training,
              addend, residual, act):
    a = _bn_ref(x, pw, pb, pmean, pinvstd, None, pre_act)
    y = F.conv2d(a if addend is None else a + addend, w, bias, stride, padding, dilation, groups)
    return _act(y if residual is None else y + residual, act)


@pytest.mark.parametrize("case", CONV_CASES, ids=str)
@pytest.mark.parametrize("fusion", ["plain", "prologue", "prologue_train", "addend", "addend_train", "epilogue",
                                    "all"])
def test_conv2d(case, fusion):
    C, K, H, W, k, s, p, d, g = case
    f64 = dict(dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, C, H, W, **f64)
    w = torch.randn(K, C // g, k, k, **f64)
    bias = torch.randn(K, **f64) if fusion in ("epilogue", "all") else None
    pro = fusion in ("prologue", "prologue_train", "addend_train", "all")
    train = fusion in ("prologue_train", "addend_train")
    pw = torch.rand(C, **f64) + 0.5 if pro else None
    # a shift > 0 makes BN(0) != 0: the padded pixels must still be zeros after the prologue
    pb = torch.rand(C, **f64) + 0.1 if pro else None
    running = (torch.randn(C, dtype=torch.float64), torch.rand(C, dtype=torch.float64) + 0.5) if pro else (None, None)
    pre_act = "relu" if pro else "identity"
    addend = torch.randn(2, C, H, W, **f64) if fusion in ("addend", "addend_train", "all") else None
    Ho = (H + 2 * p - d * (k - 1) - 1) // s + 1
    Wo = (W + 2 * p - d * (k - 1) - 1) // s + 1
    residual = torch.randn(2, K, Ho, Wo, **f64) if fusion in ("epilogue", "all") else None
    act = "relu" if fusion != "plain" else "identity"

    def f(x, w, bias, pw, pb, addend, residual):
        pmean, pinvstd = _stats(x) if train else running
        return ops.conv2d(x, w, bias, [s, s], [p, p], [d, d], g, pw, pb, pmean, pinvstd, pre_act, train,
                          addend, residual, act, "reference")

    tensors = (x, w, bias, pw, pb, addend, residual)
    stats = _stats(x) if train else running
    args = (x, w, bias, [s, s], [p, p], [d, d], g, pw, pb, *stats, pre_act, train, addend, residual, act)
    assert_close(f(*tensors), _conv_ref(*args), name="forward")
    assert torch.autograd.gradcheck(f, tensors, fast_mode=True)  # random projections: full Jacobians take ~30 s here
    opcheck(ops.conv2d.default, args + ("reference",))


@pytest.mark.parametrize("backend", ["reference", "native"])
@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_conv2d_stats(case, backend):
    """conv2d's output and gradients, plus the output's batch statistics (no gradient of their own)."""
    if backend == "native" and fastres.backend.NATIVE_MISSING:
        pytest.skip(fastres.backend.NATIVE_MISSING)
    C, K, H, W, k, s, p, d, g = case
    x = torch.randn(2, C, H, W).to(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(K, C // g, k, k).requires_grad_()
    args = (x, w, torch.randn(K), [s, s], [p, p], [d, d], g, torch.rand(C) + 0.5, torch.randn(C), None, None,
            "relu", False, None, None, "relu")
    y, mean, var = ops.conv2d_stats(*args, backend)
    want = ops.conv2d(*args, backend)
    assert_close(y, want, name="output")
    v, m = torch.var_mean(want.detach().double(), (0, 2, 3), correction=0)
    assert_close(mean, m, dtype=torch.float32, reduced=want[:, 0].numel(), name="mean")
    assert_close(var, v, dtype=torch.float32, reduced=want[:, 0].numel(), name="var")
    assert y.requires_grad and not mean.requires_grad and not var.requires_grad
    gy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, w), gy)
    for got, exp in zip(grads, torch.autograd.grad(want, (x, w), gy)):
        assert_close(got, exp, reduced=2 * H * W, name="grad")
    opcheck(ops.conv2d_stats.default, tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args) + (backend,))


@pytest.mark.parametrize("backend", ["reference", "native"])
@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_conv2d_means(case, backend):
    """conv2d's output, plus each sample's channel means of it; the means are differentiable,
    in float64 (gradcheck) through both outputs."""
    if backend == "native" and fastres.backend.NATIVE_MISSING:
        pytest.skip(fastres.backend.NATIVE_MISSING)
    C, K, H, W, k, s, p, d, g = case
    x = torch.randn(2, C, H, W).to(memory_format=torch.channels_last)
    args = (x, torch.randn(K, C // g, k, k), torch.randn(K), [s, s], [p, p], [d, d], g, torch.rand(C) + 0.5,
            torch.randn(C), None, None, "relu", False, None, None, "relu")
    y, means = ops.conv2d_means(*args, backend)
    want = ops.conv2d(*args, backend)
    assert_close(y, want, name="output")
    assert means.shape == (2, K) and means.dtype == torch.float32
    assert_close(means, want.double().mean((2, 3)), dtype=torch.float32, reduced=want[0, 0].numel(), name="means")
    assert y.is_contiguous(memory_format=torch.channels_last) == want.is_contiguous(memory_format=torch.channels_last)
    opcheck(ops.conv2d_means.default, args + (backend,))
    if backend == "reference":
        f64 = [a.double().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args]
        leaves = [f64[i] for i in (0, 1, 2, 7, 8)]

        def f(*ts):
            full = list(f64)
            for i, t in zip((0, 1, 2, 7, 8), ts):
                full[i] = t
            return ops.conv2d_means(*full, backend)
        assert torch.autograd.gradcheck(f, leaves, fast_mode=True)


@pytest.mark.parametrize("act", ["relu6", "silu"])
def test_conv2d_epilogue_acts_backward(act):
    f64 = dict(dtype=torch.float64, requires_grad=True)
    x, w, b = torch.randn(2, 3, 5, 5, **f64), torch.randn(4, 3, 3, 3, **f64), torch.randn(4, **f64)
    fn = lambda x, w, b: ops.conv2d(x, w, b, [1, 1], [1, 1], [1, 1], 1, None, None, None, None, "identity",
                                    False, None, None, act, "reference")
    assert torch.autograd.gradcheck(fn, (x, w, b))


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("has_res", [False, True])
def test_se_gate_act(act, has_res):
    f64 = dict(dtype=torch.float64, requires_grad=True)
    x, gate = torch.randn(2, 6, 3, 3, **f64), torch.randn(2, 6, **f64)
    r = torch.randn(2, 6, 3, 3, **f64) if has_res else None
    out = ops.se_gate_act(x, gate, r, act, "reference")
    expect = _act(x * torch.sigmoid(gate)[:, :, None, None] + (r if has_res else 0), act)
    assert_close(out, expect)
    assert torch.autograd.gradcheck(lambda x, g, r: ops.se_gate_act(x, g, r, act, "reference"), (x, gate, r))
    opcheck(ops.se_gate_act.default, (x, gate, r, act, "reference"))
    g = torch.randn_like(out)
    opcheck(ops.se_gate_act_backward.default, (g, x.detach(), gate.detach(), r.detach() if has_res else None,
                                               out.detach(), act, "reference"))


def test_bad_activation_and_gate_shape():
    x = torch.randn(1, 2, 3, 3)
    with pytest.raises(ValueError, match="unknown activation 'gelu'"):
        ops.bn_act(x, None, None, None, None, None, "gelu", False, "reference")
    with pytest.raises(ValueError, match=r"gate must be \(N, C\) = \(1, 2\)"):
        ops.se_gate_act(x, torch.randn(1, 3), None, "relu", "reference")


@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("act", ["relu", "silu"])
def test_bn_act_pool2d(kind, mode, act):
    """pool(act(BN(x))) against the composition, gradients (incl. the batch statistics' in train
    mode) against finite differences; the backward recomputes the activation and the argmax."""
    f64 = dict(dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 3, 7, 6, **f64)
    w, b = torch.rand(3, **f64) + 0.5, torch.randn(3, **f64)
    train = mode == "train"
    running = (torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5)

    def f(x, w, b):
        mean, invstd = _stats(x) if train else running
        return ops.bn_act_pool2d(x, w, b, mean, invstd, act, train, kind, [3, 3], [2, 2], [1, 1], "reference")

    pool = F.max_pool2d if kind == "max" else F.avg_pool2d
    stats = _stats(x) if train else running
    assert_close(f(x, w, b), pool(_bn_ref(x, w, b, *stats, None, act), 3, 2, 1), name="forward")
    assert torch.autograd.gradcheck(f, (x, w, b))
    opcheck(ops.bn_act_pool2d.default, (x, w, b, *stats, act, train, kind, [3, 3], [2, 2], [1, 1], "reference"))


@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("prologue", [False, True])
def test_bn_act_pool2d_native(kind, dtype, cl, prologue):
    """The native one-pass kernel against the reference composition (odd sizes, 37 channels)."""
    x = _fmt(torch.randn(2, 37, 15, 14, dtype=dtype), cl)
    bn = (torch.rand(37) + 0.5, torch.randn(37), torch.randn(37), torch.rand(37) + 0.5) if prologue else (None,) * 4
    act = "relu" if prologue else "identity"
    for k, s, p in ((3, 2, 1), (2, 2, 0), (3, 1, 1)):
        args = (x, *bn, act, False, kind, [k, k], [s, s], [p, p])
        out = ops.bn_act_pool2d(*args, "native")
        assert_close(out, ops.bn_act_pool2d(*args, "reference"), dtype=dtype, name=f"{kind} k{k} s{s} p{p}")
        assert out.is_contiguous(memory_format=CL if cl else torch.contiguous_format)
    if not prologue:
        opcheck(ops.bn_act_pool2d.default, (x, *bn, act, False, kind, [3, 3], [2, 2], [1, 1], "native"))


def test_bn_act_pool2d_rejects_unknown_kind():
    x = torch.randn(1, 2, 4, 4)
    with pytest.raises(ValueError, match="kind must be one of"):
        ops.bn_act_pool2d(x, None, None, None, None, "relu", False, "lp", [2, 2], [2, 2], [0, 0], "reference")


def test_autograd_kernel_records_a_node_only_when_asked():
    """The ops' Autograd kernel (fastres.ops.library): no node without an input requiring grad, a
    node named after the op with one, and each input's gradient as asked (w alone, or x and w)."""
    x, w = torch.randn(2, 3, 5, 5), torch.randn(4, 3, 3, 3)
    conv = lambda x, w: ops.conv2d(x, w, None, [1, 1], [1, 1], [1, 1], 1, None, None, None, None,  # noqa: E731
                                   "identity", False, None, None, "relu", "reference")
    assert conv(x, w).grad_fn is None
    y = conv(x, w.requires_grad_())
    assert y.grad_fn.name() == "fastres_conv2dBackward"
    (gw,) = torch.autograd.grad(y.sum(), [w])
    y = conv(x.requires_grad_(), w)
    gx, gw2 = torch.autograd.grad(y.sum(), [x, w])
    want = torch.autograd.grad(F.relu(F.conv2d(x, w, padding=1)).sum(), [x, w])
    assert_close(gx, want[0])
    assert_close(gw, want[1])
    assert_close(gw2, want[1])


def test_ops_with_a_tensor_list_keep_torchs_autograd_kernel():
    parts = [torch.randn(2, 3, 4, 4, requires_grad=True) for _ in range(2)]
    out = ops.cat_conv2d_stats(parts, None, None, None, None, "identity", [False, False], [False, False],
                               torch.randn(5, 6, 1, 1), None, [1, 1], [0, 0], [1, 1], 1, "reference")[0]
    grads = torch.autograd.grad(out.sum(), parts)
    assert [g.shape for g in grads] == [p.shape for p in parts]
