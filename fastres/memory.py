"""Activation memory of one training step: the bytes of the tensors autograd saves for backward
(each storage counted once, parameters and buffers excluded), eager vs fastres."""
from __future__ import annotations

import copy
import sys
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn


def saved_activation_bytes(model: nn.Module, x: torch.Tensor,
                           loss_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> int:
    """Bytes autograd holds for backward after one forward of `model` in train mode on `x`."""
    own = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in own and t.device.type != "meta":
            seen[s.data_ptr()] = s.nbytes()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
        loss = loss_fn(out) if loss_fn else out.float().square().mean()
    loss.backward()
    return sum(seen.values())


@dataclass
class MemoryReport:
    name: str
    eager: int
    fastres: int

    @property
    def ratio(self) -> float:
        return self.fastres / max(self.eager, 1)

    def __str__(self) -> str:
        mb = 1 << 20
        return (f"{self.name}: saved for backward, eager {self.eager / mb:.1f} MiB, "
                f"fastres {self.fastres / mb:.1f} MiB ({self.ratio:.2f}x)")


def memory_report(model: nn.Module, x: torch.Tensor, *, name: str = "model") -> MemoryReport:
    """Compare `model` (eager) with `fastres.convert(model)` on one training step; neither the
    model nor its statistics are changed (both run on copies)."""
    import fastres
    eager = copy.deepcopy(model)
    fused = fastres.convert(model)
    return MemoryReport(name, saved_activation_bytes(eager, x), saved_activation_bytes(fused, x))


# ---- the table: python -m fastres.memory -------------------------------------------------------
def _preact_resnet164_eager() -> nn.Module:
    """CIFAR pre-activation ResNet-164 (unit e) built from timm's resnetv2 blocks: plain PyTorch
    modules, the eager twin of `fastres.models.preact_resnet164` (same architecture and
    parameter count), which `fastres.convert` turns into fastres blocks."""
    import functools

    from timm.layers import BatchNormAct2d, create_conv2d
    from timm.models import resnetv2

    from fastres.models.cifar import CifarResNet

    def block(cin: int, cout: int, stride: int) -> nn.Module:
        proj = (functools.partial(resnetv2.DownsampleConv, preact=True)
                if cin != cout or stride != 1 else None)
        return resnetv2.PreActBottleneck(cin, cout, 0.25, stride, conv_layer=functools.partial(create_conv2d, bias=False),
                                         norm_layer=BatchNormAct2d, proj_layer=proj)

    return CifarResNet(block, (64, 128, 256), 18, stem_act=None,
                       head=nn.Sequential(nn.BatchNorm2d(256), nn.ReLU()), num_classes=10)


def _models() -> dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]]:
    import timm
    import torchvision
    return {
        "preact_resnet164": (_preact_resnet164_eager, (8, 3, 32, 32)),
        "densenet121": (torchvision.models.densenet121, (8, 3, 64, 64)),
        "resnet50": (torchvision.models.resnet50, (8, 3, 64, 64)),
        "res2net50_26w_4s": (lambda: timm.create_model("res2net50_26w_4s"), (8, 3, 64, 64)),
    }


def step_seconds(models: dict[str, tuple[nn.Module, torch.Tensor]], *, repeats: int = 5) -> dict[str, float]:
    """Median seconds of one SGD training step (forward, backward, update) of each model on its
    input, after a warm-up step each. The models take turns step by step, so that a slow spell
    of a shared machine falls on all of them alike rather than on whichever ran then."""
    import time
    opts = {k: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for k, (m, _) in models.items()}
    times: dict[str, list[float]] = {k: [] for k in models}
    for m, _ in models.values():
        m.train()
    for _ in range(repeats + 1):
        for k, (m, x) in models.items():
            t0 = time.perf_counter()
            opts[k].zero_grad(set_to_none=True)
            m(x).float().square().mean().backward()
            opts[k].step()
            times[k].append(time.perf_counter() - t0)
    return {k: sorted(t[1:])[repeats // 2] for k, t in times.items()}


def main(argv: Optional[list[str]] = None) -> int:
    """Saved-for-backward bytes and CPU training-step time, eager vs fastres, per model."""
    import argparse

    import fastres
    p = argparse.ArgumentParser(prog="python -m fastres.memory", description=main.__doc__)
    p.add_argument("--models", default=",".join(_models()), help="comma-separated subset")
    p.add_argument("--batch", default="8", help="comma-separated batch sizes, a row each (default 8)")
    p.add_argument("--repeats", type=int, default=5, help="timed training steps per provider (median)")
    p.add_argument("--readme", help="also write the Markdown table between the memory markers of this file")
    args = p.parse_args(argv)
    table = _models()
    names = args.models.split(",")
    unknown = [n for n in names if n not in table]
    if unknown:
        p.error(f"unknown model(s) {unknown}; choose from {list(table)}")
    try:
        batches = [int(b) for b in args.batch.split(",")]
    except ValueError:
        batches = []
    if not batches or min(batches) < 2:
        p.error(f"--batch takes comma-separated batch sizes of at least 2 (BN trains on batch statistics), got {args.batch!r}")
    mb, cl = 1 << 20, torch.channels_last
    head = ("model", "input", "eager MiB", "fastres MiB", "ratio", "eager s/step", "eager_cl s/step",
            "fastres s/step", "step vs faster eager")
    rows = []
    for name, batch in ((n, b) for n in names for b in batches):
        build, shape = table[name]
        shape = (batch, *shape[1:])
        torch.manual_seed(0)
        model = build()
        x = torch.randn(*shape)
        rep = memory_report(model, x, name=name)
        t = step_seconds({"eager": (copy.deepcopy(model), x),
                          "eager_cl": (copy.deepcopy(model).to(memory_format=cl), x.to(memory_format=cl)),
                          "fastres": (fastres.convert(model).to(memory_format=cl), x.to(memory_format=cl))},
                         repeats=args.repeats)
        eager, eager_cl, fused = t["eager"], t["eager_cl"], t["fastres"]
        rows.append((name, "x".join(map(str, shape)), f"{rep.eager / mb:.1f}", f"{rep.fastres / mb:.1f}",
                     f"{rep.ratio:.2f}x", f"{eager:.3f}", f"{eager_cl:.3f}", f"{fused:.3f}",
                     f"{fused / min(eager, eager_cl):.2f}x"))
        print("  ".join(rows[-1]), file=sys.stderr, flush=True)
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    for r in [head] + rows:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
    note = (f"{torch.get_num_threads()} threads, fp32, one SGD step (forward, backward, update), medians of "
            f"{args.repeats}, the three taking turns step by step; fastres runs channels_last. Command: python -m fastres.memory"
            + (f" --batch {args.batch}" if args.batch != "8" else ""))
    print(note)
    if args.readme:
        from fastres.benchmark import replace_between_markers
        md = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]
        replace_between_markers(args.readme, "memory", "\n".join(md) + "\n\n" + note)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
