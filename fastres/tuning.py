"""Measured per-shape choice between implementations of one op, cached.

On CUDA, `backend="auto"` runs a convolution as cuDNN plus the native elementwise kernels; the
fused Triton conv is faster for some shapes and slower for others, and only a measurement tells
which. As `torch.backends.cudnn.benchmark` does for cuDNN's algorithms, the first call of each
*key* (op, every tensor argument's dtype, shape and strides, every other argument's value) times
every candidate on that call's own arguments and keeps the fastest; later calls with the same key
take the decision without timing. The default candidate (auto's first choice) keeps ties: another
wins only if it is faster by more than `MARGIN`, so tuning never trades cuDNN for a Triton conv
that is slower, or merely as fast.

Measuring runs kernels several times and compiles Triton variants, so it happens only when asked
for: `fastres.tune()` (a call or a context manager) or env `FASTRES_TUNE=1`.
Decisions already known are used either way. They are kept for the process and in a JSON file,
`$FASTRES_CACHE_DIR/tuning.json` (default `~/.cache/fastres`), under the GPU's name and the
torch, triton and fastres versions, so that one tuned run serves later ones. Nothing is measured
on fake or meta tensors (tracing), while a CUDA graph is being captured, or while torch.compile
traces; the default runs then unless a decision is cached.

The timer is `triton.testing.do_bench` (warm-up, L2 flushed between runs, synchronised, median).
A candidate that raises while measured is left out, with a warning.
"""
from __future__ import annotations

import functools
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from fastres.backend import Switch

MARGIN = 0.03   # a challenger must be at least 3% faster than the default to replace it

_enabled = os.environ.get("FASTRES_TUNE") == "1"


def enabled() -> bool:
    return _enabled


class tune(Switch):
    """Measure undecided keys (`tune()`, `tune(True)`) or stop measuring (`tune(False)`): a call
    sets it; `with tune():` sets it inside and restores the previous setting after."""

    def __init__(self, on: bool = True) -> None:
        super().__init__(bool(on))

    def _get(self) -> bool:
        return _enabled

    def _set(self, value: bool) -> None:
        global _enabled
        _enabled = value


def key(op: str, args: Sequence[Any]) -> str:
    """What a decision depends on: the op, each tensor's dtype, shape and strides, other values."""
    parts = [op]
    for a in args:
        if isinstance(a, torch.Tensor):
            parts.append(f"{str(a.dtype).removeprefix('torch.')}{tuple(a.shape)}/{tuple(a.stride())}")
        else:
            parts.append(repr(a))
    return "|".join(parts)


def default_timer(fn: Callable[[], Any]) -> float:
    """Milliseconds per call of `fn` on the GPU: triton's do_bench, median."""
    from triton.testing import do_bench
    return float(do_bench(fn, warmup=10, rep=40, return_mode="median"))


timer: Callable[[Callable[[], Any]], float] = default_timer


@functools.lru_cache(maxsize=None)
def _environment(device: torch.device) -> str:
    import fastres
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = "none"
    return f"{name} | torch {torch.__version__} | triton {tv} | fastres {fastres.__version__}"


def cache_path() -> Path:
    root = os.environ.get("FASTRES_CACHE_DIR") or Path.home() / ".cache" / "fastres"
    return Path(root) / "tuning.json"


_decisions: dict[str, dict[str, dict]] = {}   # environment -> key -> {"choice": name, "ms": {name: ms}}
_loaded: set[str] = set()
_warned: set[str] = set()


def _read() -> dict:
    """The cache file's contents; {} if it is missing, unreadable or not what `_save` writes."""
    try:
        saved = json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}
    return saved if isinstance(saved, dict) else {}


def _table(env: str) -> dict[str, dict]:
    if env not in _loaded:
        _loaded.add(env)
        saved = _read().get(env)
        entries = saved.items() if isinstance(saved, dict) else ()
        _decisions.setdefault(env, {}).update(
            {k: v for k, v in entries if isinstance(v, dict) and isinstance(v.get("choice"), str)
             and isinstance(v.get("ms"), dict)})
    return _decisions.setdefault(env, {})


def _save(env: str) -> None:
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        everything = _read()
        mine = everything.get(env)
        everything[env] = {**(mine if isinstance(mine, dict) else {}), **_decisions[env]}
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
            json.dump(everything, f, indent=1, sort_keys=True)
        os.replace(f.name, path)
    except OSError as e:
        _warn(f"fastres: tuning decisions kept for this process only, {path} is not writable ({e})")


def _warn(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        warnings.warn(msg, stacklevel=4)


def _can_measure(args: Sequence[Any]) -> Optional[str]:
    """Why timing these arguments now is impossible, or None."""
    from torch._subclasses.fake_tensor import FakeTensor
    if torch.compiler.is_compiling():
        return "torch.compile is tracing"
    if any(isinstance(a, FakeTensor) or isinstance(a, torch.Tensor) and a.device.type == "meta" for a in args):
        return "fake or meta tensors"
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return "a CUDA graph is being captured"
    return None


def _describe(entry: dict, how: str) -> str:
    times = ", ".join(f"{n} {ms:.3f} ms" for n, ms in entry["ms"].items())
    return f"tuned ({how}): {times}" if times else f"tuned ({how})"


def choose(op: str, device: torch.device, args: Sequence[Any],
           candidates: Sequence[tuple[str, Callable]]) -> Optional[tuple[str, Callable, str]]:
    """(name, fn, why) of the candidate to run: the cached decision for this key, or, when tuning
    is on and the arguments can be timed, the fastest one measured now (the first candidate, the
    default, unless another beats it by MARGIN). None: no decision (run the default as usual)."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    env = _environment(device)
    table = _table(env)
    if not table and not _enabled:
        return None
    k = key(op, args)
    by_name = dict(candidates)
    entry = table.get(k)
    if entry is not None and entry["choice"] in by_name:
        return entry["choice"], by_name[entry["choice"]], _describe(entry, "cached")
    if not _enabled or _can_measure(args) is not None:
        return None
    ms: dict[str, float] = {}
    for name, fn in candidates:
        try:
            ms[name] = timer(lambda: fn(*args))
        except Exception as e:  # a Triton variant that fails to compile or launch
            _warn(f"fastres: {op} on {name} failed while tuned and is left out for this shape: {e}")
    if not ms:
        return None
    default = candidates[0][0]
    best = min(ms, key=ms.get)
    if default in ms and ms[best] > (1 - MARGIN) * ms[default]:
        best = default
    table[k] = entry = {"choice": best, "ms": {n: round(t, 4) for n, t in ms.items()}}
    _save(env)
    return best, by_name[best], _describe(entry, "measured")


def forget() -> None:
    """Drop every decision held in this process (the file stays; it is read again when needed)."""
    _decisions.clear()
    _loaded.clear()
