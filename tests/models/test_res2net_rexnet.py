"""Res2Net and ReXNet: `fastres.convert` of timm's models and the fastres builders, against timm."""
import pytest
import timm
import torch

import fastres
from fastres.convert import qualname
from fastres.models import res2net as fr_res2net
from fastres.models import rexnet as fr_rexnet
from fastres.nn.res2net import Bottle2neck
from fastres.nn.rexnet import LinearBottleneck
from tests.utils import assert_close

CL = torch.channels_last
BLOCKS = {"res2net": ("timm.models.res2net.Bottle2neck", Bottle2neck),
          "rexnet": ("timm.models.rexnet.LinearBottleneck", LinearBottleneck)}
BUILDERS = {
    "res2net50_26w_4s": fr_res2net.res2net50_26w_4s, "res2net50_48w_2s": fr_res2net.res2net50_48w_2s,
    "res2net50_14w_8s": fr_res2net.res2net50_14w_8s, "res2net50_26w_6s": fr_res2net.res2net50_26w_6s,
    "res2net50_26w_8s": fr_res2net.res2net50_26w_8s, "res2net101_26w_4s": fr_res2net.res2net101_26w_4s,
    "res2next50": fr_res2net.res2next50,
    "rexnet_100": fr_rexnet.rexnet_100, "rexnet_130": fr_rexnet.rexnet_130,
    "rexnet_150": fr_rexnet.rexnet_150, "rexnet_200": fr_rexnet.rexnet_200,
}


def _family(name: str) -> str:
    return "rexnet" if name.startswith("rexnet") else "res2net"


def _eval_match(ref, new, x):
    ref.eval(), new.eval()
    with torch.no_grad():
        assert_close(new(x), ref(x), name="logits")


@pytest.mark.parametrize("name", ["res2net50_26w_4s", "rexnet_100"])
def test_convert_timm_model(name):
    timm_block, fr_block = BLOCKS[_family(name)]
    ref = timm.create_model(name, num_classes=10)
    n_blocks = sum(qualname(m) == timm_block for m in ref.modules())
    new = fastres.convert(ref)
    replaced = [p for p, src, dst in fastres.conversion_report(new).replaced if src == timm_block]
    assert len(replaced) == n_blocks == sum(isinstance(m, fr_block) for m in new.modules()) > 0
    assert not any(qualname(m) == timm_block for m in new.modules())
    assert list(new.state_dict()) == list(ref.state_dict())
    x = torch.randn(2, 3, 64, 64)
    _eval_match(ref, new, x)
    _eval_match(ref, new.to(memory_format=CL), x.to(memory_format=CL))


def test_converted_model_train_step():
    """fp32 fastres model against timm's in float64: logits, input and parameter grads, running
    statistics and num_batches_tracked after one training step."""
    ref = timm.create_model("res2net50_26w_4s", num_classes=10)
    new = fastres.convert(ref).train()
    ref.double().train()
    x = torch.randn(2, 3, 64, 64)
    xr, xn = x.double().requires_grad_(), x.clone().requires_grad_()
    yr, yn = ref(xr), new(xn)
    assert_close(yn, yr, dtype=torch.float32, name="train logits")
    proj = torch.randn_like(yr)
    (yr * proj).sum().backward()
    (yn.double() * proj).sum().backward()
    assert_close(xn.grad, xr.grad, dtype=torch.float32, name="input grad")
    for (n, pr), pn in zip(ref.named_parameters(), new.parameters()):
        assert_close(pn.grad, pr.grad, dtype=torch.float32, reduced=2 * 2 * 2, name=f"grad {n}")
    for (n, br), bn in zip(ref.named_buffers(), new.buffers()):
        if br.is_floating_point():
            assert_close(bn, br, dtype=torch.float32, name=n)
        else:
            assert torch.equal(bn, br), n


@pytest.mark.parametrize("name", BUILDERS)
def test_builder_matches_timm(name):
    timm_block, fr_block = BLOCKS[_family(name)]
    ref = timm.create_model(name, num_classes=10)
    new = BUILDERS[name](num_classes=10)
    assert not any(qualname(m) == timm_block for m in new.modules())
    assert any(isinstance(m, fr_block) for m in new.modules())
    new.load_state_dict(ref.state_dict(), strict=True)
    _eval_match(ref, new, torch.randn(2, 3, 32, 32))


@pytest.mark.parametrize("name", ["res2net50_26w_4s", "rexnet_100"])
def test_builder_refuses_unfusable_blocks(name):
    with pytest.raises(ValueError, match=r"fastres.convert: \d+ module\(s\) cannot be fused: .*drop_path"):
        BUILDERS[name](num_classes=10, drop_path_rate=0.1)
