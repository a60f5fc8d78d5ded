"""Whole models: eager vs channels_last vs torch.compile vs fastres (img/s in extra_info)."""
import pytest
import torch
import torchvision

from bench.conftest import prepare, providers, run, step_fn

MODELS = ["resnet50", "resnext50_32x4d", "wide_resnet50_2", "densenet121"]


@pytest.mark.parametrize("mode", ["infer"])
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("provider", providers())
def test_model(benchmark, quick, name, mode, provider):
    if quick and name != "resnet50":
        pytest.skip("quick mode times one model; the others are covered by tests/test_convert.py")
    batch, size = (1, 32) if quick else (8, 224)
    benchmark.group = f"{name} ({batch}, 3, {size}, {size}) fp32 {mode}"
    torch.manual_seed(0)
    model, x = prepare(provider, getattr(torchvision.models, name)(), torch.randn(batch, 3, size, size),
                       train=mode == "train")
    run(benchmark, step_fn(model, x, train=mode == "train"), quick=quick, batch=batch,
        extra={"provider": provider})
