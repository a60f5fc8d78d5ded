"""fastres Bottle2neck against timm's (the official Res2Net block) with the same weights."""
import pytest
import torch
import torch.nn as nn
from timm.layers import EcaModule, SEModule
from timm.models import res2net as timm_res2net

import fastres
from fastres.nn.res2net import Bottle2neck
from tests.nn.blockcheck import assert_matches_float64, round_to
from tests.utils import randomize_bn

CL = torch.channels_last


def _timm_block(inplanes, planes, stride, project, cardinality, base_width, scale, se, dilation=1, **kw):
    out = planes * 4
    ds = None
    if project:
        ds = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out))
    ref = timm_res2net.Bottle2neck(inplanes, planes, stride, ds, cardinality=cardinality, base_width=base_width,
                                   scale=scale, dilation=dilation, norm_layer=nn.BatchNorm2d,
                                   attn_layer=SEModule if se else None, **kw)
    randomize_bn(ref)
    return ref


CASES = {  # name: (inplanes, planes, stride, project, cardinality, base_width, scale, se, N, H, W)
    "stage-s2": (16, 8, 2, True, 1, 26, 4, False, 2, 15, 15),
    "stage-s1": (16, 8, 1, True, 1, 26, 4, False, 2, 7, 7),     # is_first at stride 1: pooled last split
    "normal": (32, 8, 1, False, 1, 26, 4, False, 2, 7, 7),
    "normal-se": (32, 8, 1, False, 1, 26, 4, True, 2, 7, 7),
    "stage-se": (16, 8, 2, True, 1, 26, 4, True, 2, 8, 8),
    "res2next": (64, 16, 1, False, 4, 8, 4, False, 2, 7, 7),    # 4 groups of 2 channels per split
    "res2next-stage": (32, 16, 2, True, 4, 8, 4, False, 2, 9, 9),
    "scale2": (32, 8, 1, False, 1, 48, 2, False, 2, 7, 7),
    "scale8": (32, 8, 1, False, 1, 14, 8, False, 2, 5, 5),
    "scale1": (32, 8, 1, False, 1, 26, 1, False, 2, 5, 5),
    "1x1": (32, 8, 1, False, 1, 26, 4, True, 3, 1, 1),
    "batch1": (16, 8, 2, True, 1, 26, 4, False, 1, 7, 7),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_block_matches_timm(case, train, cl, dtype):
    inplanes, planes, stride, project, card, bw, scale, se, N, H, W = CASES[case]
    ref = round_to(_timm_block(inplanes, planes, stride, project, card, bw, scale, se), dtype)
    new = fastres.convert(ref).to(dtype)
    assert type(new) is Bottle2neck and (new.se is not None) == se
    x = torch.randn(N, inplanes, H, W, dtype=dtype)
    if cl:
        x, new = x.to(memory_format=CL), new.to(memory_format=CL)
    y = assert_matches_float64(ref.double(), new, x, train=train)
    if cl and y.shape[2] * y.shape[3] > 1:
        assert y.is_contiguous(memory_format=CL)


@pytest.mark.parametrize("case", ["stage-s2", "normal-se", "res2next", "scale1"])
def test_constructor_keys_and_outputs(case):
    inplanes, planes, stride, project, card, bw, scale, se, N, H, W = CASES[case]
    ref = _timm_block(inplanes, planes, stride, project, card, bw, scale, se)
    ds = None
    if project:
        ds = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride=stride, bias=False), nn.BatchNorm2d(planes * 4))
    new = Bottle2neck(inplanes, planes, stride, ds, cardinality=card, base_width=bw, scale=scale,
                      se_channels=ref.se.fc1.out_channels if se else None)
    assert list(new.state_dict()) == list(ref.state_dict())
    new.load_state_dict(ref.state_dict(), strict=True)
    ref.double()
    for train in (False, True):
        assert_matches_float64(ref, new, torch.randn(N, inplanes, H, W), train=train)


def test_dilated_block():
    ref = _timm_block(32, 8, 1, False, 1, 26, 4, False, dilation=2)
    new = fastres.convert(ref)
    assert new.convs[0].dilation == (2, 2)
    ref.double()
    for train in (False, True):
        assert_matches_float64(ref, new, torch.randn(2, 32, 9, 9), train=train)


def test_running_stats_over_steps():
    ref = _timm_block(32, 8, 1, False, 1, 26, 4, True)
    new = fastres.convert(ref)
    ref.double()
    for _ in range(3):
        assert_matches_float64(ref, new, torch.randn(2, 32, 6, 6), train=True)
    assert int(new.bns[2].num_batches_tracked) == 3


def test_zero_init_last():
    new = Bottle2neck(16, 4)
    new.zero_init_last()
    assert not new.bn3.weight.any()


@pytest.mark.parametrize("kw, why", [
    (dict(drop_path=nn.Dropout(0.1)), "drop_path"),
    (dict(act_layer=nn.SiLU), "activation is not ReLU"),
])
def test_rule_refuses(kw, why):
    ref = _timm_block(32, 8, 1, False, 1, 26, 4, False, **kw)
    new = fastres.convert(ref)
    assert type(new) is timm_res2net.Bottle2neck
    (_, _, reason), = fastres.conversion_report(new).skipped
    assert why in reason


def test_rule_refuses_other_attention():
    ref = timm_res2net.Bottle2neck(32, 8, norm_layer=nn.BatchNorm2d, attn_layer=EcaModule)
    new = fastres.convert(ref)
    assert type(new) is timm_res2net.Bottle2neck
    assert "EcaModule" in fastres.conversion_report(new).skipped[0][2]


@pytest.mark.parametrize("bad, err, match", [
    (torch.randn(2, 5, 8, 8), ValueError, r"Bottle2neck: expected 32 input channels"),
    (torch.randn(32, 8, 8), ValueError, r"Bottle2neck: expected a 4-D input"),
    (torch.ones(2, 32, 8, 8, dtype=torch.int64), TypeError, r"Bottle2neck: expected a floating-point input"),
])
def test_bad_input(bad, err, match):
    new = Bottle2neck(32, 8)
    with pytest.raises(err, match=match):
        new(bad)
