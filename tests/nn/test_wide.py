"""WideBasic against an eager composition of plain nn.BatchNorm2d / relu / nn.Conv2d / dropout with
the same weights."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as TF

from fastres.nn.wide import WideBasic
from tests.utils import randomize_bn
from tests.utils import assert_close, assert_same_step

CL = torch.channels_last


class RefWide(nn.Module):
    """BN-ReLU-conv3x3(stride)-dropout-BN-ReLU-conv3x3 + (x or 1x1 conv of BN-ReLU(x))."""

    def __init__(self, block: WideBasic) -> None:
        super().__init__()
        for name, m in block.named_children():
            setattr(self, name, copy.deepcopy(m))
        if block.shortcut is None:
            self.shortcut = None
        self.dropout = block.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xa = torch.relu(self.bn1(x))
        sc = x if self.shortcut is None else self.shortcut(xa)
        out = TF.dropout(self.conv1(xa), self.dropout, self.training)
        return self.conv2(torch.relu(self.bn2(out))) + sc


CASES = [  # (in, out, stride, N, H, W)
    (16, 16, 1, 2, 7, 7),
    (16, 32, 2, 2, 15, 15),   # projection with stride
    (16, 32, 1, 2, 8, 8),     # projection for the width change only (first WRN group)
    (32, 32, 1, 8, 1, 1),     # 1x1 spatial
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_wide_matches_eager(case, train, cl, dtype):
    cin, cout, stride, N, H, W = case
    block = randomize_bn(WideBasic(cin, cout, stride)).to(dtype)
    x = torch.randn(N, cin, H, W, dtype=dtype)
    if cl:
        block, x = block.to(memory_format=CL), x.to(memory_format=CL)
    assert (block.shortcut is None) == (stride == 1 and cin == cout)
    y = assert_same_step(RefWide(block), block, x, train=train)
    if cl and y.shape[2] * y.shape[3] > 1:
        assert y.is_contiguous(memory_format=CL)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_dropout(train):
    """Dropout on the first conv's output: the same mask as eager under the same seed in training,
    none in eval."""
    block = randomize_bn(WideBasic(16, 32, 2, dropout=0.3))
    ref = RefWide(block)
    x = torch.randn(2, 16, 9, 9)
    block.train(train), ref.train(train)
    torch.manual_seed(1)
    y = block(x)
    torch.manual_seed(1)
    assert_close(y, ref(x), dtype=torch.float32, name="output")
    torch.manual_seed(2)
    assert torch.equal(block(x), y) != train  # a new mask in training only


def test_bad_args_and_input():
    with pytest.raises(ValueError, match="WideBasic: dropout"):
        WideBasic(8, 8, dropout=1.0)
    block = WideBasic(16, 16)
    for bad, err, match in [(torch.randn(2, 5, 8, 8), ValueError, "expected 16 input channels"),
                            (torch.randn(16, 8, 8), ValueError, "expected a 4-D input"),
                            (torch.ones(2, 16, 8, 8, dtype=torch.int32), TypeError, "expected a floating-point input")]:
        with pytest.raises(err, match=f"WideBasic: {match}"):
            block(bad)
