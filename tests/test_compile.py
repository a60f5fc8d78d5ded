"""Converted blocks under torch.compile(fullgraph=True): the custom ops trace as opaque nodes,
forward and backward, and give the eager results."""
import copy

import pytest
import torch
import torch.nn as nn
import torchvision.models.resnet as tv

import fastres
from tests.utils import assert_close


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_bottleneck_compiles_fullgraph(train):
    torch._dynamo.reset()
    ds = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))
    block = fastres.convert(tv.Bottleneck(8, 4, 2, ds)).train(train)
    eager = copy.deepcopy(block)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 8, 9, 9, requires_grad=train)
    y, y_ref = compiled(x), eager(x)
    assert_close(y, y_ref)
    if train:
        g = torch.randn_like(y)
        (gx,) = torch.autograd.grad(y, x, g)
        (gx_ref,) = torch.autograd.grad(y_ref, x, g)
        assert_close(gx, gx_ref)
        assert_close(block.bn1.running_mean, eager.bn1.running_mean)


def test_inductor_eval():
    torch._dynamo.reset()
    block = fastres.convert(tv.BasicBlock(8, 8)).eval()
    x = torch.randn(2, 8, 7, 7)
    with torch.no_grad():
        assert_close(torch.compile(block, fullgraph=True)(x), block(x))
