"""`fastres` / `python -m fastres`: demo, explain, validate, gpu-report, analyze."""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Callable, Optional

import torch

# name -> library it is built from (seeded random weights, never downloaded)
MODELS = {
    "resnet18": "torchvision", "resnet50": "torchvision", "resnext50_32x4d": "torchvision",
    "wide_resnet50_2": "torchvision", "densenet121": "torchvision", "resnetv2_50": "timm",
    "res2net50_26w_4s": "timm", "rexnet_100": "timm", "seresnext50_32x4d": "timm",
}


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


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if MODELS[name] == "timm":
        import timm
        return timm.create_model(name, pretrained=False)
    import torchvision
    return getattr(torchvision.models, name)()


def demo(args: argparse.Namespace) -> int:
    import fastres
    torch.manual_seed(0)
    device = torch.device(args.device)
    _progress(f"building torchvision {args.model} (seeded random weights) on {device}")
    ref = build(args.model).eval().to(device).to(memory_format=torch.channels_last)
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
    model = fastres.convert(build(args.model).eval())
    print(fastres.explain(model))
    return 0


def _rel_error(a: torch.Tensor, oracle: torch.Tensor) -> float:
    o = oracle.detach().double()
    return (a.detach().double() - o).abs().max().item() / max(o.abs().max().item(), 1e-30)


def validate_model(name: str, *, batch: int = 8, size: int = 128) -> list[tuple[str, float, float, bool]]:
    """Per replaced block output, model output, input gradient and worst parameter gradient,
    eval then train: (what, fastres error, eager error, pass). Errors are max abs / scale against
    a float64 run of the same weights; a check passes when fastres is within the float32
    tolerance (2e-5, the test suite's table) or within twice eager float32's own error.
    Train-mode parameter gradients of deep BN nets carry float noise of a few percent in any
    fp32 implementation (eager NCHW and channels_last differ as much), so they are judged by
    their median error."""
    import copy

    import fastres
    ref = build(name)
    model, ref64 = fastres.convert(ref), copy.deepcopy(ref).double()
    paths = [p for p, _, _ in fastres.conversion_report(model).replaced if p]
    x = torch.randn(batch, 3, size, size)
    proj = None  # a fixed random projection of the output as the loss (a mean has ~zero gradients under BN)
    rows = []
    for train in (False, True):
        mode = "train" if train else "eval"
        runs = {}
        for tag, m, xi in (("new", model, x), ("ref", ref, x), ("f64", ref64, x.double())):
            m.train(train)
            outs: dict = {}
            hooks = [m.get_submodule(p).register_forward_hook(
                lambda mod, i, o, p=p: outs.__setitem__(p, o.detach())) for p in paths]
            xi = xi.clone().requires_grad_(train)
            y = m(xi)
            for h in hooks:
                h.remove()
            outs["output"] = y.detach()
            if train:
                if proj is None:
                    proj = torch.randn(y.shape, dtype=torch.float64)
                y.backward(proj.to(y.dtype))
                outs["input grad"] = xi.grad
                outs.update({f"grad {n}": p.grad for n, p in m.named_parameters() if p.grad is not None})
            runs[tag] = outs
        checks = [(k, _rel_error(runs["new"][k], runs["f64"][k]), _rel_error(runs["ref"][k], runs["f64"][k]))
                  for k in runs["f64"] if k in runs["new"]]
        grads = [c for c in checks if c[0].startswith("grad ")]
        for what, e_new, e_ref in [c for c in checks if not c[0].startswith("grad ")]:
            rows.append((f"{mode} {what}", e_new, e_ref, e_new <= max(2e-5, 2 * e_ref)))
        if grads:  # judged by the median: the worst of ~100 noisy ratios is an outlier by selection
            med_new = statistics.median(c[1] for c in grads)
            med_ref = statistics.median(c[2] for c in grads)
            rows.append((f"{mode} parameter grads (median of {len(grads)})", med_new, med_ref,
                         med_new <= max(2e-5, 2 * med_ref)))
            worst = max(grads, key=lambda c: c[1])
            rows.append((f"{mode} {worst[0]} (largest, for information)", worst[1], worst[2], True))
    return rows


def validate(args: argparse.Namespace) -> int:
    names = list(MODELS) if args.all else [args.model]
    failed = 0
    for name in names:
        _progress(f"validating {name}")
        rows = validate_model(name, batch=args.batch, size=args.size)
        bad = [r for r in rows if not r[3]]
        failed += bool(bad)
        print(f"{name}: {'PASS' if not bad else 'FAIL'} ({len(rows)} checks)")
        for what, e_new, e_ref, ok in (rows if args.verbose else bad):
            print(f"  {what:<50} fastres {e_new:9.3g}  eager {e_ref:9.3g}  {'ok' if ok else 'FAIL'}")
    return 1 if failed else 0


def gpu_report(args: argparse.Namespace) -> int:
    """Every Triton kernel variant compiled offline for sm_80/sm_90: registers, spills, smem."""
    import json
    import os

    if os.environ.get("TRITON_INTERPRET") == "1":
        print("fastres gpu-report: unset TRITON_INTERPRET (interpreted kernels do not compile)", file=sys.stderr)
        return 2
    from fastres import gpu_report as g
    _progress("compiling every kernel variant for " + ", ".join(f"sm_{a}" for a in args.arch))
    rows = g.report(tuple(args.arch))
    print(g.format_table(rows))
    print()
    print(g.summary(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{**r.__dict__, "problems": r.problems} for r in rows], f, indent=1)
    return 1 if any(r.problems for r in rows) else 0


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="fastres", description="fused kernels for the ResNet family")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="convert a torchvision model, check numerics, time it")
    d.add_argument("--model", default="resnet50", choices=list(MODELS))
    d.add_argument("--batch", type=int, default=8)
    d.add_argument("--size", type=int, default=224)
    d.add_argument("--iters", type=int, default=5)
    d.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    d.add_argument("--no-compile", dest="compile", action="store_false", help="skip torch.compile")
    d.set_defaults(fn=demo)
    e = sub.add_parser("explain", help="what runs where in a converted model, and why")
    e.add_argument("model", choices=list(MODELS))
    e.set_defaults(fn=explain_cmd)
    v = sub.add_parser("validate", help="convert, compare with eager forward and backward, per block")
    g = v.add_mutually_exclusive_group(required=True)
    g.add_argument("--model", choices=list(MODELS))
    g.add_argument("--all", action="store_true")
    # train-mode BN over few values per channel (the last stage) amplifies float noise until no
    # implementation's fp32 gradient is within 5% of float64: keep >= 4x4x8 values there
    v.add_argument("--batch", type=int, default=8)
    v.add_argument("--size", type=int, default=128)
    v.add_argument("--verbose", action="store_true", help="print every check, not only failures")
    v.set_defaults(fn=validate)
    r = sub.add_parser("gpu-report", help="offline sm_80/sm_90 compile report of every Triton kernel")
    r.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=[80, 90])
    r.add_argument("--json", help="also write the rows as JSON to this path")
    r.set_defaults(fn=gpu_report)
    from fastres.analyze import register as register_analyze
    register_analyze(sub)
    args = p.parse_args(argv)
    if getattr(args, "device", "cpu").startswith("cuda") and not torch.cuda.is_available():
        p.error("CUDA was asked for but no CUDA device is available")
    if getattr(args, "batch", 1) < 1 or getattr(args, "iters", 1) < 1:
        p.error("--batch and --iters must be at least 1")
    return args.fn(args)
