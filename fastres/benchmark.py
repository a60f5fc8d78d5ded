"""Benchmark helpers shared by `fastres bench` and the pytest-benchmark suites in bench/.

A *provider* is one way to run a model:

    eager            the model as built (NCHW)
    eager_cl         the model and input in channels_last
    compile          channels_last + torch.compile (inductor; with `freezing` for CPU inference)
    fastres-<name>   channels_last + fastres.convert(model, backend=<name>)

`prepare` builds one provider's step (an inference forward, or a training step: forward,
backward and an SGD update) and times its setup: convert / compile plus the first call, where
torch.compile does its work. `bench_model` times every provider round by round on one input,
so machine-load drift hits them alike. Results serialise to the pytest-benchmark JSON shape
(`to_json`), so `python -m bench.report` reads `fastres bench --json` output and
`pytest bench --benchmark-json` output alike. Timings are reported, never asserted.
"""
from __future__ import annotations

import copy
import datetime
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, TextIO

import torch

# name -> library it is built from (seeded random weights, never downloaded);
# resnetv2_50 is timm's pre-activation ResNet-50
MODELS = {
    "resnet18": "torchvision", "resnet50": "torchvision", "resnext50_32x4d": "torchvision",
    "wide_resnet50_2": "torchvision", "densenet121": "torchvision", "resnetv2_50": "timm",
    "res2net50_26w_4s": "timm", "rexnet_100": "timm", "seresnext50_32x4d": "timm",
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MODES = ("infer", "train")


def build(name: str) -> torch.nn.Module:
    """A model from MODELS with seeded random weights."""
    torch.manual_seed(0)
    if MODELS[name] == "timm":
        import timm
        return timm.create_model(name, pretrained=False)
    import torchvision
    return getattr(torchvision.models, name)()


def providers(device: str | torch.device = "cpu") -> list[str]:
    """Every provider that can run on `device` (Triton only on CUDA: on CPU it is interpreted).
    On CUDA with Triton, `fastres-tuned` is `auto` with fastres.tuning on: per conv shape, the
    faster of cuDNN + native kernels and the Triton conv (its setup time includes measuring)."""
    import fastres
    device = torch.device(device)
    backends = [b for b in fastres.available_backends(device) if b != "triton" or device.type == "cuda"]
    return ["eager", "eager_cl", "compile"] + [f"fastres-{b}" for b in backends] + \
        (["fastres-tuned"] if "triton" in backends else [])


def fastres_backend(provider: str) -> tuple[str, bool]:
    """(backend, tuned) of a `fastres-*` provider."""
    name = provider.split("-", 1)[1]
    return ("auto", True) if name == "tuned" else (name, False)


def tuned_if(tuned: bool, step: Callable[[], Any]) -> Callable[[], Any]:
    """`step`, run with fastres.tuning on when `tuned`."""
    if not tuned:
        return step
    from fastres.tuning import tune

    def run():
        with tune():
            return step()
    return run


def provider_key(provider: str) -> tuple[int, str]:
    """Sort key: eager, eager_cl, compile, then the fastres backends by name."""
    return ({"eager": 0, "eager_cl": 1, "compile": 2}.get(provider, 3), provider)


def group_name(subject: str, shape: Iterable[int], dtype: torch.dtype, mode: str) -> str:
    """One benchmark group per (subject, shape, dtype, mode), e.g. 'resnet50 (8, 3, 224, 224) fp32 infer'."""
    short = {v: k for k, v in DTYPES.items()}.get(dtype, str(dtype).removeprefix("torch."))
    return f"{subject} {tuple(shape)} {short} {mode}"


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling on 64-bit


def keep_heap() -> None:
    """Have glibc's malloc keep freed memory for reuse: blocks up to 32 MiB come from the heap
    instead of fresh mmaps, and the heap is never trimmed back to the OS. Then a provider's
    activations land in pages it already touched instead of costing first-touch page faults
    every forward. Process-wide, so every provider timed after it gets the same allocator."""
    import ctypes
    import ctypes.util
    if not sys.platform.startswith("linux"):
        raise RuntimeError(f"--keep-heap tunes glibc's malloc; this is {sys.platform}")
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        raise RuntimeError("--keep-heap tunes glibc's malloc; this C library is not glibc")
    for param, value in ((_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX), (_M_TRIM_THRESHOLD, 2**31 - 1)):
        if libc.mallopt(param, value) != 1:
            raise RuntimeError(f"glibc mallopt({param}, {value}) was refused")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Case:
    """One provider ready to time: `step()` runs one synchronised inference forward or training step."""
    provider: str
    step: Callable[[], Optional[torch.Tensor]]
    setup_s: float                   # convert / compile + the first step
    output: Optional[torch.Tensor]   # the first step's output (inference only)


def prepare(provider: str, model: torch.nn.Module, x: torch.Tensor, *, train: bool) -> Case:
    """A copy of `model` (already in its dtype and on x's device) run by `provider` on `x`, stepped
    once: the setup time covers the memory-format change, convert / compile and that first step."""
    model = copy.deepcopy(model).train(train)
    t0 = time.perf_counter()
    tuned = False
    if provider != "eager":
        model, x = model.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    if provider == "compile":
        # freezing folds weights into the graph: CPU inference only (what inductor users pick there)
        model = torch.compile(model, options={"freezing": not train and x.device.type == "cpu"})
    elif provider.startswith("fastres-"):
        import fastres
        backend, tuned = fastres_backend(provider)
        model = fastres.convert(model, backend=backend, inplace=True)
    elif provider not in ("eager", "eager_cl"):
        raise ValueError(f"unknown provider {provider!r}; known: {', '.join(providers(x.device))}")
    step = tuned_if(tuned, _step(model, x, train=train))
    out = step()
    setup_s = time.perf_counter() - t0
    return Case(provider, step, setup_s, None if out is None else out.clone())  # later steps may reuse memory


def _step(model: torch.nn.Module, x: torch.Tensor, *, train: bool) -> Callable[[], Optional[torch.Tensor]]:
    if not train:
        def infer():
            with torch.inference_mode():
                y = model(x)
            synchronize(x.device)
            return y
        return infer
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def train_step():
        opt.zero_grad(set_to_none=True)
        model(x).float().square().mean().backward()
        opt.step()
        synchronize(x.device)
    return train_step


# ---- whole-model runs (fastres bench) ----------------------------------------------------------
@dataclass
class Result:
    model: str
    provider: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    mode: str
    device: str
    setup_s: float
    times: list[float] = field(default_factory=list)
    max_rel_diff: Optional[float] = None   # inference output vs eager's, same dtype
    threads: int = field(default_factory=torch.get_num_threads)

    @property
    def group(self) -> str:
        return group_name(self.model, self.shape, self.dtype, self.mode)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def img_per_s(self) -> float:
        return self.shape[0] / self.median


class Progress:
    """A text progress bar: redrawn in place on a terminal, otherwise one line each time it grows."""

    def __init__(self, total: int, stream: Optional[TextIO] = None, width: int = 30):
        self.total, self.done, self.width = max(total, 1), 0, width
        self.stream = stream or sys.stderr
        self.tty = getattr(stream, "isatty", lambda: False)()
        self.t0, self._last = time.perf_counter(), -1

    def start(self, label: str) -> None:
        """Show that the next unit of work, `label`, is running; the previous one is done."""
        self._draw(label)
        self.done = min(self.done + 1, self.total)

    def close(self) -> None:
        self._draw("done")
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def _draw(self, label: str) -> None:
        filled = self.width * self.done // self.total
        line = (f"[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} "
                f"{time.perf_counter() - self.t0:5.0f} s  {label}")
        if self.tty:
            self.stream.write(f"\r{line:<100}")
        elif filled != self._last or label == "done":  # a log file gets one line per bar cell
            self.stream.write(line + "\n")
        self._last = filled
        self.stream.flush()


def steps_per_model(n_providers: int, *, warmup: int, iters: int) -> int:
    """Progress units `bench_model` reports: one setup, `warmup` and `iters` steps per provider."""
    return n_providers * (1 + warmup + iters)


def bench_model(name: str, provider_names: list[str], *, batch: int, size: int, dtype: torch.dtype,
                device: str | torch.device = "cpu", mode: str = "infer", warmup: int = 1, iters: int = 5,
                progress: Optional[Progress] = None) -> list[Result]:
    """Time every provider on one model and input; timed steps interleave across providers."""
    device = torch.device(device)
    train = mode == "train"
    model = build(name).to(device=device, dtype=dtype)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device=device, dtype=dtype)
    tick = progress.start if progress else (lambda label: None)
    cases = {}
    for p in provider_names:
        tick(f"{name} {p}: setup{' (torch.compile takes a while)' if p == 'compile' else ''}")
        cases[p] = prepare(p, model, x, train=train)
    results = {p: Result(name, p, tuple(x.shape), dtype, mode, str(device), c.setup_s) for p, c in cases.items()}
    for r in range(warmup + iters):
        for p, c in cases.items():
            tick(f"{name} {p}: " + (f"warm-up {r + 1}/{warmup}" if r < warmup else f"timing {r - warmup + 1}/{iters}"))
            t0 = time.perf_counter()
            c.step()
            if r >= warmup:
                results[p].times.append(time.perf_counter() - t0)
    ref = next((c.output for c in cases.values() if c.provider == "eager" and c.output is not None), None)
    if ref is not None:
        scale = max(ref.abs().max().item(), 1e-30)
        for p, c in cases.items():
            results[p].max_rel_diff = (c.output.float() - ref.float()).abs().max().item() / scale
    return list(results.values())


def format_table(results: list[Result]) -> str:
    """A fixed-width table: per model and provider ms/batch, img/s, speedups vs eager (NCHW and
    channels_last, where they ran), setup seconds and, for inference, the output difference vs eager."""
    base_names = [b for b in ("eager", "eager_cl") if any(r.provider == b for r in results)]
    head = (f"{'model':<18}{'provider':<18}{'ms/batch':>10}{'img/s':>9}"
            + "".join(f"{'vs ' + b:>13}" for b in base_names) + f"{'setup s':>9}{'rel diff':>10}")
    lines = [head, "-" * len(head)]
    for group in dict.fromkeys(r.group for r in results):
        rows = [r for r in results if r.group == group]
        base = {r.provider: r.median for r in rows if r.provider in base_names}
        for r in rows:
            cells = "".join(f"{base[b] / r.median:>12.2f}x" if b in base else f"{'-':>13}" for b in base_names)
            diff = f"{r.max_rel_diff:>10.1e}" if r.max_rel_diff is not None else f"{'-':>10}"
            lines.append(f"{r.model:<18}{r.provider:<18}{r.median * 1e3:>10.1f}{r.img_per_s:>9.1f}"
                         f"{cells}{r.setup_s:>9.2f}{diff}")
    return "\n".join(lines)


def to_json(results: list[Result]) -> dict:
    """The pytest-benchmark JSON shape (the fields bench/report.py and pytest-benchmark's own
    `compare` read): one entry per (model, provider) with `group`, `name`, `stats` in seconds
    (median, mean, min, max, stddev, rounds, data) and `extra_info` (provider, img_per_s,
    speedups, setup_s, threads, ...)."""
    entries = []
    for r in results:
        base = {b.provider: b.median for b in results if b.group == r.group and b.provider in ("eager", "eager_cl")}
        t = r.times
        stats = {"min": min(t), "max": max(t), "mean": statistics.fmean(t), "median": r.median,
                 "stddev": statistics.stdev(t) if len(t) > 1 else 0.0, "rounds": len(t), "iterations": 1,
                 "data": t}
        extra = {"provider": r.provider, "img_per_s": round(r.img_per_s, 2), "setup_s": round(r.setup_s, 3),
                 "threads": r.threads, "device": r.device, "max_rel_diff": r.max_rel_diff,
                 **{f"speedup_vs_{b}": round(m / r.median, 3) for b, m in base.items()}}
        entries.append({"group": r.group, "name": f"{r.model}[{r.provider}-{r.mode}]",
                        "fullname": f"fastres bench {r.model}[{r.provider}-{r.mode}]",
                        "params": {"model": r.model, "provider": r.provider, "mode": r.mode},
                        "stats": stats, "extra_info": extra})
    return {"machine_info": {"node": platform.node(), "processor": platform.processor(),
                             "machine": platform.machine(), "python_version": platform.python_version(),
                             "torch": torch.__version__, "threads": torch.get_num_threads()},
            "commit_info": {}, "benchmarks": entries,
            "datetime": datetime.datetime.now(datetime.timezone.utc).isoformat(), "version": "fastres bench"}


def speedup_groups(results: list[Result]) -> dict[str, dict[str, float]]:
    """group -> provider -> median seconds (what `plot_speedups` and bench/report.py take)."""
    groups: dict[str, dict[str, float]] = {}
    for r in results:
        groups.setdefault(r.group, {})[r.provider] = r.median
    return groups


def pyplot():
    """matplotlib.pyplot on the Agg backend; ImportError with the install line if missing."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("--plot needs matplotlib, which is not installed: pip install matplotlib") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def plot_speedups(groups: dict[str, dict[str, float]], path: str, *, baseline: str = "eager") -> None:
    """A PNG bar chart at `path` (folders made as needed): per group, each provider's speedup vs
    `baseline` (groups without it are left out)."""
    plt = pyplot()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    names = [g for g in sorted(groups) if baseline in groups[g]]
    provs = sorted({p for g in names for p in groups[g]} - {baseline}, key=provider_key)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(names)), 4))
    width = 0.8 / max(len(provs), 1)
    for i, p in enumerate(provs):
        ax.bar([k + i * width for k in range(len(names))],
               [groups[g][baseline] / groups[g][p] if p in groups[g] else math.nan for g in names], width, label=p)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(names))], names, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel(f"speedup vs {baseline}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)


def markers(name: str) -> tuple[str, str]:
    """The pair of HTML comments that delimit a generated block `name` in a Markdown file."""
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def replace_between_markers(path: str, name: str, block: str) -> None:
    """Replace the lines between the `markers(name)` of `path` with `block`: generated tables
    go into the README by script, never by hand."""
    begin, end = markers(name)
    with open(path) as f:
        text = f.read()
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        raise ValueError(f"{path} needs one '{begin}' line followed by one '{end}' line")
    head, rest = text.split(begin)
    with open(path, "w") as f:
        f.write(f"{head}{begin}\n{block}\n{end}{rest.split(end, 1)[1]}")
