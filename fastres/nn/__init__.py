"""Drop-in fused modules for the ResNet family."""
from fastres.nn.norm_act import BatchNormAct2d  # noqa: F401
from fastres.nn.resnet import BasicBlock, Bottleneck  # noqa: F401
from fastres.nn.se import SqueezeExcite  # noqa: F401
from fastres.nn.densenet import DenseBlock, DenseLayer, Transition  # noqa: F401,E402
