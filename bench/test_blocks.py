"""Single blocks of every family at their network's stage shapes: eager vs channels_last vs
torch.compile vs fastres. Where `fastres gpu-report --traffic` models the same block
(docs/traffic.json, bf16 bytes per image at batch 256), extra_info carries its eager and fused
bytes per image for the mode."""
import functools
import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torchvision.models.resnet as tv

from bench.conftest import run
from fastres.benchmark import group_name, prepare

TRAFFIC = Path(__file__).resolve().parents[1] / "docs" / "traffic.json"


def _projection(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))


def _timm(module: str, cls: str, *args, **kw):
    import importlib
    return getattr(importlib.import_module(f"timm.models.{module}"), cls)(*args, **kw)


def _preact():
    from timm.layers import BatchNormAct2d, create_conv2d
    return _timm("resnetv2", "PreActBottleneck", 256, 256, stride=1, bottle_ratio=0.25, conv_layer=create_conv2d,
                 norm_layer=BatchNormAct2d)


def _densenet_layer():
    from torchvision.models import densenet
    return densenet._DenseLayer(128, 32, 4, 0.0)


# name: (build, input shape, the fastres.traffic block of the same shape or None)
SUBJECTS = {
    "bottleneck_s2": (lambda: tv.Bottleneck(256, 64), (8, 256, 56, 56), "resnet50 layer1.1"),
    "bottleneck_s3_down": (lambda: tv.Bottleneck(256, 128, 2, _projection(256, 512, 2)), (8, 256, 56, 56),
                           "resnet50 layer2.0"),
    "basic_s4": (lambda: tv.BasicBlock(512, 512), (8, 512, 7, 7), None),
    "resnext_bottleneck_s2": (lambda: tv.Bottleneck(256, 64, groups=32, base_width=4), (8, 256, 56, 56),
                              "resnext50_32x4d layer1.1"),
    "preact_bottleneck_s2": (_preact, (8, 256, 56, 56), "resnetv2_50 stages.0.1"),
    "bottle2neck_s2": (lambda: _timm("res2net", "Bottle2neck", 256, 64, 1, None, base_width=26, scale=4,
                                     norm_layer=nn.BatchNorm2d), (8, 256, 56, 56), "res2net50_26w_4s layer1.1"),
    "rexnet_se_28": (lambda: _timm("rexnet", "LinearBottleneck", 50, 61, 1, exp_ratio=6.0, se_ratio=1 / 12),
                     (8, 50, 28, 28), "rexnet_100 features.5"),
    "dense_layer_s1": (_densenet_layer, (8, 128, 56, 56), None),
}


@functools.cache
def _traffic_rows() -> tuple:
    return tuple(json.loads(TRAFFIC.read_text())) if TRAFFIC.exists() else ()


def _modeled(block: str, mode: str) -> dict:
    """eager and fused bytes per image of `block` from the saved traffic table, if it has them."""
    if block is None:
        return {}
    mode = {"infer": "inference", "train": "training"}[mode]
    for row in _traffic_rows():
        if row["block"] == block and row["mode"] == mode and row["ratio"] == row["ratio"]:
            return {"modeled_eager_bytes_per_img": round(row["eager_img"]),
                    "modeled_fused_bytes_per_img": round(row["fused_img"]), "modeled": "bf16, H100 roofline model"}
    return {}


@pytest.mark.parametrize("mode", ["infer", "train"])
@pytest.mark.parametrize("subject", list(SUBJECTS))
def test_block(benchmark, quick, baselines, device, dtype, subject, mode, provider):
    build, shape, block = SUBJECTS[subject]
    if quick and provider == "compile":
        pytest.skip("quick mode compiles only in test_models.py (C++ codegen costs seconds per graph)")
    if quick:
        shape = (2, shape[1], min(shape[2], 8), min(shape[3], 8))   # train-mode BN in an SE needs 2 images
    benchmark.group = group_name(subject, shape, dtype, mode)
    torch.manual_seed(0)
    case = prepare(provider, build().to(device, dtype), torch.randn(shape, device=device, dtype=dtype),
                   train=mode == "train")
    if not quick:
        benchmark.extra_info.update(_modeled(block, mode))
    run(benchmark, case, quick=quick, batch=shape[0], baselines=baselines)
