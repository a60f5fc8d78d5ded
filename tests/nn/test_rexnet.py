"""fastres LinearBottleneck against timm's ReXNet block with the same weights."""
import pytest
import torch
from timm.layers import DropPath
from timm.models import rexnet as timm_rexnet

import fastres
from fastres.nn.rexnet import LinearBottleneck
from tests.nn.blockcheck import assert_matches_float64, round_to
from tests.utils import randomize_bn

CL = torch.channels_last


def _timm_block(in_chs, out_chs, stride, exp_ratio, se_ratio, dilation=(1, 1), **kw):
    ref = timm_rexnet.LinearBottleneck(in_chs, out_chs, stride, dilation=dilation, exp_ratio=exp_ratio,
                                       se_ratio=se_ratio, **kw)
    randomize_bn(ref)
    with torch.no_grad():
        ref.conv_dw.bn.weight.mul_(6)  # so the ReLU6 after the depthwise conv clips
    return ref


# The SE's BN normalises over the batch only (N values per channel): with N=2 its output barely
# depends on its input and the gradient through it is float noise, so SE cases use N >= 3.
# In training mode the gradient of se.fc1.bias (a bias right before batch-statistics BN) is
# exactly 0; computed it is a rounding residue amplified by that BN's 1/std, so it is not compared.
ZERO_IN_TRAIN = ("se.fc1.bias",)
CASES = {  # name: (in_chs, out_chs, stride, exp_ratio, se_ratio, N, H, W)
    "exp1-full-residual": (8, 8, 1, 1.0, 0.0, 2, 7, 7),
    "exp1-s2-se": (8, 12, 2, 1.0, 1 / 12, 4, 15, 15),
    "exp6-partial-residual": (8, 12, 1, 6.0, 0.0, 2, 15, 15),
    "exp6-partial-residual-se": (8, 12, 1, 6.0, 1 / 12, 4, 7, 7),
    "exp6-s2": (8, 12, 2, 6.0, 0.0, 2, 15, 15),
    "exp6-s2-se": (8, 12, 2, 6.0, 1 / 12, 4, 8, 8),
    "exp6-shrink-se": (16, 12, 1, 6.0, 1 / 12, 4, 7, 7),   # in > out: no shortcut
    "1x1": (8, 12, 1, 6.0, 1 / 12, 3, 1, 1),
    "batch1": (8, 12, 1, 6.0, 0.0, 1, 7, 7),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_block_matches_timm(case, train, cl, dtype):
    in_chs, out_chs, stride, exp, se, N, H, W = CASES[case]
    ref = round_to(_timm_block(in_chs, out_chs, stride, exp, se), dtype)
    new = fastres.convert(ref).to(dtype)
    assert type(new) is LinearBottleneck and (new.se is not None) == (se > 0)
    assert (new.conv_exp is not None) == (exp != 1.0)
    x = torch.randn(N, in_chs, H, W, dtype=dtype)
    if cl:
        x, new = x.to(memory_format=CL), new.to(memory_format=CL)
    y = assert_matches_float64(ref.double(), new, x, train=train, skip_grads=ZERO_IN_TRAIN if train else ())
    if cl and y.shape[2] * y.shape[3] > 1:
        assert y.is_contiguous(memory_format=CL)


@pytest.mark.parametrize("case", ["exp1-full-residual", "exp6-partial-residual-se", "exp6-s2-se"])
def test_constructor_keys_and_outputs(case):
    in_chs, out_chs, stride, exp, se, N, H, W = CASES[case]
    ref = _timm_block(in_chs, out_chs, stride, exp, se)
    new = LinearBottleneck(in_chs, out_chs, stride, exp_ratio=exp, se_ratio=se)
    assert list(new.state_dict()) == list(ref.state_dict())
    new.load_state_dict(ref.state_dict(), strict=True)
    assert new.use_shortcut == ref.use_shortcut
    ref.double()
    for train in (False, True):
        assert_matches_float64(ref, new, torch.randn(N, in_chs, H, W), train=train,
                               skip_grads=ZERO_IN_TRAIN if train else ())


def test_dilated_block():
    ref = _timm_block(8, 12, 1, 6.0, 1 / 12, dilation=(2, 2))
    new = fastres.convert(ref)
    assert new.conv_dw.conv.dilation == (2, 2) and new.use_shortcut
    ref.double()
    for train in (False, True):
        assert_matches_float64(ref, new, torch.randn(4, 8, 9, 9), train=train,
                               skip_grads=ZERO_IN_TRAIN if train else ())


@pytest.mark.parametrize("kw, why", [
    (dict(drop_path=DropPath(0.1)), "drop_path"),
    (dict(dw_act_layer="gelu"), "GELU"),
    (dict(act_layer="gelu"), "conv_exp: activation GELU"),
])
def test_rule_refuses(kw, why):
    ref = _timm_block(8, 12, 1, 6.0, 0.0, **kw)
    new = fastres.convert(ref)
    assert type(new) is timm_rexnet.LinearBottleneck
    reasons = [r for p, _, r in fastres.conversion_report(new).skipped if p == ""]
    assert len(reasons) == 1 and why in reasons[0]


@pytest.mark.parametrize("bad, err, match", [
    (torch.randn(2, 5, 8, 8), ValueError, r"LinearBottleneck: expected 8 input channels"),
    (torch.randn(8, 8, 8), ValueError, r"LinearBottleneck: expected a 4-D input"),
    (torch.ones(2, 8, 8, 8, dtype=torch.int64), TypeError, r"LinearBottleneck: expected a floating-point input"),
])
def test_bad_input(bad, err, match):
    new = LinearBottleneck(8, 12, 1, exp_ratio=6.0, se_ratio=1 / 12)
    with pytest.raises(err, match=match):
        new(bad)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("stride, kernel, act", [(2, 3, "silu"), (1, 1, "silu"), (1, 3, "relu6")])
def test_standalone_conv_norm_act(stride, kernel, act, train):
    """timm's ConvNormAct outside a block (ReXNet's stem and head) converts to one fused op."""
    import copy

    from timm.layers import ConvNormAct

    from fastres.nn.rexnet import ConvNormAct as Fused
    ref = randomize_bn(ConvNormAct(6, 10, kernel, stride=stride, act_layer=act))
    new = fastres.convert(ref)
    assert type(new) is Fused and new.act == act
    assert_matches_float64(copy.deepcopy(ref).double(), new, torch.randn(2, 6, 9, 9), train=train)
