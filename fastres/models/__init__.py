"""Model builders with torchvision/timm names, keyword arguments and state_dict keys."""
from fastres.models.resnet import (  # noqa: F401
    ResNet, resnet18, resnet34, resnet50, resnet101, resnet152, resnext50_32x4d, resnext101_32x8d,
    resnext101_64x4d, wide_resnet50_2, wide_resnet101_2)
from fastres.models.densenet import densenet121, densenet161, densenet169, densenet201  # noqa: F401,E402
