"""`fastres analyze lesion`: Veit, Wilber & Belongie 2016, "Residual Networks Behave Like Ensembles
of Relatively Shallow Networks", at CPU scale.

A CIFAR ResNet (v1, option-A shortcuts, default depth 56 = 27 blocks; or `--arch preact`, unit e)
is trained; then each residual branch in turn is deleted at test time, the shortcut kept (for a
downsampling block: the strided zero-padded identity, or unit e's projection), and the test
accuracy is measured. A net of n blocks unrolls into 2^n paths whose lengths (the number of
branches a path goes through) are Binomial(n, 1/2).

Gradient per path length (Veit et al. Sec. 5): the forward pass is the whole trained network
(eval-mode BN); in the backward pass, for a random set of k blocks the gradient goes through the
residual branch only and for the other n-k through the shortcut only (the ReLU mask after the sum
is kept). The norm of the gradient of the summed cross-entropy at the first block's input,
averaged over images and sampled sets, is the magnitude of one path of length k; times C(n, k) it
is that length's share of the total gradient.

Published (ResNet-110, 54 blocks, CIFAR-10): deleting any single non-downsampling block leaves the
test error nearly unchanged, deleting a downsampling block costs more, while deleting any layer of
a VGG-style plain net drops it to chance; most of the gradient comes from paths 5-17 blocks long.
"""
from __future__ import annotations

import argparse
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as TF
from torch import Tensor

from fastres.analyze import common as C
from fastres.models.cifar import cifar_preact_resnet, cifar_resnet
from fastres.nn.norm_act import shortcut
from fastres.nn.preact import _PreActBlock

PAPER = {"source": "Veit et al. 2016, ResNet-110 (54 blocks) on CIFAR-10",
         "single_deletion": "nearly unchanged test error except downsampling blocks",
         "plain_net_deletion": "chance level (VGG)", "effective_path_lengths": [5, 17]}


def build(arch: str, depth: int) -> nn.Module:
    if arch == "preact":
        return cifar_preact_resnet(depth, bottleneck=False, variant="e")
    return cifar_resnet(depth)


def _bn(x: Tensor, bn: nn.BatchNorm2d) -> Tensor:
    return TF.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


def _conv(x: Tensor, c: nn.Conv2d) -> Tensor:
    return TF.conv2d(x, c.weight, c.bias, c.stride, c.padding, c.dilation, c.groups)


def _parts(b: nn.Module, h: Tensor) -> tuple[Tensor, Tensor, bool]:
    """(residual branch, shortcut, ReLU after the sum) of a block in eval mode, in plain torch ops."""
    if isinstance(b, _PreActBlock):  # unit e
        a = torch.relu(_bn(h, b.norm1))
        br = _conv(torch.relu(_bn(_conv(a, b.conv1), b.norm2)), b.conv2)
        sc = h if b.downsample is None else _conv(a, b.downsample.conv)
        return br, sc, False
    br = _bn(_conv(torch.relu(_bn(_conv(h, b.conv1), b.bn1)), b.conv2), b.bn2)
    return br, shortcut(b.downsample, h), True


def path_grad(model: nn.Module, x: Tensor, y: Tensor, through: list[bool]) -> Tensor:
    """Gradient of the summed cross-entropy at the first block's input when block i's backward
    goes through its residual branch only (`through[i]`) or its shortcut only; the forward pass is
    the whole network. Summed over all 2^n choices it is the network's own gradient."""
    model.eval()
    with torch.no_grad():
        h0 = model.conv1(x)
        if model.bn1 is not None:
            h0 = model.bn1(h0)
    h0.requires_grad_(True)
    h = h0
    blocks = [b for _, b in C.residual_blocks(model)]
    for b, t in zip(blocks, through):
        br, sc, relu = _parts(b, h)
        s = br + sc
        val = torch.relu(s) if relu else s
        part = br if t else sc
        grad_part = part - part.detach()
        h = val.detach() + ((s > 0).to(s.dtype) * grad_part if relu else grad_part)
    logits = model.fc(model.norm(h).mean((2, 3)))
    (g,) = torch.autograd.grad(TF.cross_entropy(logits, y, reduction="sum"), h0)
    return g


def path_gradient(model: nn.Module, x: Tensor, y: Tensor, through: list[bool]) -> float:
    """Mean per-image gradient norm at the first block's input for the path set `through`."""
    return float(path_grad(model, x, y, through).flatten(1).norm(dim=1).mean())


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lesion", help="delete single residual branches at test time; path lengths "
                       "(Veit et al. 2016)", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common(p)
    C.add_training(p, steps=500)
    p.add_argument("--arch", choices=("resnet", "preact"), default="resnet",
                   help="v1 ResNet with option-A shortcuts (default) or pre-activation unit e")
    p.add_argument("--depth", type=int, default=56, help="6n+2 (default 56: 27 blocks)")
    p.add_argument("--path-samples", type=int, default=6,
                   help="random block sets per path length for the gradient measurement (0: skip)")
    p.set_defaults(fn=C.command(run))


def run(args: argparse.Namespace) -> int:
    if args.quick:
        args.depth, args.steps, args.size, args.path_samples = 8, 8, 8, 2
    C.seed_all(args.seed)
    data = C.data_from_args(args)
    C.seed_all(args.seed)
    model = build(args.arch, args.depth)
    blocks = C.residual_blocks(model)
    n = len(blocks)
    C.progress(f"training {args.arch}-{args.depth} ({n} blocks) on {data.describe()} for {args.steps} steps")
    hist = C.train(model, data, steps=args.steps, batch=args.batch, lr=args.lr, wd=args.wd, seed=args.seed)
    base_loss, base_err = C.evaluate(model, data.xte, data.yte)
    base_acc = 100.0 - base_err
    rows, lesions = [], []
    for idx, (name, blk) in enumerate(blocks):
        s, j = (int(v) for v in name.split(".")[1:])
        model.stages[s][j] = C.BranchDeleted(blk)
        _, err = C.evaluate(model, data.xte, data.yte)
        model.stages[s][j] = blk
        ds = C.is_downsampling(blk)
        lesions.append({"block": idx, "name": name, "downsampling": ds, "test_acc": 100.0 - err,
                        "drop": base_acc - (100.0 - err)})
        rows.append([idx, name + (" *" if ds else ""), 100.0 - err, base_acc - (100.0 - err)])
    counts = [math.comb(n, k) for k in range(n + 1)]
    paths = {"k": list(range(n + 1)), "count": counts, "share": [c / 2 ** n for c in counts]}
    if args.path_samples > 0:
        g = torch.Generator().manual_seed(args.seed + 7)
        sel = torch.randperm(len(data.xte), generator=g)[:64]
        x, y = data.xte[sel], data.yte[sel]
        mags = []
        for k in range(n + 1):
            vals = []
            for _ in range(args.path_samples if 0 < k < n else 1):
                chosen = set(torch.randperm(n, generator=g)[:k].tolist())
                vals.append(path_gradient(model, x, y, [i in chosen for i in range(n)]))
            mags.append(float(np.mean(vals)))
        total = np.array(counts, float) * np.array(mags)
        paths["grad_per_path"] = mags
        paths["grad_share"] = (total / total.sum()).tolist()
        order = np.argsort(-total)
        cum, keep = 0.0, []
        for k in order:
            keep.append(int(k)); cum += total[k] / total.sum()
            if cum >= 0.9:
                break
        paths["effective_90"] = [min(keep), max(keep)]

    print(f"\nlesion study (Veit et al. 2016): {args.arch}-{args.depth}, {n} residual blocks, {data.describe()}, "
          f"{args.steps} steps, seed {args.seed}")
    print(f"baseline test accuracy {base_acc:.2f}% (loss {base_loss:.3f}); * = downsampling block "
          f"(shortcut = strided {'zero-padded identity' if args.arch == 'resnet' else 'projection'})\n")
    print(C.table(["#", "deleted block", "test acc %", "drop (pts)"], rows))
    drops = np.array([r["drop"] for r in lesions])
    dsm = np.array([r["downsampling"] for r in lesions])
    summary = {"baseline_acc": base_acc, "mean_drop_plain_blocks": float(drops[~dsm].mean()) if (~dsm).any() else None,
               "max_drop_plain_blocks": float(drops[~dsm].max()) if (~dsm).any() else None,
               "mean_drop_downsampling": float(drops[dsm].mean()) if dsm.any() else None}
    print(f"\nmean drop: non-downsampling blocks {summary['mean_drop_plain_blocks']:.2f} pts "
          f"(max {summary['max_drop_plain_blocks']:.2f}), downsampling blocks {summary['mean_drop_downsampling']:.2f} pts")
    print("published (ResNet-110, CIFAR-10): single deletions barely matter except at downsampling blocks; "
          "a plain (VGG) net falls to chance\n")
    prow = [[k, counts[k], 100 * paths["share"][k]] + ([paths["grad_per_path"][k], 100 * paths["grad_share"][k]]
                                                       if "grad_per_path" in paths else []) for k in range(n + 1)]
    heads = ["path length k", "paths C(n,k)", "share %"] + (["|grad| one path", "grad share %"] if "grad_per_path" in paths else [])
    print(C.table(heads, prow))
    if "effective_90" in paths:
        lo, hi = paths["effective_90"]
        print(f"\n90% of the gradient comes from paths of length {lo}-{hi} of {n} (path count peaks at {n // 2}); "
              f"published: 5-17 of 54 for ResNet-110")
    payload = {"command": "lesion", "config": C.config(args, data=data.describe(), blocks=n),
               "baseline": {"test_acc": base_acc, "test_loss": base_loss,
                            "final_train_loss": C.tail_mean(hist["train_loss"])},
               "lesions": lesions, "summary": summary, "paths": paths, "paper": PAPER}
    C.finish(args, payload, plot)
    return 0


def plot(plt, payload: dict):
    les, paths = payload["lesions"], payload["paths"]
    fig, ax = plt.subplots(1, 2, figsize=(12, 4.5))
    acc = [r["test_acc"] for r in les]
    colors = ["tab:red" if r["downsampling"] else "tab:blue" for r in les]
    ax[0].bar(range(len(acc)), acc, color=colors)
    ax[0].axhline(payload["baseline"]["test_acc"], color="k", lw=0.8, label="no deletion")
    ax[0].set_xlabel("deleted block (red: downsampling)"); ax[0].set_ylabel("test accuracy %")
    ax[0].set_ylim(0, 100); ax[0].legend(fontsize=8)
    ax[0].set_title("one residual branch deleted at test time")
    k = np.asarray(paths["k"])
    ax[1].bar(k, paths["share"], alpha=0.5, label="paths (binomial)")
    if "grad_share" in paths:
        ax[1].plot(k, paths["grad_share"], "o-", color="tab:red", label="gradient share")
        ax2 = ax[1].twinx()
        ax2.semilogy(k, paths["grad_per_path"], "s:", color="tab:green", ms=3, label="|grad| of one path")
        ax2.set_ylabel("|grad| one path", color="tab:green")
    ax[1].set_xlabel("path length k"); ax[1].set_ylabel("share")
    ax[1].legend(fontsize=8, loc="upper left")
    ax[1].set_title("path-length distribution and gradient per length")
    return fig
