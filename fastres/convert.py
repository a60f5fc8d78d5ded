"""`fastres.convert`: swap the torchvision/timm blocks of any model for fastres blocks that carry
the same parameters and buffers (state_dict unchanged), and report what was replaced and what
was left alone, and why.

Block families register conversion rules next to their modules with `@rule("pkg.mod.Class")`;
a rule returns the new module, or a string saying why this instance cannot be converted.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import torch
import torch.nn as nn

from fastres import backend as _backend

Rule = Callable[[nn.Module], Union[nn.Module, str]]
_RULES: dict[str, Rule] = {}


def qualname(m: nn.Module) -> str:
    t = type(m)
    return f"{t.__module__}.{t.__qualname__}"


def rule(*names: str) -> Callable[[Rule], Rule]:
    """Register a conversion rule for modules whose class is one of `names` (module.qualname);
    matching by name keeps torchvision/timm imports out of fastres's import path."""
    def deco(fn: Rule) -> Rule:
        for n in names:
            _RULES[n] = fn
        return fn
    return deco


def adopt(cls: type, src: nn.Module, **modules_and_attrs) -> nn.Module:
    """An instance of `cls` that takes over `src`'s submodules (no new weights are allocated:
    __init__ is not run) plus the given attributes, in `src`'s train/eval mode."""
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    for k, v in modules_and_attrs.items():
        setattr(new, k, v)
    new.train(src.training)
    return new


def as_subclass(m: nn.Module, cls: type, **attrs) -> nn.Module:
    """`m` itself, re-classed as `cls` (a fastres class adding no parameters), with `attrs` set;
    submodules named in `attrs` (an activation module replaced by its name) are dropped.
    Re-classing keeps the object's identity, so `convert(model, inplace=True)` returns `model`."""
    for k in attrs:
        m._modules.pop(k, None)
    m.__class__ = cls
    for k, v in attrs.items():
        setattr(m, k, v)
    return m


def act_name(m: Optional[nn.Module]) -> Optional[str]:
    """The fastres name of an activation module, or None if it has none."""
    if m is None or isinstance(m, nn.Identity):
        return "identity"
    for cls, name in ((nn.ReLU, "relu"), (nn.ReLU6, "relu6"), (nn.SiLU, "silu")):
        if type(m) is cls:
            return name
    return None


@dataclass
class ConversionReport:
    replaced: list[tuple[str, str, str]] = field(default_factory=list)  # (path, from, to)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)   # (path, class, why)

    def __str__(self) -> str:
        lines = [f"fastres.convert: {len(self.replaced)} module(s) replaced, {len(self.skipped)} left alone"]
        lines += [f"  replaced {p or '<root>'}: {a} -> {b}" for p, a, b in self.replaced]
        lines += [f"  kept     {p or '<root>'}: {a} ({why})" for p, a, why in self.skipped]
        return "\n".join(lines)


class CastInputs:
    """Forward pre-hook casting a model's floating-point tensor inputs to `dtype`."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        return tuple(a.to(self.dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def convert(model: nn.Module, *, backend: Optional[str] = None, inplace: bool = False,
            strict: bool = False, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Return `model` with every recognised block replaced by its fastres counterpart.

    The new blocks share the original parameters and buffers (deep-copied first unless
    `inplace`), so outputs, gradients and state_dict keys stay those of the original, in train
    and in eval mode. `backend` pins the backend of the converted blocks (default: the global
    one at call time, see `fastres.set_backend`). `conversion_report(model)` says what happened;
    with `strict`, a recognised module that has to be left alone is an error naming it and why.
    `dtype` (e.g. torch.bfloat16) casts the parameters and buffers, as `model.to(dtype)` does, and
    floating-point inputs on every call; outputs come back in that dtype.
    """
    import fastres.models  # noqa: F401  (registers the rules of every block and model family)
    import fastres.nn  # noqa: F401

    if backend is not None:
        _backend._check_name(backend)
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"fastres.convert: dtype must be a floating-point torch.dtype, got {dtype!r}")
    if not inplace:
        model = copy.deepcopy(model)
    if dtype is not None:
        model.to(dtype)
        model.register_forward_pre_hook(CastInputs(dtype))
    report = ConversionReport()
    model = _convert(model, "", backend, report)
    object.__setattr__(model, "_fastres_report", report)
    if strict and report.skipped:
        why = "; ".join(f"{p or '<root>'}: {reason}" for p, _, reason in report.skipped)
        raise ValueError(f"fastres.convert: {len(report.skipped)} module(s) cannot be fused: {why}")
    return model


def _convert(m: nn.Module, path: str, backend: Optional[str], report: ConversionReport) -> nn.Module:
    source = qualname(m)
    fn = _RULES.get(source)
    if fn is not None:
        new = fn(m)
        if isinstance(new, str):
            report.skipped.append((path, source, new))
        else:
            for sub in new.modules():
                if hasattr(type(sub), "backend"):
                    sub.backend = backend
            report.replaced.append((path, source, qualname(new)))
            m = new  # its children may be convertible too (a model-level rule keeps its blocks)
    for name, child in list(m.named_children()):
        new = _convert(child, f"{path}.{name}" if path else name, backend, report)
        if new is not child:
            setattr(m, name, new)
    if isinstance(m, nn.Sequential):
        _fuse_bn_act_pairs(m, path, backend, report)
        _as_stage(m, path, report)
    return m


def _as_stage(seq: nn.Sequential, path: str, report: ConversionReport) -> None:
    """A plain Sequential of fastres residual blocks becomes a `fastres.nn.Stage` (same modules
    and keys), whose eval inference lets identity blocks add into the residual stream in place."""
    from fastres.nn.inference import Stage, reuses_input
    if type(seq) is nn.Sequential and len(seq) > 1 and all(reuses_input(b) for b in seq):
        source = qualname(seq)
        report.replaced.append((path, source, qualname(as_subclass(seq, Stage))))


def _fuse_bn_act_pairs(seq: nn.Sequential, path: str, backend: Optional[str], report: ConversionReport) -> None:
    """(BatchNorm2d, ReLU/ReLU6/SiLU) neighbours in a Sequential become (BatchNormAct2d, Identity)."""
    from fastres.nn.norm_act import BatchNormAct2d
    names = list(seq._modules)
    for a, b in zip(names, names[1:]):
        bn, act = seq._modules[a], seq._modules[b]
        if type(bn) is nn.BatchNorm2d and act_name(act) not in (None, "identity"):
            source = qualname(bn) + " + " + qualname(act)
            seq._modules[a] = as_subclass(bn, BatchNormAct2d, act=act_name(act), backend=backend)
            seq._modules[b] = nn.Identity()
            report.replaced.append((f"{path}.{a}" if path else a, source, qualname(seq._modules[a])))


def conversion_report(model: nn.Module) -> Optional[ConversionReport]:
    """What `convert` replaced and left alone in `model` (None if it was not converted)."""
    return getattr(model, "_fastres_report", None)
