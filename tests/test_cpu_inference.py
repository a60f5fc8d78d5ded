"""The native CPU conv2d (oneDNN with fused epilogue) against the reference, and the cached
eval-inference path of conv-BN (folded, prepacked weights): equality with eager, cache
invalidation, untouched state, and training after inference."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torchvision
from torch.library import opcheck

import fastres
from fastres import backend as B
from fastres.nn import inference
from fastres.ops import ACTS
from fastres.ops import reference as ref
from tests.utils import assert_as_accurate, assert_close, assert_same_step

CL = torch.channels_last
needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")
pytestmark = needs_onednn

# (C_in, C_out, H, kernel, stride, padding, dilation, groups)
CASES = {
    "3x3": (16, 32, 9, 3, 1, 1, 1, 1),
    "1x1_s2": (16, 24, 15, 1, 2, 0, 1, 1),
    "grouped_dil2": (32, 32, 11, 3, 1, 2, 2, 8),   # ResNeXt-style groups, dilation
    "depthwise_s2": (24, 24, 7, 3, 2, 1, 1, 24),
    "odd_5x5": (5, 12, 7, 5, 1, 2, 1, 1),           # C not a multiple of 8
}


def _conv_args(case, dtype, cl, residual):
    cin, cout, h, k, s, p, d, g = CASES[case]
    x = torch.randn(2, cin, h, h + 2, dtype=dtype)
    x = x.to(memory_format=CL) if cl else x
    w = torch.randn(cout, cin // g, k, k, dtype=dtype) / (cin // g * k * k) ** 0.5
    bias = torch.randn(cout, dtype=dtype)
    ho = (h + 2 * p - d * (k - 1) - 1) // s + 1
    wo = (h + 2 + 2 * p - d * (k - 1) - 1) // s + 1
    r = torch.randn(2, cout, ho, wo, dtype=dtype) if residual else None
    return x, w, bias, [s, s], [p, p], [d, d], g, r


def _native(x, w, bias, stride, padding, dilation, groups, residual, act, **prologue):
    with B.recording() as rec:
        y = torch.ops.fastres.conv2d(x, w, bias, stride, padding, dilation, groups, prologue.get("pw"),
                                     prologue.get("pb"), prologue.get("pmean"), prologue.get("pinvstd"),
                                     prologue.get("pre_act", "identity"), False, prologue.get("addend"),
                                     residual, act, "native")
    assert [r[1:3] for r in rec] == [("conv2d", "native")], rec
    return y


# every epilogue on the plain 3x3; every geometry with the two epilogues ResNets use
EPILOGUES = [("3x3", act, res) for act in ACTS for res in (False, True)] + \
            [(case, act, res) for case in list(CASES)[1:] for act, res in (("relu", False), ("relu", True))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("case,act,residual", EPILOGUES,
                         ids=lambda v: v if isinstance(v, str) else ("res" if v else ""))
def test_native_conv2d_matches_reference(case, act, residual, cl, dtype):
    x, w, bias, s, p, d, g, r = _conv_args(case, dtype, cl, residual)
    y = _native(x, w, bias, s, p, d, g, r, act)
    expect = ref.conv2d(x.double(), w.double(), bias.double(), s, p, d, g, None, None, None, None, "identity",
                        False, None, None if r is None else r.double(), act)
    assert y.dtype == dtype
    assert y.is_contiguous(memory_format=CL if cl else torch.contiguous_format)
    assert_close(y, expect, dtype=dtype, name=f"{case} {act}")


@pytest.mark.parametrize("pre_act", ["relu", "identity"])
@pytest.mark.parametrize("addend", [False, True])
def test_native_conv2d_materialises_the_prologue(pre_act, addend):
    x, w, bias, s, p, d, g, r = _conv_args("3x3", torch.float32, True, True)
    c = x.shape[1]
    pro = dict(pw=torch.rand(c) + 0.5, pb=torch.randn(c), pmean=torch.randn(c), pinvstd=torch.rand(c) + 0.5,
               pre_act=pre_act, addend=torch.randn_like(x) if addend else None)
    y = _native(x, w, bias, s, p, d, g, r, "relu", **pro)
    dbl = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in pro.items()}
    expect = ref.conv2d(x.double(), w.double(), bias.double(), s, p, d, g, dbl["pw"], dbl["pb"], dbl["pmean"],
                        dbl["pinvstd"], pre_act, False, dbl["addend"], r.double(), "relu")
    assert_close(y, expect, dtype=torch.float32)


def test_native_conv2d_opcheck():
    x, w, bias, s, p, d, g, r = _conv_args("grouped_dil2", torch.float32, True, True)
    opcheck(torch.ops.fastres.conv2d.default,
            (x, w, bias, s, p, d, g, None, None, None, None, "identity", False, None, r, "relu", "native"))


def test_native_conv2d_falls_back_visibly_for_float64():
    x, w, bias, s, p, d, g, r = _conv_args("3x3", torch.float64, False, False)
    B._warned.clear()
    with warnings.catch_warnings(record=True) as caught, B.recording() as rec:
        warnings.simplefilter("always")
        y = fastres.functional.conv2d(x, w, bias, s, p, d, g, act="relu", backend="native")
    assert any("conv2d falls back from native to reference" in str(m.message) for m in caught)
    assert rec[0][1:3] == ("conv2d", "reference") and "float32 and bfloat16" in rec[0][3]
    assert_close(y, torch.relu(torch.nn.functional.conv2d(x, w, bias, s, p, d, g)))


# ---- cached eval inference through converted models --------------------------------------------
def _randomise_bn(model: nn.Module) -> nn.Module:
    """Non-trivial BN statistics and affine parameters, so folding matters."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
    return model


def _pair(build=torchvision.models.resnet18, backend="native", **kw):
    tv = _randomise_bn(build(num_classes=10, **kw)).eval()
    return tv, fastres.convert(tv, backend=backend)


def _x(n=2, size=48, cl=True):
    x = torch.randn(n, 3, size, size)
    return x.to(memory_format=CL) if cl else x


@pytest.mark.parametrize("ctx", ["inference_mode", "no_grad", "frozen_params"])
@pytest.mark.parametrize("backend", ["native", "auto", "reference"])
def test_eval_inference_matches_eager(backend, ctx):
    tv, f = _pair(backend=backend)
    if ctx == "frozen_params":  # grad mode on, but nothing requires grad
        for p in list(tv.parameters()) + list(f.parameters()):
            p.requires_grad_(False)
    x = _x()
    x0 = x.clone()
    run = {"inference_mode": torch.inference_mode, "no_grad": torch.no_grad,
           "frozen_params": torch.enable_grad}[ctx]
    with run():
        for _ in range(2):  # the second forward runs from the cache
            with B.recording() as rec:
                y = f(x)
            assert_close(y, tv(x), name="output")
    assert torch.equal(x, x0), "the model input was written to"
    convs = [r for r in rec if r[1] == "conv2d"]
    assert len(convs) == 20  # stem, 16 block convs, 3 projection shortcuts
    want = "reference" if backend == "reference" else "native"
    assert all(r[2] == want for r in convs), convs
    if backend != "reference":
        assert all("prepacked" in r[3] for r in convs)
    assert inference._CACHE.get(f.conv1) is not None


def test_cache_is_reused_and_keyed_by_input_size():
    tv, f = _pair()
    with torch.no_grad():
        f(_x())
        e = inference._CACHE[f.layer1[0].conv1]
        f(_x())
        assert inference._CACHE[f.layer1[0].conv1] is e and len(e.packed) == 1
        x = _x(n=3, size=40)
        assert_close(f(x), tv(x))
        assert inference._CACHE[f.layer1[0].conv1] is e and len(e.packed) == 2
        x = _x(n=3, size=40, cl=False)  # NCHW runs from the dense folded weight (keeps its layout)
        assert_close(f(x), tv(x))
        assert inference._CACHE[f.layer1[0].conv1] is e and len(e.packed) == 2


@pytest.mark.parametrize("change", ["running_mean_inplace", "optimizer_step", "load_state_dict"])
def test_cache_follows_parameter_and_buffer_changes(change):
    tv, f = _pair()
    x = _x()
    with torch.no_grad():
        before = f(x)
    if change == "running_mean_inplace":
        with torch.no_grad():
            f.layer2[0].bn1.running_mean.add_(0.5)
    elif change == "optimizer_step":
        opt = torch.optim.SGD(f.parameters(), lr=0.1)
        f.train()
        f(_x(4)).square().mean().backward()
        opt.step()
        f.eval()
    else:
        sd = {k: v + 0.1 if v.is_floating_point() else v for k, v in f.state_dict().items()}
        f.load_state_dict(sd)
    tv.load_state_dict(f.state_dict())
    with torch.no_grad():
        after = f(x)
        assert_close(after, tv(x))
    assert not torch.allclose(before, after)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=["bf16", "fp64"])
def test_cache_follows_dtype_change(dtype):
    tv, f = _pair()
    x = _x()
    with torch.no_grad():
        f(x)
        f.to(dtype)
        tv.to(dtype)
        y = f(x.to(dtype))
        assert y.dtype == dtype
        if dtype == torch.float64:
            assert_close(y, tv(x.double()))
        else:
            oracle = copy.deepcopy(tv).double()(x.to(dtype).double())
            assert_as_accurate(y, tv(x.to(dtype)), oracle, dtype=dtype, name="bf16 output")
    assert inference._CACHE[f.conv1].weight.dtype == dtype


def test_inference_leaves_state_dict_and_parameters_alone():
    tv, f = _pair()
    sd = {k: v.clone() for k, v in f.state_dict().items()}
    params = {n: p for n, p in f.named_parameters()}
    with torch.inference_mode():
        f(_x())
    after = f.state_dict()
    assert list(after) == list(sd)
    assert all(torch.equal(after[k], sd[k]) for k in sd)
    assert all(p is params[n] for n, p in f.named_parameters())
    copy.deepcopy(f)  # the cache is outside the module: copying/pickling is unaffected
    torch.save(f, __import__("io").BytesIO())


def test_train_after_eval_inference_matches_eager():
    tv, f = _pair()
    with torch.inference_mode():
        f(_x())
    x = _x(4)
    assert_same_step(tv, f, x, train=True)  # train mode: outputs, grads, running stats
    assert_same_step(tv, f, x, train=False)  # and eval again, with the new statistics


def test_eval_with_grad_uses_the_differentiable_path():
    tv, f = _pair()
    x = _x().requires_grad_(True)
    xr = x.detach().clone().requires_grad_(True)
    y = f(x)
    y.square().sum().backward()
    tv(xr).square().sum().backward()
    assert_close(x.grad, xr.grad, name="input grad")
    assert_close(f.layer1[0].conv1.weight.grad, tv.layer1[0].conv1.weight.grad, reduced=x.numel() // 64,
                 name="weight grad")


def test_grouped_resnext_and_explain():
    def build(num_classes):
        return torchvision.models.resnet.ResNet(torchvision.models.resnet.Bottleneck, [1, 1, 1, 1], groups=4,
                                                width_per_group=8, num_classes=num_classes)
    tv, f = _pair(build)
    x = _x(2, 40, cl=False)
    with torch.inference_mode():
        assert_close(f(x), tv(x))
    text = str(fastres.explain(f, x))
    rows = [line for line in text.splitlines() if " conv2d " in line]
    assert rows and all(" native " in line and "prepacked" in line for line in rows), text


@pytest.mark.parametrize("hooked", ["layer1.0", "layer2", "maxpool"])
def test_residual_stream_reuse_respects_hooks(hooked):
    """Identity blocks accumulate into their input in inference; a tensor a hook kept must not
    be overwritten by that."""
    tv, f = _pair()
    kept = {}
    for name, m in (("tv", tv), ("f", f)):
        m.get_submodule(hooked).register_forward_hook(lambda mod, inp, out, n=name: kept.setdefault(n, out))
    x = _x()
    with torch.inference_mode():
        y, ye = f(x), tv(x)
    assert_close(y, ye)
    assert_close(kept["f"], kept["tv"], name=f"output of {hooked} kept by a hook")


_STAGE_BLOCKS = {
    "basic": lambda: fastres.nn.BasicBlock(32, 32),
    "bottleneck_se": lambda: fastres.nn.Bottleneck(32, 8, groups=2, base_width=64),
    "preact_e": lambda: fastres.nn.PreActBottleneck(32, 32),
    "preact_b": lambda: fastres.nn.PreActBasicBlock(32, 32, variant="b"),
    "preact_c": lambda: fastres.nn.PreActBasicBlock(32, 32, variant="c"),
    "wide": lambda: fastres.nn.WideBasic(32, 32),
    "res2net": lambda: fastres.nn.Bottle2neck(32, 8, base_width=32),
}


@pytest.mark.parametrize("kind", list(_STAGE_BLOCKS))
def test_stage_adds_into_the_residual_stream_it_owns(kind):
    """A Stage of identity blocks: each block after the first accumulates into the previous
    output (no new tensor); the stage's own input is never written; results equal the plain
    Sequential run (which allocates every output)."""
    torch.manual_seed(0)
    stage = fastres.nn.Stage(*(_STAGE_BLOCKS[kind]() for _ in range(3)))
    if kind == "bottleneck_se":
        for b in stage:
            b.se = fastres.nn.SqueezeExcite(32, 8)
    _randomise_bn(stage).eval()
    x = _x(2, 12).repeat(1, 11, 1, 1)[:, :32].contiguous(memory_format=CL)
    x0 = x.clone()
    with torch.no_grad():
        want = nn.Sequential.forward(stage, x)
        y = stage(x)
        assert_close(y, want)
        assert torch.equal(x, x0), "the stage's input was overwritten"
        owned = x.clone()
        y2, private = inference.run_blocks(stage, owned, True)
    assert_close(y2, want)
    assert private
    shares = y2.untyped_storage().data_ptr() == owned.untyped_storage().data_ptr()
    # the output is a new tensor where the block ends in a pass after its last conv: the BN-ReLU
    # of the sum (b), the add after the BN-ReLU (c), the SE gate with the add
    assert shares == (kind not in ("preact_b", "preact_c", "bottleneck_se")), "the stream was not reused"
    with torch.enable_grad():  # autograd records the stream: nothing is overwritten
        xg = x.clone().requires_grad_()
        assert_close(stage(xg), want)
    assert torch.equal(xg.detach(), x0)


def test_convert_turns_sequentials_of_blocks_into_stages():
    m = nn.Sequential(nn.Sequential(torchvision.models.resnet.BasicBlock(8, 8), torchvision.models.resnet.BasicBlock(8, 8)),
                      nn.Sequential(torchvision.models.resnet.BasicBlock(8, 8), nn.ReLU()))
    f = fastres.convert(m)
    assert type(f[0]) is fastres.nn.Stage and type(f[1]) is nn.Sequential and type(f) is nn.Sequential
    assert list(f.state_dict()) == list(m.state_dict())
    report = fastres.conversion_report(f)
    assert ("0", "torch.nn.modules.container.Sequential", "fastres.nn.inference.Stage") in report.replaced


def test_densenet_prologue_path_matches_eager_and_follows_changes():
    """BN-ReLU-conv (DenseNet): prologue in one native pass, conv from the cached prepacked weight."""
    tv = _randomise_bn(torchvision.models.DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16,
                                                   bn_size=2, num_classes=10)).eval()
    f = fastres.convert(tv, backend="native")
    x = _x(2, 40)
    with torch.inference_mode():
        with B.recording() as rec:
            assert_close(f(x), tv(x))
        convs = [r for r in rec if r[1] == "conv2d"]
        assert convs and all(r[2] == "native" and "prepacked" in r[3] for r in convs), convs
        # each layer's conv1 has norm1-ReLU as its prologue (and norm2-ReLU folded in); the stem
        # conv (norm0 folded), each conv2 and the transition's conv (after its BN-ReLU-pool pass)
        # read their input as it is
        prologue = [r for r in convs if "prologue" in r[3]]
        assert len(prologue) == 4 and len(convs) - len(prologue) == 1 + 4 + 1, convs
        assert type(f).__name__ == "DenseNet" and type(f).__module__ == "fastres.models.densenet"
        layer = f.features.denseblock1.denselayer1
        assert inference._CACHE.get(layer.conv1) is not None
    with torch.no_grad():
        layer.conv1.weight.mul_(1.5)
        layer.norm1.running_var.mul_(2.0)
        tv.load_state_dict(f.state_dict())
        assert_close(f(x), tv(x))


@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("path", ["conv_bn", "bn_conv"])
def test_cached_path_keeps_the_memory_format(path, cl):
    from fastres.nn.norm_act import bn_conv, conv_bn
    conv, bn = nn.Conv2d(8, 16, 3, padding=1), _randomise_bn(nn.BatchNorm2d(8 if path == "bn_conv" else 16)).eval()
    x = torch.randn(2, 8, 9, 9)
    x = x.to(memory_format=CL) if cl else x
    with torch.no_grad():
        if path == "conv_bn":
            y, ref_y = conv_bn(x, conv, bn, act="relu", backend="native"), torch.relu(bn(conv(x)))
        else:
            y, ref_y = bn_conv(x, bn, conv, pre_act="relu", backend="native"), conv(torch.relu(bn(x)))
    assert conv in inference._CACHE
    assert y.is_contiguous(memory_format=CL if cl else torch.contiguous_format)
    assert_close(y, ref_y)
