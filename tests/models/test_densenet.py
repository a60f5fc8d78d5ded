"""DenseNet builders and `fastres.convert` of torchvision DenseNets: torchvision's state_dict loads
strict, outputs (and, on a small DenseNet, one train step) match a float64 torchvision reference,
and the conversion report lists every block."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from torchvision.models import densenet as tv

import fastres
from fastres.models import densenet as builders
from fastres.nn.densenet import DenseBlock, DenseLayer, Transition
from tests.utils import assert_close
from tests.utils import randomize_bn

NAMES = ["densenet121", "densenet161", "densenet169", "densenet201"]


def _assert_every_block_converted(model: nn.Module, dense_blocks: int = 4) -> None:
    report = fastres.conversion_report(model)
    assert not report.skipped, str(report)
    replaced = {path for path, _, _ in report.replaced}
    blocks = {f"features.{n}": m for n, m in model.features.named_children()
              if n.startswith(("denseblock", "transition"))}
    assert len(blocks) == 2 * dense_blocks - 1
    assert all(type(m) is (DenseBlock if "denseblock" in n else Transition) for n, m in blocks.items())
    assert set(blocks) <= replaced, str(report)
    assert "features.norm0" in replaced, str(report)
    assert type(model) is builders.DenseNet and "" in replaced, str(report)
    assert not [n for n, m in model.named_modules() if type(m) in (tv._DenseLayer, tv._DenseBlock, tv._Transition)]


@pytest.mark.parametrize("name", NAMES)
def test_builder_keys_and_shapes_match_torchvision(name):
    with torch.device("meta"):
        ours, ref = getattr(builders, name)(num_classes=10), getattr(tv, name)(num_classes=10)
    a, b = ours.state_dict(), ref.state_dict()
    assert list(a) == list(b)
    assert all(a[k].shape == b[k].shape for k in a)
    _assert_every_block_converted(ours)
    assert ours.classifier.out_features == 10


def test_densenet121_loads_torchvision_weights_and_matches():
    ref = randomize_bn(tv.densenet121()).eval()
    model = builders.densenet121()
    model.load_state_dict(ref.state_dict(), strict=True)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_close(model(x), ref.double()(x.double()), dtype=torch.float32, name="logits")


def test_convert_densenet121_matches_and_reports_every_block():
    ref = randomize_bn(tv.densenet121()).eval()
    model = fastres.convert(ref)
    _assert_every_block_converted(model)
    assert len([m for m in model.modules() if isinstance(m, DenseLayer)]) == 6 + 12 + 24 + 16
    x = torch.randn(2, 3, 32, 32).to(memory_format=torch.channels_last)
    with torch.no_grad():
        assert_close(model(x), ref.double()(x.double()), dtype=torch.float32, name="logits")


@pytest.mark.parametrize("memory_efficient", [False, True], ids=["plain", "memory_efficient"])
def test_small_densenet_train_step_matches_torchvision(memory_efficient):
    src = randomize_bn(tv.DenseNet(growth_rate=4, block_config=(2, 3), num_init_features=8, bn_size=2,
                                    num_classes=5, memory_efficient=memory_efficient))
    model, ref = fastres.convert(src).train(), copy.deepcopy(src).double().train()
    _assert_every_block_converted(model, dense_blocks=2)
    x = torch.randn(2, 3, 32, 32)
    xr = x.double().requires_grad_()
    x.requires_grad_()
    y, y_ref = model(x), ref(xr)
    assert_close(y, y_ref, dtype=torch.float32, name="logits")
    proj = torch.randn(y.shape, dtype=torch.float64)
    (y.double() * proj).sum().backward()
    (y_ref * proj).sum().backward()
    assert_close(x.grad, xr.grad, dtype=torch.float32, name="input grad")
    params = dict(model.named_parameters())
    for name, p in ref.named_parameters():
        assert_close(params[name].grad, p.grad, dtype=torch.float32, reduced=2 * 16 * 16, name=f"grad {name}")
    buffers = dict(model.named_buffers())
    for name, b in ref.named_buffers():
        if b.is_floating_point():
            assert_close(buffers[name], b, dtype=torch.float32, name=name)
        else:
            assert torch.equal(buffers[name], b), name


@pytest.mark.parametrize("hooked", ["features.conv0", "features.pool0", "features"])
def test_fused_stem_keeps_hooks(hooked):
    """A hook on the stem (or on features) sees the modules run as they are, and the output."""
    ref = randomize_bn(tv.DenseNet(growth_rate=4, block_config=(2,), num_init_features=8, bn_size=2,
                                   num_classes=5)).eval()
    model = fastres.convert(ref)
    seen = {}
    for name, m in (("ref", ref), ("model", model)):
        m.get_submodule(hooked).register_forward_hook(lambda mod, inp, out, n=name: seen.setdefault(n, out.clone()))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_close(model(x), ref(x), dtype=torch.float32, name="logits")
    assert_close(seen["model"], seen["ref"], dtype=torch.float32, name=f"output of {hooked}")


def test_wrong_input_names_the_expected_channels():
    model = fastres.convert(tv.DenseNet(growth_rate=4, block_config=(2,), num_init_features=8, bn_size=2,
                                        num_classes=5)).eval()
    with pytest.raises(ValueError, match=r"expected 3 input channels"):
        with torch.no_grad():
            model(torch.randn(2, 4, 32, 32))
