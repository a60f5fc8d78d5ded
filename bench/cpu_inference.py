"""CPU eval-mode inference: eager (channels_last) vs torch.compile with freezing vs fastres.

    python -m bench.cpu_inference [--models resnet50,...] [--batch 8] [--size 224] [--repeats 7]
        [--threads 2] [--dtype float32] [--providers eager_cl,compile,fastres] [--backend native]

Every provider runs in the same process on the same input, interleaved round by round, so
machine-load drift hits them alike; the table gives the median of `--repeats` timed forwards (after warm-up),
img/s, the ratios vs eager and vs compile, and the setup cost (convert / compile + first forward).
Timings are reported, never asserted.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch


def _time(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def build(name: str) -> torch.nn.Module:
    import torchvision
    return getattr(torchvision.models, name)().eval()


def prepare(provider: str, model: torch.nn.Module, x: torch.Tensor, backend: str):
    """(callable, setup seconds including the first forward)."""
    model = copy.deepcopy(model).to(memory_format=torch.channels_last)
    t0 = time.perf_counter()
    if provider == "compile":
        import torch._inductor.config as cfg
        cfg.freezing = True
        model = torch.compile(model)
    elif provider == "fastres":
        import fastres
        model = fastres.convert(model, backend=backend)
    elif provider == "eager":
        model = model.to(memory_format=torch.contiguous_format)
        x = x.contiguous()

    def fwd():
        with torch.inference_mode():
            return model(x)
    ref = fwd()
    return fwd, time.perf_counter() - t0, ref


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="resnet50")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--providers", default="eager_cl,compile,fastres")
    p.add_argument("--backend", default="native")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    providers = a.providers.split(",")
    print(f"torch {torch.__version__}, {a.threads} threads, batch {a.batch}, {a.size}x{a.size}, {a.dtype}, "
          f"eval, channels_last, median of {a.repeats}")
    for name in a.models.split(","):
        torch.manual_seed(0)
        model = build(name).to(dtype)
        x = torch.randn(a.batch, 3, a.size, a.size, dtype=dtype).to(memory_format=torch.channels_last)
        fwds, setups, outs, times = {}, {}, {}, {}
        for prov in providers:
            fwds[prov], setups[prov], outs[prov] = prepare(prov, model, x, a.backend)
            for _ in range(a.warmup):
                fwds[prov]()
            times[prov] = []
        for _ in range(a.repeats):  # round-robin: load drift hits every provider alike
            for prov in providers:
                times[prov] += _time(fwds[prov], 1)
        rows = {prov: (statistics.median(times[prov]), setups[prov]) for prov in providers}
        base = rows.get("eager_cl", rows.get("eager"))[0]
        comp = rows.get("compile", (None,))[0]
        print(f"\n{name} ({a.batch}, 3, {a.size}, {a.size}) {a.dtype}")
        print(f"{'provider':<10} {'ms':>8} {'img/s':>8} {'vs eager':>9} {'vs compile':>11} "
              f"{'setup+1st fwd s':>16}  max|diff| vs first")
        first = outs[providers[0]].float()
        for prov, (t, setup) in rows.items():
            diff = (outs[prov].float() - first).abs().max().item()
            vc = f"{comp / t:10.2f}x" if comp else f"{'-':>11}"
            print(f"{prov:<10} {t * 1e3:8.1f} {a.batch / t:8.1f} {base / t:8.2f}x {vc} {setup:16.2f}  {diff:.2e}")


if __name__ == "__main__":
    main()
