"""`fastres` / `python -m fastres`: demo, explain, validate, gpu-report, analyze, bench."""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Callable, Optional

import torch

from fastres.benchmark import MODELS, build  # the named models (seeded random weights, never downloaded)


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


def bench(args: argparse.Namespace) -> int:
    """Time every provider on each model (fastres.benchmark), print a table, optionally write
    pytest-benchmark-shaped JSON (`python -m bench.report` reads it) and a speedup chart."""
    import json
    import os

    from fastres import benchmark as B
    if args.keep_heap:
        B.keep_heap()
    provs = args.providers or B.providers(args.device)
    steps = B.steps_per_model(len(provs), warmup=args.warmup, iters=args.iters)
    progress = B.Progress(len(args.model) * steps)
    results = []
    for name in args.model:
        results += B.bench_model(name, provs, batch=args.batch, size=args.size, dtype=B.DTYPES[args.dtype],
                                 device=args.device, mode=args.mode, warmup=args.warmup, iters=args.iters,
                                 progress=progress)
    progress.close()
    what = "inference forward" if args.mode == "infer" else "training step (forward, backward, SGD)"
    print(f"\nfastres bench: {what}, batch {args.batch}, {args.size}x{args.size}, {args.dtype}, {args.device}, "
          f"{torch.get_num_threads()} threads; median of {args.iters} after {args.warmup} warm-up; "
          + ("malloc keeps freed memory (--keep-heap); " if args.keep_heap else "")
          + f"setup = convert / compile + first call; rel diff = max |output - eager| / max |eager|")
    print(B.format_table(results))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(B.to_json(results), f, indent=1)
    if args.plot:
        B.plot_speedups(B.speedup_groups(results), args.plot)
    return 0


def _bench_argument_error(args: argparse.Namespace) -> Optional[str]:
    """Why `fastres bench` cannot run with these arguments (checked before any model is built)."""
    from fastres import benchmark as B
    known = B.providers(args.device)
    unknown = [p for p in args.providers or [] if p not in known]
    if unknown:
        return f"unknown provider(s) {', '.join(unknown)} on {args.device}; available: {', '.join(known)}"
    if args.size < 32:
        return "--size must be at least 32 (the models downsample by 32)"
    if args.warmup < 0:
        return "--warmup must be at least 0"
    if args.plot:
        try:
            B.pyplot()
        except ImportError as e:
            return str(e)
    return None


def _traffic_rows(blocks: Optional[list[str]]) -> Optional[list[dict]]:
    """Run `python -m fastres.traffic` in a child process with TRITON_INTERPRET=1 (read when the
    kernels are decorated, so it cannot be switched on in this one); its table goes to stdout.
    The rows, or None if it failed."""
    import json
    import os
    import subprocess
    import tempfile

    env = {k: v for k, v in os.environ.items() if k != "FASTRES_BACKEND"}
    env["TRITON_INTERPRET"] = "1"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "traffic.json")
        cmd = [sys.executable, "-m", "fastres.traffic", "--json", path] + (["--blocks", *blocks] if blocks else [])
        sys.stdout.flush()
        if subprocess.run(cmd, env=env).returncode != 0:
            return None
        with open(path) as f:
            return json.load(f)


def gpu_report(args: argparse.Namespace) -> int:
    """Every Triton kernel variant compiled offline for sm_80/sm_90: registers, spills, smem; with
    --traffic also the modeled global-memory traffic and H100 roofline of each block family."""
    import json
    import os

    if os.environ.get("TRITON_INTERPRET") == "1":
        print("fastres gpu-report: unset TRITON_INTERPRET (interpreted kernels do not compile)", file=sys.stderr)
        return 2
    rc, rows, traffic = 0, None, None
    if args.compile:
        from fastres import gpu_report as g
        _progress("compiling every kernel variant for " + ", ".join(f"sm_{a}" for a in args.arch))
        rows = g.report(tuple(args.arch))
        print(g.format_table(rows))
        print()
        print(g.summary(rows))
        rc = 1 if any(r.problems for r in rows) else 0
    if args.traffic:
        _progress("counting global-memory traffic in Triton's interpreter (a child process)")
        if rows is not None:
            print()
        traffic = _traffic_rows(args.blocks)
        if traffic is None:
            print("fastres gpu-report: the traffic measurement failed (see above)", file=sys.stderr)
            rc = 1
    if args.json:
        compiled = None if rows is None else [{**r.__dict__, "problems": r.problems} for r in rows]
        with open(args.json, "w") as f:
            json.dump({"compile": compiled, "traffic": traffic} if args.traffic else compiled, f, indent=1)
    return rc


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
    r = sub.add_parser("gpu-report", help="offline sm_80/sm_90 compile report of every Triton kernel, "
                                          "and (--traffic) modeled memory traffic per block")
    r.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=[80, 90])
    r.add_argument("--json", help="also write the rows as JSON to this path (with --traffic: "
                                  "{\"compile\": rows, \"traffic\": rows})")
    r.add_argument("--traffic", action="store_true",
                   help="also count each block family's global-memory bytes, fused Triton vs eager, "
                        "in Triton's interpreter, with an H100 roofline estimate (minutes on CPU)")
    r.add_argument("--blocks", nargs="+", metavar="BLOCK", help="with --traffic: only these blocks "
                   "(names as `python -m fastres.traffic --help` lists them)")
    r.add_argument("--no-compile", dest="compile", action="store_false", help="skip the compile report")
    r.set_defaults(fn=gpu_report)
    from fastres.analyze import register as register_analyze
    register_analyze(sub)
    b = sub.add_parser("bench", help="time eager, channels_last, torch.compile and every fastres backend per model")
    b.add_argument("--model", nargs="+", default=["resnet50"], choices=list(MODELS), metavar="NAME",
                   help=f"one or more of: {', '.join(MODELS)} (default resnet50)")
    b.add_argument("--batch", type=int, default=8)
    b.add_argument("--size", type=int, default=224)
    b.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="model and input dtype")
    b.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    b.add_argument("--mode", default="infer", choices=["infer", "train"],
                   help="eval forward, or a training step: forward, backward, SGD update")
    b.add_argument("--iters", type=int, default=5, help="timed rounds per provider (median reported)")
    b.add_argument("--warmup", type=int, default=1, help="untimed rounds after the setup call")
    b.add_argument("--providers", nargs="+", metavar="PROVIDER",
                   help="a subset of eager, eager_cl, compile, fastres-<backend> (default: all on the device)")
    b.add_argument("--json", metavar="PATH", help="write pytest-benchmark-shaped JSON (python -m bench.report reads it)")
    b.add_argument("--plot", metavar="PATH", help="write a PNG chart of speedups vs eager (needs matplotlib)")
    b.add_argument("--keep-heap", action="store_true",
                   help="glibc: keep freed memory for reuse (no first-touch page faults), for every provider")
    b.set_defaults(fn=bench)
    args = p.parse_args(argv)
    if getattr(args, "device", "cpu").startswith("cuda") and not torch.cuda.is_available():
        p.error("CUDA was asked for but no CUDA device is available")
    if getattr(args, "batch", 1) < 1 or getattr(args, "iters", 1) < 1:
        p.error("--batch and --iters must be at least 1")
    if args.cmd == "bench" and (problem := _bench_argument_error(args)):
        p.error(problem)
    return args.fn(args)
