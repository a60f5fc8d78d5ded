"""torchvision-compatible builders: identical keys, strict state_dict loading, same outputs."""
import pytest
import torch
import torchvision

import fastres.models as fm
from tests.utils import assert_close, randomize_bn

NAMES = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
         "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2"]


@pytest.mark.parametrize("name", NAMES)
def test_keys_and_shapes_match_torchvision(name):
    with torch.device("meta"):
        ours, theirs = getattr(fm, name)(num_classes=7), getattr(torchvision.models, name)(num_classes=7)
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b)
    assert all(a[k].shape == b[k].shape for k in a)


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2"])
def test_loads_torchvision_weights_and_matches(name):
    torch.manual_seed(0)
    ref = randomize_bn(getattr(torchvision.models, name)()).eval()
    ours = getattr(fm, name)().eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert_close(ours(x), ref(x), name=name)


def test_builder_keywords_pass_through():
    m = fm.resnet50(num_classes=3, replace_stride_with_dilation=[False, True, True])
    assert m.fc.out_features == 3 and m.layer4[1].conv2.dilation == (4, 4)
    with torch.no_grad():
        assert m.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 3)
