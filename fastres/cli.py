"""`fastres` / `python -m fastres`: demo and explain."""
from __future__ import annotations

import argparse
import sys
import time
from typing import Callable, Optional

import torch

MODELS = ("resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2", "densenet121")


def _progress(msg: str) -> None:
    print(f"  .. {msg}", file=sys.stderr, flush=True)


def _time(fn: Callable[[], object], *, warmup: int, iters: int) -> float:
    """Median seconds per call after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _torchvision(name: str) -> torch.nn.Module:
    import torchvision
    return getattr(torchvision.models, name)()


def demo(args: argparse.Namespace) -> int:
    import fastres
    torch.manual_seed(0)
    device = torch.device(args.device)
    _progress(f"building torchvision {args.model} (seeded random weights) on {device}")
    ref = _torchvision(args.model).eval().to(device).to(memory_format=torch.channels_last)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device).to(memory_format=torch.channels_last)
    t0 = time.perf_counter()
    model = fastres.convert(ref)
    convert_s = time.perf_counter() - t0
    report = fastres.conversion_report(model)
    _progress(f"converted in {convert_s:.2f} s: {len(report.replaced)} modules replaced, {len(report.skipped)} left alone")
    with torch.inference_mode():
        y_ref, y = ref(x), model(x)
    err = (y - y_ref).abs().max().item()
    rel = err / max(y_ref.abs().max().item(), 1e-30)
    rows = []
    with torch.inference_mode():
        _progress("timing eager")
        rows.append(("eager (channels_last)", _time(lambda: ref(x), warmup=1, iters=args.iters), 0.0))
        _progress("timing fastres")
        rows.append((f"fastres ({fastres.get_backend()})", _time(lambda: model(x), warmup=1, iters=args.iters), convert_s))
    if args.compile:
        _progress("compiling with torch.compile (this takes a while)")
        t0 = time.perf_counter()
        compiled = torch.compile(ref)
        with torch.inference_mode():
            compiled(x)
        compile_s = time.perf_counter() - t0
        with torch.inference_mode():
            rows.append(("torch.compile", _time(lambda: compiled(x), warmup=0, iters=args.iters), compile_s))
    eager_s = rows[0][1]
    print(f"\nfastres demo: {args.model}, batch {args.batch}, {args.size}x{args.size}, fp32, {device}, "
          f"{torch.get_num_threads()} threads")
    print(f"numerics vs eager: max abs error {err:.3g}, max rel error {rel:.3g} "
          f"({'ok' if rel < 1e-4 else 'MISMATCH'})")
    print(f"{'provider':<24}{'ms/batch':>10}{'img/s':>10}{'vs eager':>10}{'setup s':>10}")
    for name, secs, setup in rows:
        print(f"{name:<24}{secs * 1e3:>10.1f}{args.batch / secs:>10.1f}{eager_s / secs:>9.2f}x{setup:>10.2f}")
    return 0 if rel < 1e-4 else 1


def explain_cmd(args: argparse.Namespace) -> int:
    import fastres
    model = fastres.convert(_torchvision(args.model).eval())
    print(fastres.explain(model))
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="fastres", description="fused kernels for the ResNet family")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="convert a torchvision model, check numerics, time it")
    d.add_argument("--model", default="resnet50", choices=MODELS)
    d.add_argument("--batch", type=int, default=8)
    d.add_argument("--size", type=int, default=224)
    d.add_argument("--iters", type=int, default=5)
    d.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    d.add_argument("--no-compile", dest="compile", action="store_false", help="skip torch.compile")
    d.set_defaults(fn=demo)
    e = sub.add_parser("explain", help="what runs where in a converted model, and why")
    e.add_argument("model", choices=MODELS)
    e.set_defaults(fn=explain_cmd)
    args = p.parse_args(argv)
    if getattr(args, "device", "cpu").startswith("cuda") and not torch.cuda.is_available():
        p.error("CUDA was asked for but no CUDA device is available")
    if getattr(args, "batch", 1) < 1 or getattr(args, "iters", 1) < 1:
        p.error("--batch and --iters must be at least 1")
    return args.fn(args)
