"""Model builders with torchvision/timm names, keyword arguments and state_dict keys."""
from fastres.models.resnet import (  # noqa: F401
    ResNet, resnet18, resnet34, resnet50, resnet101, resnet152, resnext50_32x4d, resnext101_32x8d,
    resnext101_64x4d, wide_resnet50_2, wide_resnet101_2)
from fastres.models.densenet import densenet121, densenet161, densenet169, densenet201  # noqa: F401,E402
from fastres.models.res2net import (  # noqa: F401,E402
    res2net50_14w_8s, res2net50_26w_4s, res2net50_26w_6s, res2net50_26w_8s, res2net50_48w_2s,
    res2net101_26w_4s, res2next50)
from fastres.models.rexnet import rexnet_100, rexnet_130, rexnet_150, rexnet_200  # noqa: F401,E402
from fastres.models.preact import (  # noqa: F401,E402
    preact_resnet18, preact_resnet34, preact_resnet50, preact_resnet101, preact_resnet152)
from fastres.models.cifar import (  # noqa: F401,E402
    CifarResNet, cifar_preact_resnet, cifar_resnet, preact_resnet110, preact_resnet164,
    preact_resnet1001, resnet20, resnet56, resnet110, wide_resnet_cifar, wrn_16_8, wrn_28_10, wrn_40_4)
