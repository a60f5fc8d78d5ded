"""fastres.convert on whole torchvision and timm models: same outputs (eval and train), same
state_dict, every block reported."""
import copy

import pytest
import timm
import torch
import torchvision

import fastres
from tests.utils import assert_as_accurate, assert_close, randomize_bn

MODELS = [
    ("torchvision", "resnet50", "Bottleneck", 16),
    ("torchvision", "resnext50_32x4d", "Bottleneck", 16),
    ("torchvision", "wide_resnet50_2", "Bottleneck", 16),
    ("torchvision", "densenet121", "_DenseBlock", 4),
    ("timm", "resnetv2_50", "PreActBottleneck", 16),
    ("timm", "res2net50_26w_4s", "Bottle2neck", 16),
    ("timm", "rexnet_100", "LinearBottleneck", 16),
    ("timm", "seresnext50_32x4d", "Bottleneck", 16),
]


def _build(lib, name):
    """The model with non-trivial BN state: zero-initialised last BNs (timm) would hide whatever
    follows them, e.g. an SE gate."""
    torch.manual_seed(0)
    return randomize_bn(getattr(torchvision.models, name)() if lib == "torchvision" else timm.create_model(name))


@pytest.mark.parametrize("lib, name, block, count", MODELS, ids=[m[1] for m in MODELS])
def test_convert_matches(lib, name, block, count):
    ref = _build(lib, name)
    model = fastres.convert(ref)
    assert model.state_dict().keys() == ref.state_dict().keys()
    report = fastres.conversion_report(model)
    replaced = [r for r in report.replaced if r[1].endswith("." + block)]
    assert len(replaced) == count, str(report)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert_close(model.eval()(x), ref.eval()(x), name=f"{name} eval")
        # train mode: BN over 2x2x2 values in the last stage amplifies float noise, so the
        # oracle is float64 and fastres must be as accurate as eager fp32
        ref64 = copy.deepcopy(ref).double()
        oracle = ref64.train()(x.double())
        assert_as_accurate(model.train()(x), ref.train()(x), oracle, dtype=torch.float32, name=f"{name} train")
    new_state, state64 = model.state_dict(), ref64.state_dict()
    for k, v in ref.state_dict().items():  # the train pass updated the statistics alike
        if v.is_floating_point():
            assert_as_accurate(new_state[k], v, state64[k], dtype=torch.float32, name=k)
        else:
            assert torch.equal(new_state[k], v), k
    text = str(fastres.explain(model.eval(), x))
    assert all(f"replaced {path}:" in text for path, _, _ in replaced)


def test_convert_leaves_the_original_alone_unless_inplace():
    ref = torchvision.models.resnet18()
    model = fastres.convert(ref)
    assert type(ref.layer1[0]) is torchvision.models.resnet.BasicBlock
    assert type(model.layer1[0]) is fastres.nn.BasicBlock
    assert model.layer1[0].conv1.weight is not ref.layer1[0].conv1.weight
    same = fastres.convert(ref, inplace=True)
    assert same is ref and type(ref.layer1[0]) is fastres.nn.BasicBlock


def test_convert_reports_what_it_left_alone():
    ref = timm.create_model("resnet18", act_layer=torch.nn.ELU)
    report = fastres.conversion_report(fastres.convert(ref))
    assert not any(r[1].endswith("BasicBlock") for r in report.replaced)
    assert any("activation is not ReLU" in why for _, _, why in report.skipped)


def test_frozen_batchnorm_model():
    from torchvision.ops import FrozenBatchNorm2d
    ref = torchvision.models.resnet18(norm_layer=FrozenBatchNorm2d).eval()
    model = fastres.convert(ref)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert_close(model(x), ref(x))


def test_zero_init_residual_builder():
    m = fastres.models.resnet50(zero_init_residual=True)
    assert all(not b.bn3.weight.any() for b in m.modules() if isinstance(b, fastres.nn.Bottleneck))


def test_strict_names_what_cannot_be_fused():
    ref = timm.create_model("resnet18", act_layer=torch.nn.ELU)
    with pytest.raises(ValueError, match=r"cannot be fused: <root>: stem .* not ReLU; layer1\.0: activation is not ReLU"):
        fastres.convert(ref, strict=True)


def test_convert_dtype_casts_the_model_and_its_inputs():
    model = torchvision.models.resnet18().eval()
    fast = fastres.convert(model, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in fast.parameters())
    assert next(model.parameters()).dtype == torch.float32  # the original is untouched
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        y = fast(x)
        oracle = copy.deepcopy(model).double()(x.double())
        eager = copy.deepcopy(model).bfloat16()(x.bfloat16())
    assert y.dtype == torch.bfloat16
    assert_as_accurate(y, eager, oracle, dtype=torch.bfloat16, name="logits")
    with pytest.raises(TypeError, match="floating-point torch.dtype"):
        fastres.convert(model, dtype=torch.int8)
