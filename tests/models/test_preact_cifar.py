"""Pre-activation ImageNet builders against timm's resnetv2, and the CIFAR builders."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fastres
from fastres.models import cifar
from fastres.models.preact import preact_resnet18, preact_resnet50
from fastres.nn.preact import PreActBasicBlock, PreActBottleneck
from fastres.nn.wide import WideBasic
from tests.utils import randomize_bn
from tests.utils import assert_close

timm = pytest.importorskip("timm")


def timm_model(name: str) -> nn.Module:
    m = randomize_bn(timm.create_model(name, pretrained=False, num_classes=10))
    return m.eval()


@pytest.mark.parametrize("builder, name, block", [(preact_resnet18, "resnetv2_18", PreActBasicBlock),
                                                  (preact_resnet50, "resnetv2_50", PreActBottleneck)])
def test_builder_loads_timm_weights(builder, name, block):
    src = timm_model(name)
    model = builder(num_classes=10)
    assert model.state_dict().keys() == src.state_dict().keys()
    model.load_state_dict(src.state_dict(), strict=True)
    blocks = [m for m in model.modules() if isinstance(m, block)]
    assert len(blocks) == (8 if block is PreActBasicBlock else 16)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert_close(model.eval()(x), src.double()(x.double()), dtype=torch.float32, name="logits")


def test_convert_timm_resnetv2_50():
    src = timm_model("resnetv2_50")
    model = fastres.convert(src)
    report = fastres.conversion_report(model)
    assert not report.skipped, report
    assert sum(isinstance(m, PreActBottleneck) for m in model.modules()) == 16
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert_close(model(x), src.double()(x.double()), dtype=torch.float32, name="logits")


def test_builder_refuses_unfused_options():
    with pytest.raises(ValueError, match=r"fastres.convert: \d+ module\(s\) cannot be fused: .*drop_path"):
        preact_resnet18(drop_path_rate=0.1)


# ---- CIFAR -------------------------------------------------------------------------------------
BUILDERS = [  # (builder, kwargs, parameter count of the paper's model in millions, blocks)
    ("resnet20", {}, 0.27, 9),
    ("resnet56", {"shortcut": "B"}, 0.86, 27),
    ("resnet110", {}, 1.7, 54),
    ("preact_resnet110", {"variant": "a"}, 1.7, 54),
    ("preact_resnet164", {}, 1.7, 54),
    ("preact_resnet1001", {}, 10.2, 333),
    ("wrn_16_8", {"dropout": 0.3}, 11.0, 6),
    ("wrn_28_10", {}, 36.5, 12),
    ("wrn_40_4", {}, 8.9, 18),
]


@pytest.mark.parametrize("name, kw, mparams, blocks", BUILDERS, ids=[b[0] for b in BUILDERS])
def test_cifar_builder_trains_one_step(name, kw, mparams, blocks):
    model = getattr(cifar, name)(**kw)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n / 1e6 - mparams) / mparams < 0.03, n
    assert sum(len(s) for s in model.stages) == blocks
    # small inputs keep deep models cheap; the last stage still has 2x2 pixels per image
    x, target = torch.randn(2, 3, 8, 8), torch.tensor([1, 7])
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    loss = nn.functional.cross_entropy(model(x), target)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    opt.step()
    assert all(not torch.equal(before[k], p) for k, p in model.named_parameters() if k.startswith("fc."))
    assert model.eval()(x).shape == (2, 10)


@pytest.mark.parametrize("variant", ["a", "b", "c", "d", "e"])
def test_cifar_preact_variants(variant):
    model = cifar.cifar_preact_resnet(11, bottleneck=True, variant=variant)
    assert {b.variant for b in model.modules() if isinstance(b, PreActBottleneck)} == {variant}
    y = model.train()(torch.randn(2, 3, 8, 8))
    assert y.shape == (2, 10) and torch.isfinite(y).all()


def test_cifar_resnet_option_a_shortcut():
    model = cifar.resnet20()
    ds = model.stages[1][0].downsample
    assert isinstance(ds, cifar.ZeroPadShortcut) and not list(ds.parameters())
    x = torch.randn(2, 16, 8, 8)
    y = ds(x)
    assert y.shape == (2, 32, 4, 4)
    assert torch.equal(y[:, :16], x[:, :, ::2, ::2]) and not y[:, 16:].any()


def test_cifar_keys_and_widths():
    model = cifar.wrn_16_8()
    assert [s[0].conv1.out_channels for s in model.stages] == [128, 256, 512]
    assert isinstance(model.stages[0][0], WideBasic) and model.stages[0][0].shortcut is not None
    assert {k.split(".")[0] for k in model.state_dict()} == {"conv1", "stages", "norm", "fc"}


def test_cifar_bad_config_and_input():
    with pytest.raises(ValueError, match="depth 21 is not 6n\\+2"):
        cifar.cifar_resnet(21)
    with pytest.raises(ValueError, match="depth 30 is not 6n\\+4"):
        cifar.wide_resnet_cifar(30, 2)
    with pytest.raises(ValueError, match="variant must be one of"):
        cifar.preact_resnet110(variant="z")
    with pytest.raises(ValueError, match="CifarResNet: expected 3 input channels"):
        cifar.resnet20()(torch.randn(2, 1, 32, 32))
