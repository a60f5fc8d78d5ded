"""`fastres analyze degradation`: the degradation problem of He et al. 2015, "Deep Residual
Learning for Image Recognition" (Fig. 1 and 6), at CPU scale.

Plain and residual CIFAR nets of two depths (default 20 and 56) built from the same fastres v1
BasicBlocks (`fastres.models.cifar_resnet`, option-A shortcuts); the plain nets are the same
networks with every shortcut removed (conv-BN-ReLU stacks, exactly the paper's plain nets). All
four are trained with the same seed, data order and step count; the training error over the whole
training set (eval-mode BN) is recorded every `--eval-every` steps.

Published (CIFAR-10): plain-56 has higher training error than plain-20 throughout training (the
degradation problem, not overfitting), while ResNet-56 trains to lower error than ResNet-20; test
error ResNet-20 8.75 %, ResNet-56 6.97 % (ResNet-32 7.51, -44 7.17, -110 6.43).
"""
from __future__ import annotations

import argparse

import numpy as np

from fastres.analyze import common as C
from fastres.models.cifar import cifar_resnet

PAPER_RESNET_TEST = {20: 8.75, 32: 7.51, 44: 7.17, 56: 6.97, 110: 6.43}


def build(kind: str, depth: int):
    model = cifar_resnet(depth)
    if kind == "plain":
        for _, blk in C.residual_blocks(model):
            C.remove_shortcut(blk)
    return model


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("degradation", help="plain vs residual, shallow vs deep: training error at equal "
                       "steps (He et al. 2015)", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common(p)
    C.add_training(p, steps=500)
    p.add_argument("--depths", type=int, nargs=2, default=[20, 56], metavar=("SHALLOW", "DEEP"),
                   help="the two depths, 6n+2 (default 20 56)")
    p.add_argument("--seeds", type=int, default=1, help="runs per net (default 1)")
    p.add_argument("--eval-every", type=int, default=50, help="steps between training-error evaluations")
    p.set_defaults(fn=C.command(run))


def run(args: argparse.Namespace) -> int:
    if args.quick:
        args.depths, args.steps, args.size, args.seeds, args.eval_every = [8, 14], 6, 8, 1, 3
    if args.seeds < 1 or args.eval_every < 1:
        raise C.AnalyzeError("--seeds and --eval-every must be at least 1")
    data = C.data_from_args(args)
    nets = [(k, d) for k in ("plain", "resnet") for d in args.depths]
    results: dict = {}
    for kind, depth in nets:
        name = f"{kind}-{depth}"
        per_seed = []
        for s in range(args.seeds):
            seed = args.seed + s
            C.seed_all(seed)
            model = build(kind, depth)

            def on_eval(step, model=model):
                loss, err = C.evaluate(model, data.xtr, data.ytr)
                return {"train_loss": loss, "train_err": err}

            hist = C.train(model, data, steps=args.steps, batch=args.batch, lr=args.lr, wd=args.wd, seed=seed,
                           eval_every=args.eval_every, on_eval=on_eval)
            te_loss, te_err = C.evaluate(model, data.xte, data.yte)
            per_seed.append({"seed": seed, "evals": hist["evals"], "test_err": te_err, "test_loss": te_loss,
                             "batch_loss": hist["train_loss"], "seconds": hist["seconds"]})
            C.progress(f"{name} seed {seed}: train error {hist['evals'][-1]['train_err']:.2f}%, "
                       f"test error {te_err:.2f}% ({hist['seconds']:.1f} s)")
        steps = [e["step"] for e in per_seed[0]["evals"]]
        err = np.array([[e["train_err"] for e in r["evals"]] for r in per_seed]).mean(0)
        loss = np.array([[e["train_loss"] for e in r["evals"]] for r in per_seed]).mean(0)
        results[name] = {"kind": kind, "depth": depth, "steps": steps, "train_err": err.tolist(),
                         "train_loss": loss.tolist(), "test_err": float(np.mean([r["test_err"] for r in per_seed])),
                         "runs": per_seed}
    steps = results[f"plain-{args.depths[0]}"]["steps"]
    picks = sorted({steps[max(0, round(len(steps) * f) - 1)] for f in (0.25, 0.5, 0.75, 1.0)})
    rows = []
    for name, r in results.items():
        row = [name] + [r["train_err"][r["steps"].index(p)] for p in picks] + [r["train_loss"][-1], r["test_err"]]
        paper = PAPER_RESNET_TEST.get(r["depth"]) if r["kind"] == "resnet" else None
        rows.append(row + [f"{paper:.2f}" if paper else "-"])
    print(f"\ndegradation (He et al. 2015): {data.describe()}, {args.steps} steps at batch {args.batch}, "
          f"{args.seeds} seed(s); training error on the whole training set (eval-mode BN)\n")
    print(C.table(["net"] + [f"train err % @{p}" for p in picks] + ["final train loss", "test err %",
                                                                     "paper test %"], rows))
    sh, dp = args.depths
    pl = results[f"plain-{dp}"]["train_err"][-1] - results[f"plain-{sh}"]["train_err"][-1]
    rs = results[f"resnet-{dp}"]["train_err"][-1] - results[f"resnet-{sh}"]["train_err"][-1]
    auc = {n: float(np.mean(r["train_err"])) for n, r in results.items()}
    print(f"\nfinal training error, deep minus shallow: plain {pl:+.2f} pts, resnet {rs:+.2f} pts "
          f"(published: plain > 0, resnet < 0)")
    print("mean training error over all evaluations: " + ", ".join(f"{n} {v:.2f}%" for n, v in auc.items()))
    payload = {"command": "degradation", "config": C.config(args, data=data.describe()), "results": results,
               "deep_minus_shallow_final_train_err": {"plain": pl, "resnet": rs}, "mean_train_err": auc,
               "paper": {"source": "He et al. 2015, CIFAR-10", "plain": "deeper plain net has higher training error",
                         "resnet_test_err": PAPER_RESNET_TEST}}
    C.finish(args, payload, plot)
    return 0


def plot(plt, payload: dict):
    fig, ax = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, kind in enumerate(("plain", "resnet")):
        for name, r in payload["results"].items():
            if r["kind"] == kind:
                ax[i].plot(r["steps"], r["train_err"], "o-", ms=3, label=f"{name} (test {r['test_err']:.1f}%)")
        ax[i].set_xlabel("step"); ax[i].set_ylabel("training error %")
        ax[i].set_yscale("symlog", linthresh=1.0)  # log above 1 %, linear down to 0
        ax[i].set_title(f"{kind} nets"); ax[i].legend(fontsize=8)
    return fig
