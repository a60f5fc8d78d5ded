"""Shared pieces of `fastres analyze`: seeding, data, the training loop, block surgery (shortcut
removed, residual branch deleted), tables, JSON and plots.

Data never comes from the network: `--data DIR` reads CIFAR-10 python batches already on disk
(data_batch_1..5, test_batch); without it, scikit-learn's bundled 8x8 digits (1797 images, part of
the package) are upsampled to `--size` pixels and repeated over three channels.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import random
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as TF
from torch import Tensor

from fastres.nn.norm_act import shortcut
from fastres.nn.preact import PreActProjection, _PreActBlock
from fastres.nn.resnet import BasicBlock, Bottleneck

MATPLOTLIB_PIN = "matplotlib==3.11.2"
SKLEARN_PIN = "scikit-learn==1.9.1"


class AnalyzeError(Exception):
    """A user-facing failure, printed as one line by the command wrapper."""


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def progress(msg: str) -> None:
    print(f"  .. {msg}", file=sys.stderr, flush=True)


# ---- data --------------------------------------------------------------------------------------
@dataclass
class Data:
    name: str
    xtr: Tensor
    ytr: Tensor
    xte: Tensor
    yte: Tensor
    num_classes: int = 10
    flip: bool = False  # horizontal flips are label-preserving (CIFAR, not digits)

    def describe(self) -> str:
        return (f"{self.name}: {len(self.xtr)} train / {len(self.xte)} test images, "
                f"{self.xtr.shape[1]}x{self.xtr.shape[2]}x{self.xtr.shape[3]}")


def _resize(x: Tensor, size: int) -> Tensor:
    if x.shape[-1] == size:
        return x
    if size < x.shape[-1]:
        return TF.interpolate(x, size=(size, size), mode="area")
    return TF.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def _normalise(xtr: Tensor, xte: Tensor) -> tuple[Tensor, Tensor]:
    mean = xtr.mean((0, 2, 3), keepdim=True)
    std = xtr.std((0, 2, 3), keepdim=True).clamp_min(1e-6)
    return (xtr - mean) / std, (xte - mean) / std


def _cifar_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    if not os.path.isfile(path):
        raise AnalyzeError(f"--data: {path} not found (expected the CIFAR-10 python batches "
                           "data_batch_1..5 and test_batch)")
    with open(path, "rb") as f:
        d = pickle.load(f, encoding="bytes")
    x = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    return x, np.asarray(d[b"labels"], dtype=np.int64)


def load_data(path: Optional[str], *, size: int, n_train: Optional[int] = None,
              n_test: Optional[int] = None, seed: int = 0) -> Data:
    """CIFAR-10 from `path` (a folder of python batches) or the bundled digits; `size` pixels;
    the first `n_train` / `n_test` images of a fixed seeded shuffle (None: all)."""
    g = torch.Generator().manual_seed(seed)
    if path:
        parts = [_cifar_batch(os.path.join(path, f"data_batch_{i}")) for i in range(1, 6)]
        xtr = torch.from_numpy(np.concatenate([p[0] for p in parts])).float() / 255
        ytr = torch.from_numpy(np.concatenate([p[1] for p in parts]))
        xte_np, yte_np = _cifar_batch(os.path.join(path, "test_batch"))
        xte, yte = torch.from_numpy(xte_np).float() / 255, torch.from_numpy(yte_np)
        name, flip = "CIFAR-10", True
    else:
        try:
            from sklearn.datasets import load_digits
        except ImportError:
            raise AnalyzeError(f"the digits data needs scikit-learn, which is not installed: "
                               f"pip install {SKLEARN_PIN} (or pass --data DIR with CIFAR-10 batches)") from None
        d = load_digits()
        x = torch.from_numpy(d.images).float().unsqueeze(1) / 16.0
        y = torch.from_numpy(d.target).long()
        perm = torch.randperm(len(x), generator=g)
        x, y = x[perm], y[perm]
        xtr, ytr, xte, yte = x[500:].repeat(1, 3, 1, 1), y[500:], x[:500].repeat(1, 3, 1, 1), y[:500]
        name, flip = f"digits (scikit-learn, 8x8 upsampled to {size}x{size} RGB)", False
    if n_train is not None and n_train < len(xtr):
        idx = torch.randperm(len(xtr), generator=g)[:n_train]
        xtr, ytr = xtr[idx], ytr[idx]
    if n_test is not None and n_test < len(xte):
        idx = torch.randperm(len(xte), generator=g)[:n_test]
        xte, yte = xte[idx], yte[idx]
    xtr, xte = _normalise(_resize(xtr, size), _resize(xte, size))
    return Data(name, xtr.contiguous(), ytr, xte.contiguous(), yte, 10, flip)


# ---- training ----------------------------------------------------------------------------------
def _augment(x: Tensor, g: torch.Generator, flip: bool) -> Tensor:
    """Random translation by up to size/8 pixels (zero padding), and flips where they are allowed."""
    n, _, h, w = x.shape
    p = max(1, h // 8)
    xp = TF.pad(x, (p, p, p, p))
    dy = torch.randint(0, 2 * p + 1, (n,), generator=g)
    dx = torch.randint(0, 2 * p + 1, (n,), generator=g)
    rows = (dy[:, None] + torch.arange(h)[None])[:, None, :, None].expand(n, x.shape[1], h, w + 2 * p)
    xp = xp.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w)[None])[:, None, None, :].expand(n, x.shape[1], h, w)
    out = xp.gather(3, cols)
    if flip:
        m = torch.rand(n, generator=g) < 0.5
        out[m] = out[m].flip(-1)
    return out


def lr_at(step: int, steps: int, lr: float) -> float:
    """Linear warm-up over the first 5% of the steps (from lr/10), then cosine decay to 0."""
    warm = max(1, steps // 20)
    if step < warm:
        return lr * (0.1 + 0.9 * step / warm)
    return 0.5 * lr * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


def train(model: nn.Module, data: Data, *, steps: int, batch: int, lr: float = 0.1,
          wd: float = 1e-4, seed: int = 0, augment: bool = True,
          eval_every: Optional[int] = None, on_eval: Optional[Callable[[int], dict]] = None) -> dict:
    """SGD (momentum 0.9, weight decay `wd`, warm-up + cosine) on cross-entropy for `steps`
    mini-batches of `batch` images drawn by a seeded shuffle. Returns the per-step training loss
    and error (train-mode BN, augmented batch) and `on_eval(step)` results every `eval_every`."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=wd)
    n = len(data.xtr)
    batch = min(batch, n)
    perm, pos = torch.randperm(n, generator=g), 0
    losses, errs, evals = [], [], []
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        if pos + batch > n:
            perm, pos = torch.randperm(n, generator=g), 0
        idx = perm[pos:pos + batch]
        pos += batch
        x, y = data.xtr[idx], data.ytr[idx]
        if augment:
            x = _augment(x, g, data.flip)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr)
        out = model(x)
        loss = TF.cross_entropy(out, y)
        if not torch.isfinite(loss):
            raise AnalyzeError(f"training diverged at step {step} (loss {loss.item()}); lower --lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        errs.append(100.0 * (out.argmax(1) != y).float().mean().item())
        if eval_every and on_eval is not None and ((step + 1) % eval_every == 0 or step + 1 == steps):
            evals.append({"step": step + 1, **on_eval(step + 1)})
            model.train()
    return {"train_loss": losses, "train_err_batch": errs, "evals": evals,
            "seconds": time.perf_counter() - t0}


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch: int = 500) -> tuple[float, float]:
    """(mean cross-entropy, error %) in eval mode."""
    model.eval()
    loss, wrong = 0.0, 0
    for i in range(0, len(x), batch):
        out = model(x[i:i + batch])
        loss += TF.cross_entropy(out, y[i:i + batch], reduction="sum").item()
        wrong += (out.argmax(1) != y[i:i + batch]).sum().item()
    return loss / len(x), 100.0 * wrong / len(x)


def tail_mean(xs: Sequence[float], frac: float = 0.1) -> float:
    k = max(1, int(len(xs) * frac))
    return float(np.mean(xs[-k:]))


def mean_std(xs: Sequence[float]) -> tuple[float, float]:
    a = np.asarray(xs, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


# ---- block surgery -----------------------------------------------------------------------------
def _block_shape(block: nn.Module) -> tuple[int, int, int]:
    convs = [m for n, m in block.named_children() if n.startswith("conv") and isinstance(m, nn.Conv2d)]
    stride = max(c.stride[0] for c in convs)
    return convs[0].in_channels, convs[-1].out_channels, stride


class ZeroShortcut(nn.Module):
    """A shortcut that contributes nothing: zeros of the block's output shape."""

    def __init__(self, out_chs: int, stride: int) -> None:
        super().__init__()
        self.out_chs, self.stride = out_chs, stride

    def forward(self, x: Tensor) -> Tensor:
        n, _, h, w = x.shape
        s = self.stride
        return x.new_zeros(n, self.out_chs, (h + s - 1) // s, (w + s - 1) // s)

    def extra_repr(self) -> str:
        return f"out_chs={self.out_chs}, stride={self.stride}"


def remove_shortcut(block: nn.Module) -> nn.Module:
    """Turn a fastres residual block into its plain counterpart, in place: the same layers, the
    shortcut replaced by zeros (v1 blocks and units a-d: a zero "downsample"; unit e: a frozen
    all-zero 1x1 projection of the pre-activated input, its only shortcut hook)."""
    cin, cout, stride = _block_shape(block)
    if isinstance(block, _PreActBlock) and block.variant == "e":
        proj = PreActProjection(cin, cout, stride=stride)
        nn.init.zeros_(proj.conv.weight)
        proj.conv.weight.requires_grad_(False)
        block.downsample = proj
    elif isinstance(block, (BasicBlock, Bottleneck, _PreActBlock)):
        block.downsample = ZeroShortcut(cout, stride)
    else:
        raise AnalyzeError(f"remove_shortcut: unsupported block {type(block).__name__}")
    return block


class BranchDeleted(nn.Module):
    """A residual block with its residual branch deleted at test time: only the shortcut is left
    (v1: relu(shortcut(x)), which is shortcut(x) for the non-negative input of a v1 block; unit e:
    x, or the projection of the pre-activated input)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        if isinstance(block, _PreActBlock) and block.variant != "e":
            raise AnalyzeError("branch deletion supports v1 blocks and pre-activation unit e")
        self.block = block

    def forward(self, x: Tensor) -> Tensor:
        b = self.block
        if isinstance(b, _PreActBlock):
            if b.downsample is None:
                return x
            return b.downsample.conv(torch.relu(b.norm1(x)))
        return torch.relu(shortcut(b.downsample, x))


def residual_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, block) of every residual block of a CifarResNet, in order."""
    return [(f"stages.{i}.{j}", blk) for i, stage in enumerate(model.stages) for j, blk in enumerate(stage)]


def is_downsampling(block: nn.Module) -> bool:
    cin, cout, stride = _block_shape(block)
    return stride != 1 or cin != cout


# ---- output ------------------------------------------------------------------------------------
def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    rows = [[_cell(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.rjust(w) if _numeric(c) else c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(out)


def _cell(c: Any) -> str:
    if isinstance(c, float):
        if math.isnan(c):
            return "-"
        return f"{c:.4g}" if abs(c) < 1e-2 and c != 0 else f"{c:.3f}" if abs(c) < 10 else f"{c:.2f}"
    return str(c)


def _numeric(c: str) -> bool:
    try:
        float(c.split()[0].rstrip("%"))
        return True
    except (ValueError, IndexError):
        return False


def _clean(o: Any) -> Any:
    """JSON-safe: NaN/inf -> None, numpy and tensors -> Python numbers."""
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if isinstance(o, (np.generic,)):
        o = o.item()
    if isinstance(o, Tensor):
        return _clean(o.tolist())
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return o


def write_json(path: str, payload: dict) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    with open(path, "w") as f:
        json.dump(_clean(payload), f, indent=1, allow_nan=False)
        f.write("\n")


def pyplot():
    """matplotlib.pyplot on the Agg backend, or a one-line error if matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        raise AnalyzeError(f"--plot needs matplotlib, which is not installed: pip install {MATPLOTLIB_PIN}") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def save_fig(fig, path: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    import matplotlib.pyplot as plt
    plt.close(fig)


# ---- command plumbing --------------------------------------------------------------------------
def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0, help="base seed (default 0)")
    p.add_argument("--quick", action="store_true", help="a seconds-long run at a tiny size (for tests)")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON to PATH")
    p.add_argument("--plot", metavar="PATH", help="write a PNG plot to PATH (needs matplotlib)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads for this run (default 1: these nets are small, and with 2 "
                        "threads a step stalls up to 40x whenever the other core is busy; 0: torch's setting)")


def add_training(p: argparse.ArgumentParser, *, steps: int, batch: int = 64, lr: float = 0.1,
                 size: int = 16) -> None:
    p.add_argument("--data", metavar="DIR", help="folder of CIFAR-10 python batches (default: the "
                   "bundled scikit-learn digits, upsampled); nothing is ever downloaded")
    p.add_argument("--size", type=int, default=size, help=f"image side in pixels (default {size})")
    p.add_argument("--n-train", type=int, default=None, help="train images used (default: digits all "
                   "1297, CIFAR 10000)")
    p.add_argument("--n-test", type=int, default=None, help="test images used (default: digits 500, CIFAR 2000)")
    p.add_argument("--steps", type=int, default=steps, help=f"SGD steps per run (default {steps})")
    p.add_argument("--batch", type=int, default=batch, help=f"mini-batch size (default {batch})")
    p.add_argument("--lr", type=float, default=lr, help=f"peak learning rate (default {lr})")
    p.add_argument("--wd", type=float, default=1e-4, help="weight decay (default 1e-4)")


def data_from_args(args: argparse.Namespace, *, quick_train: int = 256, quick_test: int = 128) -> Data:
    n_train, n_test = args.n_train, args.n_test
    if args.data:
        n_train, n_test = n_train or 10000, n_test or 2000
    if args.quick:
        n_train, n_test = min(n_train or quick_train, quick_train), min(n_test or quick_test, quick_test)
    return load_data(args.data, size=args.size, n_train=n_train, n_test=n_test, seed=args.seed)


def finish(args: argparse.Namespace, payload: dict, plot: Callable[[Any, dict], Any]) -> None:
    """Write the JSON and the plot where asked; plot errors surface before anything is written."""
    plt = pyplot() if args.plot else None
    if args.json:
        write_json(args.json, payload)
        print(f"wrote {args.json}")
    if args.plot:
        fig = plot(plt, payload)
        save_fig(fig, args.plot)
        print(f"wrote {args.plot}")


def command(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Run an analysis; AnalyzeError becomes one line on stderr and exit status 2."""
    def run(args: argparse.Namespace) -> int:
        if args.plot:
            try:
                pyplot()  # fail before minutes of work, not after
            except AnalyzeError as e:
                print(f"fastres analyze {args.analysis}: error: {e}", file=sys.stderr)
                return 2
        threads = torch.get_num_threads()
        try:
            if args.threads < 0:
                raise AnalyzeError("--threads must be 0 (torch's setting) or more")
            if args.threads > 0:
                torch.set_num_threads(args.threads)
            return fn(args)
        except AnalyzeError as e:
            print(f"fastres analyze {args.analysis}: error: {e}", file=sys.stderr)
            return 2
        finally:
            torch.set_num_threads(threads)
    run.__name__ = run.__qualname__ = fn.__name__
    run.__doc__ = fn.__doc__
    return run


def config(args: argparse.Namespace, **extra: Any) -> dict:
    cfg = {k: v for k, v in vars(args).items() if k not in ("fn", "cmd", "json", "plot")}
    cfg.update(extra)
    cfg["torch"] = torch.__version__
    cfg["threads"] = torch.get_num_threads()
    return cfg
