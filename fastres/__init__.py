"""fastres: fused kernels and drop-in blocks for the ResNet family.

    model = fastres.convert(torchvision.models.resnet50())   # same weights, fused blocks
    print(fastres.explain(model))                            # what runs where, and why
"""
from fastres import ops  # noqa: F401  (registers torch.ops.fastres)
from fastres import functional  # noqa: F401
from fastres.backend import available_backends, get_backend, set_backend, use_backend  # noqa: F401
from fastres.convert import conversion_report, convert  # noqa: F401
from fastres.explain import explain  # noqa: F401
from fastres import nn  # noqa: F401,E402

__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "models":  # builders import torchvision/timm; load them on first use
        import importlib
        return importlib.import_module("fastres.models")
    raise AttributeError(f"module 'fastres' has no attribute {name!r}")
from fastres.memory import memory_report  # noqa: F401,E402
