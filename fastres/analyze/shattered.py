"""`fastres analyze shattered`: the shattered-gradients measurement of Balduzzi et al. 2017, "The
Shattered Gradients Problem: If resnets are the answer, then what is the question?".

Inputs are `--points` images on a line between two random Gaussian images a and b. Each network
is a 3x3 conv stem (width `--width`), L/2 basic blocks of two 3x3 convs at that width and stride
1, global average pooling and a linear map to one scalar, at initialisation (Kaiming fan-out
convs, BN weight 1). For each point the gradient of the scalar with respect to the input image is
taken, and three statistics are read off the 256 gradients:

- `pairs`: the mean correlation (cosine) between the input gradients of two distinct points, over
  all pairs: the quantity of the paper's theorems (the covariance of gradients at inputs i != j,
  normalised by the variance); the decay laws are fitted on it;
- `nbr`: the mean cosine between neighbouring points' gradients (1 for a smooth function, ~0 when
  the gradient is shattered into noise);
- `r1` (JSON only): the lag-1 autocorrelation of the directional derivative along the line (the
  paper's 1-D picture: the gradient of a function of a scalar input).

Families (the same fastres blocks each time): `plain` (v1 BasicBlock, shortcut removed, i.e. the
conv-BN-ReLU plain net), `resnet` (v1 BasicBlock), `preact` (unit e), `plain-preact` (unit e,
shortcut removed). BN: `--bn eval` (default) uses running statistics freshly estimated from the
points themselves (one train-mode pass with a cumulative average), so each point's gradient is its
own; `--bn train` keeps train-mode batch statistics as in the paper, so every gradient also carries
the coupling through the batch statistics, which removes the batch-mean part of the gradients and
lowers every correlation markedly (compare the two modes before comparing with the paper's numbers). L counts weight layers in the stack (2 per block).

Published: feedforward nets' gradient correlation decays like 2^-L; ResNets with BN like 1/sqrt(L).
Both laws are fitted to every family: c(L) = A 2^(-beta L) and c(L) = A L^(-gamma).
"""
from __future__ import annotations

import argparse
import math

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from fastres.analyze import common as C
from fastres.nn.norm_act import BatchNormAct2d
from fastres.nn.preact import PreActBasicBlock
from fastres.nn.resnet import BasicBlock

FAMILIES = ("plain", "resnet", "preact", "plain-preact")
PAPER = {"plain": "2^-L (feedforward, Theorem 1)", "resnet": "1/sqrt(L) (resnet with BN, Theorem 3)",
         "preact": "1/sqrt(L) (resnet with BN)", "plain-preact": "2^-L (feedforward)"}


class LineNet(nn.Module):
    """stem conv [BN-ReLU] -> `blocks` basic blocks (width `width`, stride 1) -> [BN-ReLU] -> mean -> 1."""

    def __init__(self, family: str, blocks: int, width: int) -> None:
        super().__init__()
        preact = family.endswith("preact")
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.Identity() if preact else BatchNormAct2d(width, act="relu")
        layers = []
        for _ in range(blocks):
            b = PreActBasicBlock(width, width, 1, variant="e") if preact else BasicBlock(width, width)
            layers.append(C.remove_shortcut(b) if family.startswith("plain") else b)
        self.blocks = nn.Sequential(*layers)
        self.head = BatchNormAct2d(width, act="relu") if preact else nn.Identity()
        self.fc = nn.Linear(width, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and m.weight.requires_grad:
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.head(self.blocks(self.bn1(self.conv1(x))))
        return self.fc(x.mean((2, 3))).squeeze(1)


@torch.no_grad()
def _fresh_stats(model: nn.Module, x: Tensor) -> None:
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: after one batch, exactly its statistics
    model.train()
    model(x)
    for m, mom in zip(bns, saved):
        m.momentum = mom
    model.eval()


def input_gradients(model: nn.Module, x: Tensor, bn: str, chunk: int = 64) -> Tensor:
    """d model(x_i) / d x_i for every point, (P, C, H, W)."""
    if bn == "train":
        model.train()
        xg = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(model(xg).sum(), xg)
        return g
    _fresh_stats(model, x)
    grads = []
    for i in range(0, len(x), chunk):
        xg = x[i:i + chunk].clone().requires_grad_(True)
        (g,) = torch.autograd.grad(model(xg).sum(), xg)
        grads.append(g)
    return torch.cat(grads)


def neighbour_stats(g: Tensor, direction: Tensor) -> dict:
    flat = g.flatten(1).double()
    unit = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-300)
    gram = unit @ unit.T
    p = len(gram)
    pairs = (gram.sum() - gram.diagonal().sum()) / (p * (p - 1))
    cos = gram.diagonal(1)
    d = flat @ (direction.flatten().double() / direction.norm().double())
    r1 = float(np.corrcoef(d[:-1].numpy(), d[1:].numpy())[0, 1]) if d.std() > 0 else float("nan")
    return {"pairs": float(pairs), "cos": float(cos.mean()), "r1": r1, "dirderiv": d.tolist(),
            "grad_norm": float(flat.norm(dim=1).mean())}


def fit_laws(L: np.ndarray, c: np.ndarray, floor: float) -> dict:
    """Least squares in log space over the points above `floor`: c = A 2^(-beta L) and c = A L^-gamma."""
    keep = np.isfinite(c) & (c > floor)
    L, c = L[keep], c[keep]
    out = {"points": int(keep.sum())}
    if len(L) < 2:
        return out | {"exp": None, "pow": None}
    s, i = np.polyfit(L, np.log2(c), 1)
    res_e = np.log10(c) - np.log10(2.0 ** (i + s * L))
    s2, i2 = np.polyfit(np.log(L), np.log(c), 1)
    res_p = np.log10(c) - np.log10(np.exp(i2) * L ** s2)
    out["exp"] = {"A": float(2.0 ** i), "beta": float(-s), "rmse_log10": float(np.sqrt(np.mean(res_e ** 2)))}
    out["pow"] = {"A": float(np.exp(i2)), "gamma": float(-s2), "rmse_log10": float(np.sqrt(np.mean(res_p ** 2)))}
    return out


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("shattered", help="input-gradient correlation between points vs depth at initialisation "
                       "(Balduzzi et al. 2017)", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common(p)
    p.add_argument("--blocks", type=int, nargs="+", default=[1, 2, 3, 4, 6, 8, 12, 16, 24, 32],
                   help="stack depths in blocks (L = 2 x blocks weight layers)")
    p.add_argument("--points", type=int, default=256, help="points on the line (default 256)")
    p.add_argument("--size", type=int, default=16, help="input image side (default 16)")
    p.add_argument("--width", type=int, default=16, help="channels (default 16, CIFAR stage 1)")
    p.add_argument("--seeds", type=int, default=3, help="random networks per setting (default 3)")
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    p.add_argument("--bn", choices=("eval", "train"), default="eval",
                   help="eval: running stats freshly estimated from the points (default); train: batch stats")
    p.set_defaults(fn=C.command(run))


def run(args: argparse.Namespace) -> int:
    if args.quick:
        args.blocks, args.points, args.size, args.width, args.seeds = [1, 2, 4], 32, 8, 8, 1
    if args.points < 3 or min(args.blocks) < 1:
        raise C.AnalyzeError("--points must be >= 3 and --blocks >= 1")
    blocks = sorted(set(args.blocks))
    dim = 3 * args.size * args.size
    floor = 1.0 / math.sqrt(dim)
    results: dict = {f: {"L": [2 * b for b in blocks], "pairs": [], "pairs_std": [], "cos": [], "cos_std": [],
                         "r1": [], "r1_std": [], "grad_norm": []} for f in args.families}
    examples: dict = {}
    for family in args.families:
        for b in blocks:
            ps, cs, rs, gn = [], [], [], []
            for s in range(args.seeds):
                C.seed_all(args.seed * 1000 + s)
                a, z = torch.randn(2, 3, args.size, args.size).unbind(0)
                t = torch.linspace(0, 1, args.points).view(-1, 1, 1, 1)
                x = (1 - t) * a + t * z
                C.seed_all(args.seed * 1000 + 100 + s)
                model = LineNet(family, b, args.width)
                st = neighbour_stats(input_gradients(model, x, args.bn), z - a)
                ps.append(st["pairs"]); cs.append(st["cos"]); rs.append(st["r1"]); gn.append(st["grad_norm"])
                if b == blocks[-1] and s == 0:
                    examples[family] = st["dirderiv"]
            r = results[family]
            r["pairs"].append(float(np.mean(ps))); r["pairs_std"].append(float(np.std(ps)))
            r["cos"].append(float(np.mean(cs))); r["cos_std"].append(float(np.std(cs)))
            r["r1"].append(float(np.nanmean(rs))); r["r1_std"].append(float(np.nanstd(rs)))
            r["grad_norm"].append(float(np.mean(gn)))
            C.progress(f"{family:12s} L={2 * b:3d}  pairs={r['pairs'][-1]:.4f}  nbr={r['cos'][-1]:.4f}  "
                       f"r1={r['r1'][-1]:.4f}")
        results[family]["fit"] = fit_laws(np.array(results[family]["L"], float), np.array(results[family]["pairs"]), floor)

    print(f"\nshattered gradients (Balduzzi et al. 2017) at initialisation: {args.points} points on a line "
          f"between two random {args.size}x{args.size}x3 images, width {args.width}, {args.seeds} seed(s), "
          f"BN {'train-mode batch stats' if args.bn == 'train' else 'eval with fresh stats from the points'}")
    print("pairs = mean correlation of the input gradients of two distinct points (all pairs); "
          "nbr = the same for neighbouring points only\n")
    headers = ["L"] + [f"{f} {k}" for f in args.families for k in ("pairs", "nbr")]
    rows = [[2 * b] + [results[f][k][i] for f in args.families for k in ("pairs", "cos")] for i, b in enumerate(blocks)]
    print(C.table(headers, rows))
    print(f"\nfits of pairs(L) over points above 1/sqrt(dim) = {floor:.3f} (rmse in log10):")
    fit_rows = []
    for f in args.families:
        fit = results[f]["fit"]
        e, pw = fit.get("exp"), fit.get("pow")
        if e is None:
            fit_rows.append([f, fit["points"], "-", "-", "-", PAPER[f]])
            continue
        better = "2^-L" if e["rmse_log10"] < pw["rmse_log10"] else "L^-g"
        fit_rows.append([f, fit["points"], f"{e['A']:.3g} * 2^(-{e['beta']:.3f} L)  [{e['rmse_log10']:.3f}]",
                         f"{pw['A']:.3g} * L^(-{pw['gamma']:.3f})  [{pw['rmse_log10']:.3f}]", better, PAPER[f]])
    print(C.table(["family", "pts", "exponential fit", "power fit", "better", "published law"], fit_rows))
    deep = {f: results[f]["pairs"][-1] for f in args.families}
    deep_nbr = {f: results[f]["cos"][-1] for f in args.families}
    print(f"\nat the deepest setting (L={2 * blocks[-1]}), pairs: " + ", ".join(f"{f} {v:.4f}" for f, v in deep.items())
          + "; nbr: " + ", ".join(f"{f} {v:.4f}" for f, v in deep_nbr.items()))
    notes = ["beta=1 per weight layer is the published feedforward rate; gamma=0.5 the published BN-resnet rate.",
             "Points at or below 1/sqrt(dim) (no correlation left to measure) are left out of the fits."]
    payload = {"command": "shattered", "config": C.config(args, blocks=blocks, noise_floor=floor),
               "results": results, "deepest": deep, "deepest_nbr": deep_nbr, "examples_dirderiv": examples,
               "paper": {"source": "Balduzzi et al. 2017", "plain": "2^-L", "resnet_bn": "1/sqrt(L)"},
               "notes": notes}
    C.finish(args, payload, plot)
    return 0


def plot(plt, payload: dict):
    res, ex = payload["results"], payload["examples_dirderiv"]
    fig, ax = plt.subplots(1, 2, figsize=(12, 4.5))
    for f, d in ex.items():
        d = np.asarray(d)
        ax[0].plot(np.linspace(0, 1, len(d)), (d - d.mean()) / (d.std() + 1e-30) + 3 * list(ex).index(f), lw=0.8, label=f)
    ax[0].set_title(f"directional derivative along the line (deepest, L={res[next(iter(res))]['L'][-1]}), offset")
    ax[0].set_xlabel("t"); ax[0].set_yticks([]); ax[0].legend(fontsize=8)
    for f, r in res.items():
        L, c = np.asarray(r["L"], float), np.asarray(r["pairs"])
        pos = c > 0  # a mean correlation at or below zero has no place on a log axis
        line, = ax[1].semilogy(L[pos], c[pos], "o", label=f)
        fit = r["fit"]
        Lf = np.linspace(L.min(), L.max(), 100)
        if fit.get("exp"):
            ax[1].semilogy(Lf, fit["exp"]["A"] * 2.0 ** (-fit["exp"]["beta"] * Lf), "--", color=line.get_color(), lw=0.8)
            ax[1].semilogy(Lf, fit["pow"]["A"] * Lf ** (-fit["pow"]["gamma"]), ":", color=line.get_color(), lw=0.8)
    ax[1].axhline(payload["config"]["noise_floor"], color="grey", lw=0.5)
    ax[1].set_xlabel("L (weight layers)"); ax[1].set_ylabel("mean gradient correlation, all pairs")
    ax[1].set_title("gradient correlation vs depth (-- 2^-bL fit, : L^-g fit; grey: 1/sqrt(dim))")
    ax[1].legend(fontsize=8)
    return fig
