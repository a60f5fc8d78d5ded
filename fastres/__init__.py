"""fastres: fused kernels and drop-in blocks for the ResNet family.

    model = fastres.convert(torchvision.models.resnet50())   # same weights, fused blocks
    print(fastres.explain(model))                            # what runs where, and why
"""
from fastres import ops  # noqa: F401  (registers torch.ops.fastres)
from fastres import functional  # noqa: F401
from fastres.backend import available_backends, get_backend, set_backend, use_backend  # noqa: F401
from fastres.convert import conversion_report, convert  # noqa: F401
from fastres.explain import explain  # noqa: F401
from fastres.tuning import tune  # noqa: F401
from fastres import nn  # noqa: F401,E402

__version__ = "0.1.0"


def __getattr__(name: str):
    import importlib
    if name == "models":  # builders import torchvision/timm; load them on first use
        return importlib.import_module("fastres.models")
    if name == "memory_report":  # loaded on use, so that `python -m fastres.memory` runs it fresh
        return importlib.import_module("fastres.memory").memory_report
    raise AttributeError(f"module 'fastres' has no attribute {name!r}")
