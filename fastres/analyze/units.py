"""`fastres analyze units`: the identity-mapping ablation of He et al. 2016, "Identity Mappings in
Deep Residual Networks" (Fig. 4, Table 2), at CPU scale.

CIFAR pre-activation ResNets of one depth (`fastres.models.cifar_preact_resnet`, basic blocks) with
each of the five units, trained with the same data, the same step count and the same seeds:

    a  original              conv-BN-ReLU-conv-BN, add, ReLU
    b  BN after addition     conv-BN-ReLU-conv, add, BN, ReLU
    c  ReLU before addition  conv-BN-ReLU-conv-BN-ReLU, add
    d  ReLU-only pre-act     ReLU-conv-BN-ReLU-conv-BN, add
    e  full pre-activation   BN-ReLU-conv-BN-ReLU-conv, add

Reported per unit over the seeds: mean and standard deviation of the final training loss (eval-mode
cross-entropy over the whole training set), of the mini-batch loss averaged over the run (speed of
optimisation) and of the test error, next to the published CIFAR-10
ResNet-110 test errors (6.61 / 8.17 / 7.84 / 6.71 / 6.37 %; ResNet-164: 5.93 / 6.50 / 6.14 / 5.91 /
5.46 %). The published gaps come from 110-layer nets trained for 64k steps at batch 128; a shallow
net trained for a few hundred steps is a much weaker test, and the spread over seeds says how much
of any gap is noise.
"""
from __future__ import annotations

import argparse

import numpy as np

from fastres.analyze import common as C
from fastres.models.cifar import cifar_preact_resnet

UNITS = {"a": "original", "b": "BN after addition", "c": "ReLU before addition",
         "d": "ReLU-only pre-activation", "e": "full pre-activation"}
PAPER_110 = {"a": 6.61, "b": 8.17, "c": 7.84, "d": 6.71, "e": 6.37}
PAPER_164 = {"a": 5.93, "b": 6.50, "c": 6.14, "d": 5.91, "e": 5.46}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("units", help="identity-mapping units a-e at equal depth (He et al. 2016)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common(p)
    C.add_training(p, steps=300)
    p.add_argument("--depth", type=int, default=20, help="6n+2 (default 20)")
    p.add_argument("--seeds", type=int, default=3, help="runs per unit (default 3)")
    p.add_argument("--variants", nargs="+", default=list(UNITS), choices=list(UNITS))
    p.set_defaults(fn=C.command(run))


def run(args: argparse.Namespace) -> int:
    if args.quick:
        args.depth, args.steps, args.size, args.seeds = 8, 6, 8, 2
    if args.seeds < 1:
        raise C.AnalyzeError("--seeds must be at least 1")
    data = C.data_from_args(args)
    runs: dict = {v: [] for v in args.variants}
    for v in args.variants:
        for s in range(args.seeds):
            seed = args.seed + s
            C.seed_all(seed)
            model = cifar_preact_resnet(args.depth, bottleneck=False, variant=v)
            hist = C.train(model, data, steps=args.steps, batch=args.batch, lr=args.lr, wd=args.wd, seed=seed)
            tr_loss, tr_err = C.evaluate(model, data.xtr, data.ytr)
            te_loss, te_err = C.evaluate(model, data.xte, data.yte)
            runs[v].append({"seed": seed, "train_loss": tr_loss, "train_err": tr_err, "test_loss": te_loss,
                            "test_err": te_err, "batch_loss_tail": C.tail_mean(hist["train_loss"]),
                            "curve": hist["train_loss"], "seconds": hist["seconds"]})
            C.progress(f"unit {v} seed {seed}: train loss {tr_loss:.4f}, test error {te_err:.2f}% "
                       f"({hist['seconds']:.1f} s)")
    summary, rows = {}, []
    for v in args.variants:
        tl = C.mean_std([r["train_loss"] for r in runs[v]])
        te = C.mean_std([r["test_err"] for r in runs[v]])
        auc = C.mean_std([float(np.mean(r["curve"])) for r in runs[v]])
        summary[v] = {"train_loss_mean": tl[0], "train_loss_std": tl[1], "run_loss_mean": auc[0],
                      "run_loss_std": auc[1], "test_err_mean": te[0],
                      "test_err_std": te[1], "paper_110": PAPER_110[v], "paper_164": PAPER_164[v]}
        rows.append([f"({v}) {UNITS[v]}", f"{tl[0]:.4f} ± {tl[1]:.4f}", f"{auc[0]:.4f} ± {auc[1]:.4f}",
                     f"{te[0]:.2f} ± {te[1]:.2f}",
                     f"{PAPER_110[v]:.2f}", f"{PAPER_164[v]:.2f}"])
    print(f"\nidentity-mapping units (He et al. 2016): preact-{args.depth} basic blocks, {data.describe()}, "
          f"{args.steps} steps at batch {args.batch}, seeds {args.seed}..{args.seed + args.seeds - 1} "
          f"(mean ± std over seeds)\n")
    print(C.table(["unit", "final train loss", "mean loss over run", "test error %", "paper RN-110 %",
                   "paper RN-164 %"], rows))
    print("(mean loss over run: the mini-batch training loss averaged over all steps, a measure of how fast "
          "the unit optimises. The paper: b's BN after the addition alters the signal on the shortcut path and "
          "hampers optimisation; c's ReLU before the addition makes the branch non-negative)")
    ours = sorted(args.variants, key=lambda v: summary[v]["test_err_mean"])
    paper = sorted(args.variants, key=lambda v: PAPER_110[v])
    best = ours[0]
    close = [v for v in args.variants if v != best and summary[v]["test_err_mean"] - summary[best]["test_err_mean"]
             <= summary[v]["test_err_std"] + summary[best]["test_err_std"]]
    print(f"\ntest-error order here: {' < '.join(ours)}; published (ResNet-110): {' < '.join(paper)}")
    print(f"within one standard deviation (summed) of the best unit ({best}): {', '.join(close) or 'none'}")
    payload = {"command": "units", "config": C.config(args, data=data.describe()), "runs": runs,
               "summary": summary, "order_here": ours, "order_paper_110": paper,
               "within_noise_of_best": close,
               "paper": {"source": "He et al. 2016, CIFAR-10 test error %", "resnet110": PAPER_110,
                         "resnet164": PAPER_164}}
    C.finish(args, payload, plot)
    return 0


def plot(plt, payload: dict):
    summ, runs = payload["summary"], payload["runs"]
    vs = list(summ)
    fig, ax = plt.subplots(1, 2, figsize=(12, 4.5))
    x = np.arange(len(vs))
    ax[0].bar(x - 0.2, [summ[v]["test_err_mean"] for v in vs], 0.4, yerr=[summ[v]["test_err_std"] for v in vs],
              capsize=3, label="here (mean ± std)")
    ax[0].bar(x + 0.2, [summ[v]["paper_110"] for v in vs], 0.4, label="paper ResNet-110 CIFAR-10")
    ax[0].set_xticks(x); ax[0].set_xticklabels([f"({v})" for v in vs])
    ax[0].set_ylabel("test error %"); ax[0].legend(fontsize=8); ax[0].set_title("test error per unit")
    for v in vs:
        curves = np.array([r["curve"] for r in runs[v]])
        k = max(1, curves.shape[1] // 30)
        sm = np.array([np.convolve(c, np.ones(k) / k, mode="valid") for c in curves]).mean(0)
        ax[1].semilogy(np.arange(len(sm)) + k, sm, label=f"({v})")
    ax[1].set_xlabel("step"); ax[1].set_ylabel("training loss (mini-batch, smoothed, mean over seeds)")
    ax[1].legend(fontsize=8); ax[1].set_title("training loss")
    return fig
