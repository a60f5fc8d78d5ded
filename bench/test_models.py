"""Whole models, inference and training (forward + backward + SGD step): eager vs channels_last
vs torch.compile vs fastres; img/s and speedups in extra_info."""
import pytest
import torch

from bench.conftest import run
from fastres.benchmark import build, group_name, prepare

# resnetv2_50 is timm's pre-activation ResNet-50
MODELS = ["resnet50", "resnext50_32x4d", "wide_resnet50_2", "resnetv2_50", "res2net50_26w_4s", "rexnet_100",
          "densenet121"]
# quick mode runs every provider once per mode on one small model (compiling a 50-layer training
# graph takes a minute or more on two cores); the listed models are checked by tests/test_convert.py
QUICK_MODELS = ["resnet18"]


def pytest_generate_tests(metafunc):
    if "name" in metafunc.fixturenames:
        metafunc.parametrize("name", QUICK_MODELS if metafunc.config.getoption("--quick") else MODELS)


@pytest.mark.parametrize("mode", ["infer", "train"])
def test_model(benchmark, quick, baselines, device, dtype, name, mode, provider):
    # train-mode BN needs more than one value per channel in the last stage (1x1 at 32x32)
    batch, size = (2 if mode == "train" else 1, 32) if quick else (8, 224)
    x = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
    benchmark.group = group_name(name, x.shape, x.dtype, mode)
    case = prepare(provider, build(name).to(device, dtype), x, train=mode == "train")
    run(benchmark, case, quick=quick, batch=batch, baselines=baselines)
