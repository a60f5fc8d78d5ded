"""fastres BasicBlock / Bottleneck against torchvision's with the same weights."""

import pytest
import torch
import torch.nn as nn
import torchvision.models.resnet as tv
from torchvision.ops import FrozenBatchNorm2d

import fastres
from fastres.nn import BasicBlock, Bottleneck
from tests.utils import assert_same_step, randomize_bn

CL = torch.channels_last


def _pair(kind, inplanes, planes, stride=1, groups=1, base_width=64, norm=nn.BatchNorm2d):
    tv_cls = tv.BasicBlock if kind == "basic" else tv.Bottleneck
    out = planes * tv_cls.expansion
    ds = None
    if stride != 1 or inplanes != out:
        ds = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride=stride, bias=False), norm(out))
    ref = tv_cls(inplanes, planes, stride, ds, groups, base_width, 1, norm)
    randomize_bn(ref)
    new = fastres.convert(ref)
    assert type(new) is (BasicBlock if kind == "basic" else Bottleneck)
    return ref, new


SHAPES = [  # (kind, inplanes, planes, stride, groups, base_width, N, H, W)
    ("basic", 8, 8, 1, 1, 64, 2, 8, 8),
    ("basic", 8, 16, 2, 1, 64, 2, 15, 15),
    ("bottleneck", 16, 4, 1, 1, 64, 2, 7, 7),
    ("bottleneck", 8, 8, 2, 1, 64, 1, 9, 9),
    ("bottleneck", 16, 8, 1, 4, 16, 2, 6, 6),   # ResNeXt: 4 groups of 2 channels
    ("bottleneck", 16, 4, 1, 1, 64, 3, 1, 1),   # 1x1 spatial
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "-".join(map(str, s)))
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_block_matches_torchvision(shape, train, cl, dtype):
    kind, inplanes, planes, stride, groups, bw, N, H, W = shape
    ref, new = _pair(kind, inplanes, planes, stride, groups, bw)
    ref, new = ref.to(dtype), new.to(dtype)
    x = torch.randn(N, inplanes, H, W, dtype=dtype)
    if cl:
        x, ref, new = x.to(memory_format=CL), ref.to(memory_format=CL), new.to(memory_format=CL)
    y = assert_same_step(ref, new, x, train=train)
    if cl and y.shape[2] * y.shape[3] > 1:
        assert y.is_contiguous(memory_format=CL)


def test_running_stats_over_steps_momentum_none():
    ref, new = _pair("bottleneck", 16, 4)
    for m in list(ref.modules()) + list(new.modules()):
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
    for _ in range(3):
        assert_same_step(ref, new, torch.randn(2, 16, 5, 5), train=True)
    assert int(new.bn1.num_batches_tracked) == 3


def test_frozen_batchnorm_blocks():
    ref, new = _pair("bottleneck", 8, 4, stride=2, norm=FrozenBatchNorm2d)
    assert_same_step(ref, new, torch.randn(2, 8, 8, 8), train=True)


def test_track_running_stats_false():
    ref, new = _pair("basic", 4, 4, norm=lambda c: nn.BatchNorm2d(c, track_running_stats=False))
    for train in (True, False):
        assert_same_step(ref, new, torch.randn(2, 4, 6, 6), train=train)


def test_empty_batch():
    ref, new = _pair("bottleneck", 8, 4, stride=2)
    for train in (True, False):
        ref.train(train), new.train(train)
        x = torch.randn(0, 8, 6, 6)
        assert new(x).shape == ref(x).shape == (0, 16, 3, 3)


def test_zero_init_residual_and_keys():
    model = tv.ResNet(Bottleneck, [1, 1, 1, 1], zero_init_residual=True)
    assert all(not b.bn3.weight.any() for b in model.modules() if isinstance(b, Bottleneck))
    assert model.state_dict().keys() == tv.ResNet(tv.Bottleneck, [1, 1, 1, 1]).state_dict().keys()


@pytest.mark.parametrize("bad, err, match", [
    (torch.randn(2, 5, 8, 8), ValueError, r"Bottleneck: expected 16 input channels \(N, 16, H, W\)"),
    (torch.randn(16, 8, 8), ValueError, r"Bottleneck: expected a 4-D input \(N, C=16, H, W\)"),
    (torch.ones(2, 16, 8, 8, dtype=torch.int64), TypeError, r"Bottleneck: expected a floating-point input"),
    (torch.randn(2, 16, 8, 8, dtype=torch.float64), TypeError, r"Bottleneck: input dtype torch.float64"),
    (torch.randn(2, 16, 8, 8, device="meta"), RuntimeError, r"Bottleneck: input is on meta"),
])
def test_bad_input(bad, err, match):
    _, new = _pair("bottleneck", 16, 4)
    with pytest.raises(err, match=match):
        new(bad)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("stage", [0, 1], ids=["identity-pool", "avg-pool"])
def test_avg_down_shortcut_is_fused(train, stage):
    """timm's "d" shortcut, (Identity or AvgPool2d, conv, BN): the conv-BN runs as a fastres op
    (after ATen's pooling), as the 2-layer projection does; every conv of the block is fused."""
    import timm
    from fastres import backend as B
    torch.manual_seed(0)
    ref = randomize_bn(timm.create_model("resnet26d").get_submodule(f"layer{stage + 1}.0"))
    assert len(ref.downsample) == 3
    new = fastres.convert(ref)
    x = torch.randn(3, ref.conv1.in_channels, 8, 8)
    assert_same_step(ref, new, x, train=train)
    with B.recording() as rec:
        new.train(train)(x)
    assert len([r for r in rec if r[1].startswith("conv2d")]) == 4, rec


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("stage", [0, 1], ids=["first", "down"])
def test_se_bottleneck_matches_timm(train, dtype, stage):
    """timm's SE-ResNeXt block: the SE gate is fused with the residual add and ReLU."""
    import timm
    torch.manual_seed(0)
    ref = randomize_bn(timm.create_model("seresnext26d_32x4d").get_submodule(f"layer{stage + 1}.0")).to(dtype)
    new = fastres.convert(ref)
    assert type(new) is Bottleneck and type(new.se).__name__ == "SqueezeExcite"
    x = torch.randn(3, ref.conv1.in_channels, 8, 8, dtype=dtype)
    assert_same_step(ref, new, x, train=train)
