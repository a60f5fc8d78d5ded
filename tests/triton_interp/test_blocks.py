"""Whole converted blocks with backend="triton" in the interpreter, against the original block in
float64 with the same weights: torchvision's Bottleneck (plain and ResNeXt-grouped, packed-groups
tiles), timm's PreActBottleneck and Bottle2neck; outputs, input and parameter gradients, running
statistics. Every conv of the block must run on Triton. (The ReXNet block is in test_depthwise.py.)
Needs TRITON_INTERPRET=1 (run by tests/ops/test_triton.py)."""
import copy
import os

import pytest

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 for the whole process (run via tests/ops/test_triton.py)",
                allow_module_level=True)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import fastres  # noqa: E402
from fastres import backend as B  # noqa: E402
from tests.nn.blockcheck import assert_matches_float64  # noqa: E402
from tests.utils import randomize_bn  # noqa: E402

CL = torch.channels_last


def _bottleneck(groups: int):
    from torchvision.models import resnet as tv
    ds = nn.Sequential(nn.Conv2d(32, 64, 1, stride=2, bias=False), nn.BatchNorm2d(64))
    return tv.Bottleneck(32, 16, 2, ds, groups=groups, base_width=16 if groups > 1 else 64)


def _preact():
    from timm.layers import BatchNormAct2d, create_conv2d
    from timm.models import resnetv2
    return resnetv2.PreActBottleneck(32, 64, stride=2, bottle_ratio=0.25, conv_layer=create_conv2d,
                                     norm_layer=BatchNormAct2d, proj_layer=resnetv2.DownsampleConv)


def _res2net():
    from timm.models import res2net
    return res2net.Bottle2neck(32, 8, 1, None, base_width=26, scale=4, norm_layer=nn.BatchNorm2d)


def _se_resnext():
    import timm
    return timm.create_model("seresnext26d_32x4d").get_submodule("layer1.0")


BLOCKS = {  # name: (build, input channels, convs the fused block runs)
    "bottleneck": (lambda: _bottleneck(1), 32, 4),
    "resnext-4x4": (lambda: _bottleneck(4), 32, 4),     # 4 groups of 4 channels: one packed tile
    "preact": (_preact, 32, 4),
    "res2net": (_res2net, 32, None),                    # conv3 may run as a sum of convs over splits
    "se-resnext": (_se_resnext, 64, 4),                 # in eval the SE's means from conv3's epilogue
}


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", list(BLOCKS))
def test_block_on_triton(name, train):
    build, cin, n_convs = BLOCKS[name]
    torch.manual_seed(0)
    ref = randomize_bn(build())
    new = fastres.convert(copy.deepcopy(ref), backend="triton", strict=True).to(memory_format=CL)
    ref.double()
    x = torch.randn(3, cin, 8, 8).to(memory_format=CL)
    with B.recording() as rec:
        assert_matches_float64(ref, new, x, train=train)
    convs = [r for r in rec if r[1] in ("conv2d", "conv2d_stats", "conv2d_means")]
    assert convs and all(r[2] == "triton" for r in convs), rec
    if n_convs is not None:
        assert len(convs) == n_convs, convs
    assert [r[1] for r in convs].count("conv2d_means") == (name.startswith("se-") and not train), convs
    assert not [r for r in rec if r[2] != "triton"], rec
