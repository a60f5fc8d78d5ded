"""`fastres analyze dag`: learnable connectivity. The same small CIFAR-scale net is trained with
each connectivity of its DAG blocks (fastres.nn.DAGBlock) on the same seeded data and batches:

    residual  every edge weight 1: layer j sees h_0 + ... + h_{j-1}, a plain ResNet unrolled
    dense     layer j sees the average of all j earlier outputs (DenseNet's pattern, summed)
    learned   the edge weights are parameters, initialised to the residual pattern

Net: conv3x3-BN-ReLU stem (`--width` channels), one DAGBlock of `--layers` layers per stage,
between stages a stride-2 conv3x3-BN-ReLU doubling the width, global average pool, linear.
The table gives the final training loss (mean of the last 10% of steps) and the test accuracy;
the plot shows the loss curves and, as heat maps, the adjacency each learned block ended with
(row i, column j: the weight of h_i in the input of node j; the last column is the block output).
"""
from __future__ import annotations

import argparse

import torch
import torch.nn as nn
from torch import Tensor

from fastres.analyze import common as C
from fastres.nn.dag import CONNECTIVITY, DAGBlock
from fastres.nn.norm_act import conv_bn


class ConvBNReLU(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: Tensor) -> Tensor:
        return conv_bn(x, self.conv, self.bn, act="relu")


class DAGNet(nn.Module):
    """stem, [DAGBlock, downsampling conv] x stages (no conv after the last block), pool, fc."""

    def __init__(self, connectivity: str, *, width: int = 16, layers: int = 3, stages: int = 2,
                 num_classes: int = 10) -> None:
        super().__init__()
        mods: list[nn.Module] = [ConvBNReLU(3, width)]
        for s in range(stages):
            w = width * 2 ** s
            mods.append(DAGBlock(w, layers, connectivity))
            if s + 1 < stages:
                mods.append(ConvBNReLU(w, 2 * w, stride=2))
        self.features = nn.Sequential(*mods)
        self.fc = nn.Linear(width * 2 ** (stages - 1), num_classes)

    def blocks(self) -> list[DAGBlock]:
        return [m for m in self.features if isinstance(m, DAGBlock)]

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x).mean((2, 3)))


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dag", help="residual vs dense vs learned connectivity of DAG blocks",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common(p)
    C.add_training(p, steps=400)
    p.add_argument("--width", type=int, default=16, help="stem channels, doubled per stage (default 16)")
    p.add_argument("--layers", type=int, default=3, help="layers per DAG block (default 3)")
    p.add_argument("--stages", type=int, default=2, help="DAG blocks, one per resolution (default 2)")
    p.set_defaults(fn=C.command(run))


def run(args: argparse.Namespace) -> int:
    if args.quick:
        args.steps, args.size, args.width, args.layers = 4, 8, 4, 2
    if min(args.width, args.layers, args.stages, args.steps) < 1:
        raise C.AnalyzeError("--width, --layers, --stages and --steps must be at least 1")
    data = C.data_from_args(args)
    results: dict = {}
    for conn in CONNECTIVITY:
        C.seed_all(args.seed)   # the same initial convs, BN and fc for every connectivity
        model = DAGNet(conn, width=args.width, layers=args.layers, stages=args.stages)
        hist = C.train(model, data, steps=args.steps, batch=args.batch, lr=args.lr, wd=args.wd, seed=args.seed)
        te_loss, te_err = C.evaluate(model, data.xte, data.yte)
        results[conn] = {
            "final_train_loss": C.tail_mean(hist["train_loss"]), "test_loss": te_loss,
            "test_acc": 100.0 - te_err, "train_loss": hist["train_loss"], "seconds": hist["seconds"],
            "adjacency": [b.adjacency.detach().float() for b in model.blocks()],
            "params": sum(p.numel() for p in model.parameters()),
        }
        C.progress(f"{conn}: final train loss {results[conn]['final_train_loss']:.3f}, test accuracy "
                   f"{100 - te_err:.2f}% ({hist['seconds']:.1f} s)")
    print(f"\nDAG connectivity: {data.describe()}, {args.stages} block(s) of {args.layers} layers, width "
          f"{args.width}, {args.steps} steps at batch {args.batch}\n")
    rows = [[conn, r["final_train_loss"], r["test_loss"], r["test_acc"], r["params"], r["seconds"]]
            for conn, r in results.items()]
    print(C.table(["connectivity", "final train loss", "test loss", "test acc %", "params", "seconds"], rows))
    print("\nlearned adjacency (row i: output h_i, column j: input of node j; last column: block output)")
    for k, a in enumerate(results["learned"]["adjacency"]):
        print(f"block {k}:")
        for i in range(a.shape[0] - 1):
            print("  " + " ".join(f"{v:6.2f}" if j > i else "     ." for j, v in enumerate(a[i].tolist()) if j > 0))
    payload = {"command": "dag", "config": C.config(args, data=data.describe()), "results": results}
    C.finish(args, payload, plot)
    return 0


def plot(plt, payload: dict):
    res = payload["results"]
    learned = res["learned"]["adjacency"]
    fig, ax = plt.subplots(1, 1 + len(learned), figsize=(5 + 3.6 * len(learned), 4.2), squeeze=False)
    ax = ax[0]
    for conn, r in res.items():
        loss = torch.tensor(r["train_loss"])
        k = max(1, len(loss) // 20)
        smooth = loss.unfold(0, k, 1).mean(1) if len(loss) >= k else loss
        ax[0].plot(range(k, k + len(smooth)), smooth.tolist(), label=f"{conn} (test {r['test_acc']:.1f}%)")
    ax[0].set_xlabel("step"); ax[0].set_ylabel("training loss (moving mean)"); ax[0].legend(fontsize=8)
    ax[0].set_title("training loss per connectivity")
    for k, a in enumerate(learned):
        a = torch.as_tensor(a, dtype=torch.float32)
        n = a.shape[0]
        shown = a[:n - 1, 1:]   # producers h_0..h_L (rows) x consumers 1..L+1 (columns)
        mask = torch.ones_like(shown).triu(0) == 0
        vmax = max(float(shown.abs().max()), 1e-6)
        im = ax[1 + k].imshow(shown.masked_fill(mask, float("nan")).tolist(), cmap="coolwarm", vmin=-vmax, vmax=vmax)
        for i in range(n - 1):
            for j in range(i, n - 1):
                ax[1 + k].text(j, i, f"{float(shown[i, j]):.2f}", ha="center", va="center", fontsize=7)
        ax[1 + k].set_xticks(range(n - 1), [str(j) for j in range(1, n - 1)] + ["out"])
        ax[1 + k].set_yticks(range(n - 1), [f"h{i}" for i in range(n - 1)])
        ax[1 + k].set_xlabel("consumer node"); ax[1 + k].set_ylabel("producer")
        ax[1 + k].set_title(f"learned adjacency, block {k}")
        fig.colorbar(im, ax=ax[1 + k], fraction=0.046)
    return fig
