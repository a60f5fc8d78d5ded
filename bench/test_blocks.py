"""Single blocks at ResNet-50 stage shapes: eager vs channels_last vs torch.compile vs fastres."""
import pytest
import torch
import torch.nn as nn
import torchvision.models.resnet as tv

from bench.conftest import run
from fastres.benchmark import group_name, prepare, providers

# (name, build, input shape); quick mode shrinks batch and spatial size
SUBJECTS = {
    "bottleneck_s2": (lambda: tv.Bottleneck(256, 64), (8, 256, 56, 56)),
    "bottleneck_s3_down": (lambda: tv.Bottleneck(256, 128, 2, nn.Sequential(
        nn.Conv2d(256, 512, 1, stride=2, bias=False), nn.BatchNorm2d(512))), (8, 256, 56, 56)),
    "basic_s4": (lambda: tv.BasicBlock(512, 512), (8, 512, 7, 7)),
}


@pytest.mark.parametrize("mode", ["infer", "train"])
@pytest.mark.parametrize("subject", list(SUBJECTS))
@pytest.mark.parametrize("provider", providers())
def test_block(benchmark, quick, baselines, subject, mode, provider):
    build, shape = SUBJECTS[subject]
    if quick and provider == "compile":
        pytest.skip("quick mode compiles only in test_models.py (C++ codegen costs seconds per graph)")
    if quick:
        shape = (1, shape[1], min(shape[2], 8), min(shape[3], 8))
    benchmark.group = group_name(subject, shape, torch.float32, mode)
    torch.manual_seed(0)
    case = prepare(provider, build(), torch.randn(shape), train=mode == "train")
    run(benchmark, case, quick=quick, batch=shape[0], baselines=baselines)
