"""Single blocks at ResNet-50 stage shapes: eager vs channels_last vs torch.compile vs fastres."""
import pytest
import torch
import torch.nn as nn
import torchvision.models.resnet as tv

from bench.conftest import prepare, providers, run, step_fn

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
def test_block(benchmark, quick, subject, mode, provider):
    build, shape = SUBJECTS[subject]
    if quick:
        shape = (1, shape[1], min(shape[2], 8), min(shape[3], 8))
    benchmark.group = f"{subject} {tuple(shape)} fp32 {mode}"
    torch.manual_seed(0)
    model, x = prepare(provider, build(), torch.randn(shape), train=mode == "train")
    run(benchmark, step_fn(model, x, train=mode == "train"), quick=quick, batch=shape[0],
        extra={"provider": provider})
