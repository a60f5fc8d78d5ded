"""Backend choice, per-op implementation tables, visible fallback and the `explain` record.

A backend is chosen once (``set_backend``, ``use_backend`` or env ``FASTRES_BACKEND``) and passed
to every op as a plain string, so torch.compile sees a constant. Each op family registers, per
backend, an implementation and a ``supports(*args) -> reason | None`` check; when the requested
backend cannot run a case the op runs the reference instead, warns once, and the decision is
recorded for ``fastres.explain``.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import platform
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

BACKENDS = ("auto", "reference", "native", "triton")
# "auto" tries these in order, per device type. The Triton kernels are proven in the interpreter
# and compiled offline for sm_80/sm_90; on CUDA they run when asked for (backend="triton"), or ...
_AUTO_ORDER = {"cuda": ("native", "reference"), "cpu": ("native", "reference")}
# ... where a measurement says so: per device type, the ops whose auto choice is replaced by one
# of these challengers where fastres.tuning timed it faster on the call's shapes
_MEASURED = {"cuda": {"conv2d": ("triton",), "conv2d_stats": ("triton",), "conv2d_means": ("triton",)}}


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"fastres: unknown backend {name!r}; expected one of {BACKENDS}")
    return name


_current = _check_name(os.environ.get("FASTRES_BACKEND", "auto"))


def get_backend() -> str:
    return _current


class Switch:
    """A module-level setting: `Switch(value)` sets it; `with Switch(value):` also restores, on
    exit, what was set before. Subclasses say where the setting lives."""

    def __init__(self, value) -> None:
        self.prev = self._get()
        self._set(value)

    def __enter__(self) -> "Switch":
        return self

    def __exit__(self, *exc) -> None:
        self._set(self.prev)

    def _get(self):
        raise NotImplementedError

    def _set(self, value) -> None:
        raise NotImplementedError


class set_backend(Switch):
    """Select the backend; usable as a call or as a context manager that restores the previous one."""

    def _get(self) -> str:
        return _current

    def _set(self, name: str) -> None:
        global _current
        _current = _check_name(name)


use_backend = set_backend


# ---- extension and Triton availability -------------------------------------------------------
def cpu_kernel_isa(capability: str, machine: str) -> Optional[str]:
    """Which build of the CPU kernels (module fastres._cpu_<isa>) runs at torch's CPU capability
    (torch.backends.cpu.get_cpu_capability(), which env ATEN_CPU_CAPABILITY lowers) on this machine
    type; None where there is none: x86-64 builds need AVX2."""
    if machine not in ("x86_64", "AMD64"):
        return "default"
    return {"AVX512": "avx512", "AVX2": "avx2"}.get(capability)


def _load_native() -> tuple[Optional[str], Optional[str]]:
    """Import the compiled extension and the CPU kernel build for this CPU; return (None, its ISA)
    on success or (the reason they are missing, None)."""
    if os.environ.get("FASTRES_DISABLE_NATIVE") == "1":
        return "disabled by FASTRES_DISABLE_NATIVE=1", None
    capability = torch.backends.cpu.get_cpu_capability()
    isa = cpu_kernel_isa(capability, platform.machine())
    if isa is None:
        return f"the CPU kernels need AVX2 or AVX-512; torch runs this CPU at {capability}", None
    try:
        from fastres import _C  # noqa: F401  (defines torch.ops.fastres_native, registers CUDA kernels)
        importlib.import_module(f"fastres._cpu_{isa}")  # registers the CPU kernels
    except (ImportError, OSError) as e:
        return f"extension not importable ({e})", None
    return None, isa


# why the native kernels cannot run (None when they can), and which CPU build of them runs
NATIVE_MISSING, NATIVE_CPU_ISA = _load_native()
if NATIVE_MISSING is not None and os.environ.get("FASTRES_DISABLE_NATIVE") != "1":
    warnings.warn(f"fastres: native backend unavailable: {NATIVE_MISSING}; using the reference backend",
                  stacklevel=2)


def _triton_missing(device: torch.device) -> Optional[str]:
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return f"triton kernels run on CUDA devices (device is {device.type}; TRITON_INTERPRET=1 runs them on CPU)"


def available_backends(device: str | torch.device = "cpu") -> list[str]:
    """Backends that can run at least one op on `device` (reference always can)."""
    device = torch.device(device)
    names = ["reference"]
    if NATIVE_MISSING is None:
        names.append("native")
    if _triton_missing(device) is None and any("triton" in t for t in _TABLES.values()):
        names.append("triton")
    return names


# ---- per-op implementation tables ------------------------------------------------------------
Supports = Callable[..., Optional[str]]


@dataclass(frozen=True)
class Impl:
    fn: Callable
    supports: Supports
    kernel: bool = True  # False: built on torch's own kernels (oneDNN), not on fastres._C's


_TABLES: dict[str, dict[str, Impl]] = {}


def register(op: str, backend: str, supports: Supports = lambda *a, **k: None, *, kernel: bool = True):
    """Decorator: `fn` implements `op` on `backend` when `supports(*args)` returns None.
    `kernel=False`: a native implementation that needs no `fastres_native.<op>` kernel of its own
    (its `supports` names whatever else it needs)."""
    def deco(fn: Callable) -> Callable:
        _TABLES.setdefault(op, {})[backend] = Impl(fn, supports, kernel)
        return fn
    return deco


def _backend_missing(backend: str, device: torch.device, op: str) -> Optional[str]:
    if backend == "native":
        if NATIVE_MISSING is None and not hasattr(torch.ops.fastres_native, op):
            return f"the installed extension has no {op} kernel (stale build: reinstall fastres)"
        return NATIVE_MISSING
    if backend == "triton":
        return _triton_missing(device)
    return None


def _try(op: str, backend: str, device: torch.device, args) -> tuple[Optional[Impl], str]:
    impl = _TABLES.get(op, {}).get(backend)
    if impl is None:
        return None, f"no {backend} kernel for {op}"
    why = (_backend_missing(backend, device, op) if impl.kernel else None) or impl.supports(*args)
    return (None, why) if why else (impl, "")


# ---- decisions: warn once, record for explain ------------------------------------------------
_warned: set[tuple[str, str, str]] = set()
_recorder: Optional[list] = None
_scope: list[str] = []


def choose(op: str, backend: str, device: torch.device, args) -> Callable:
    """The implementation of `op` that runs for `backend` on these args, falling back visibly.
    While an op is decomposed for tracing (`decomposing`), anything but Triton raises Opaque."""
    name, fn = _choose(op, backend, device, args)
    if _decomposing and name != "triton":
        raise Opaque(f"{op} runs on {name}")
    return fn


def _choose(op: str, backend: str, device: torch.device, args) -> tuple[str, Callable]:
    if backend == "auto":
        reasons = []
        for name in _AUTO_ORDER.get(device.type, ("reference",)):
            impl, why = _try(op, name, device, args)
            if impl is not None:
                tuned = _measured(op, name, impl.fn, device, args)
                if tuned is not None:
                    name, fn, why = tuned
                    _record(op, name, "auto: " + why)
                    return name, fn
                _record(op, name, "auto: " + ("; ".join(reasons) or f"first choice on {device.type}"))
                return name, impl.fn
            reasons.append(f"{name}: {why}")
        raise AssertionError(f"fastres: no implementation of {op}")  # reference supports everything
    impl, why = _try(op, backend, device, args)
    if impl is not None:
        _record(op, backend, "requested")
        return backend, impl.fn
    key = (op, backend, why)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"fastres: {op} falls back from {backend} to reference: {why}", stacklevel=4)
    _record(op, "reference", f"fallback from {backend}: {why}")
    return "reference", _TABLES[op]["reference"].fn


def _measured(op: str, name: str, fn: Callable, device: torch.device, args):
    """fastres.tuning's (backend, fn, why) among auto's choice `name` and the op's challengers that
    support these args, or None (no challenger, or no decision: `name` runs)."""
    challengers = []
    for other in _MEASURED.get(device.type, {}).get(op, ()):
        impl = _try(op, other, device, args)[0] if other != name else None
        if impl is not None:
            challengers.append((other, impl.fn))
    if not challengers:
        return None
    from fastres import tuning
    return tuning.choose(op, device, args, [(name, fn), *challengers])


# ---- tracing: an op that runs Triton kernels is traced as those kernels ----------------------
class Opaque(Exception):
    """Raised by `choose` while an op is decomposed for tracing and its implementation is not
    Triton kernels (oneDNN, ATen, the extension): the op then stays one opaque call in the graph."""


_decomposing = 0  # depth of ops being decomposed (fastres.ops.library); nested ops decompose too


@contextlib.contextmanager
def decomposing() -> Iterator[None]:
    """Inside: `choose` only hands out Triton implementations, whose launches are wrapped for
    tracing (`launcher`), and raises Opaque for any other."""
    global _decomposing
    _decomposing += 1
    try:
        yield
    finally:
        _decomposing -= 1


def launcher(kernel):
    """What to index with the grid to launch a Triton `kernel`: while an op is decomposed, a launch
    that tracing records (`torch.library.wrap_triton`, a triton_kernel_wrapper node), else the kernel
    itself, so an eager launch costs nothing more."""
    return _TracedKernel(kernel) if _decomposing else kernel


class _TracedKernel:
    """`wrap_triton(kernel)[grid](...)` with the kernel's omitted default arguments filled in:
    torch's analysis of what a traced kernel writes needs every argument of its signature."""

    def __init__(self, kernel) -> None:
        self.kernel = kernel

    def __getitem__(self, grid) -> Callable:
        launch = torch.library.wrap_triton(self.kernel)[grid]
        params = self.kernel.signature.parameters

        def run(*args, **kwargs):
            options = {k: kwargs.pop(k) for k in list(kwargs) if k not in params}  # num_warps, ...
            bound = self.kernel.signature.bind(*args, **kwargs)
            bound.apply_defaults()
            return launch(**bound.arguments, **options)
        return run


def _record(op: str, backend: str, why: str) -> None:
    if _recorder is not None:
        _recorder.append((".".join(_scope) or "<top>", op, backend, why))


@contextlib.contextmanager
def recording() -> Iterator[list]:
    """Collect (module path, op, backend, why) for every op call inside the block."""
    global _recorder
    prev, _recorder = _recorder, []
    try:
        yield _recorder
    finally:
        _recorder = prev
