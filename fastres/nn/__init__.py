"""Drop-in fused modules for the ResNet family."""
from fastres.nn.norm_act import BatchNormAct2d  # noqa: F401
from fastres.nn.resnet import BasicBlock, Bottleneck  # noqa: F401
from fastres.nn.se import SqueezeExcite  # noqa: F401
from fastres.nn.densenet import DenseBlock, DenseLayer, Transition  # noqa: F401,E402
from fastres.nn.res2net import Bottle2neck  # noqa: F401,E402
from fastres.nn.rexnet import ConvNormAct, LinearBottleneck  # noqa: F401,E402
from fastres.nn.preact import PreActBasicBlock, PreActBottleneck, PreActProjection  # noqa: F401,E402
from fastres.nn.wide import WideBasic  # noqa: F401,E402
from fastres.nn.sync_bn import SyncBatchNorm2d  # noqa: F401,E402
from fastres.nn.dag import DAGBlock  # noqa: F401,E402
from fastres.nn.inference import Stage  # noqa: F401,E402
