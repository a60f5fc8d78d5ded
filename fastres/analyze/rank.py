"""`fastres analyze rank`: the single-layer rank study of ReXNet (Han et al. 2020/2021,
"Rethinking Channel Dimensions for Efficient Model Design"), Sec. 3.

Random layers f(WX): X in R^(d_in x N) with N = `--n-factor` x d_out >> d, entries N(0, 1);
W in R^(d_out x d_in), entries N(0, 1/d_in) (unit-variance pre-activations); f one of identity,
relu, relu6, silu, elu, gelu. For each d_out in `--dout` and d_in/d_out in 0.1 .. 1.0, over
`--draws` random draws: the normalised rank rank(f(WX)) / d_out, the rank being the number of
singular values above `--rtol` x the largest (float64).

What the mathematics says, and what to expect here:
- identity: rank = d_in exactly, so the normalised rank equals the ratio.
- relu is positively homogeneous, relu(w x) = |w| relu(sign(w) x): with d_in = 1 every row is a
  multiple of relu(x) or relu(-x), so the rank is at most 2 whatever d_out. silu, elu and gelu are
  not homogeneous (relu6 only up to its cap) and their rows stay independent. At the smallest ratio
  of d_out = 10 (d_in = 1) relu's normalised rank (<= 0.2) is therefore below silu's.
- For d_in >= 2 the exact rank of any of these non-polynomial f(WX) is generically full
  (min(d_out, N)); only the numerical rank at a tolerance can fall short of it, and how far depends
  on the tolerance and the weight scale. The published picture (nonlinearities expand the rank,
  silu/elu more than relu/relu6, drastic expansion i.e. a small ratio loses rank) is a statement about
  such a numerical rank; check here at which d_in it holds.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as TF

from fastres.analyze import common as C

ACTS = {"identity": lambda x: x, "relu": TF.relu, "relu6": TF.relu6, "silu": TF.silu, "elu": TF.elu,
        "gelu": TF.gelu}
RATIOS = [round(0.1 * i, 1) for i in range(1, 11)]


def normalised_rank(y: torch.Tensor, rtol: float) -> float:
    s = torch.linalg.svdvals(y)
    return float((s > rtol * s[0]).sum()) / y.shape[0] if s[0] > 0 else 0.0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rank", help="normalised rank of a random layer f(WX) vs d_in/d_out (ReXNet)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common(p)
    p.add_argument("--dout", type=int, nargs="+", default=[10, 40, 128], help="output widths (default 10 40 128)")
    p.add_argument("--ratios", type=float, nargs="+", default=RATIOS, help="d_in/d_out (default 0.1 .. 1.0)")
    p.add_argument("--draws", type=int, default=100, help="random draws per setting (default 100)")
    p.add_argument("--n-factor", type=int, default=20, help="N = n_factor x d_out samples (default 20)")
    p.add_argument("--rtol", type=float, default=1e-3, help="relative singular-value tolerance (default 1e-3)")
    p.add_argument("--acts", nargs="+", default=list(ACTS), choices=list(ACTS))
    p.set_defaults(fn=C.command(run))


def run(args: argparse.Namespace) -> int:
    if args.quick:
        args.dout, args.draws, args.n_factor = [10], 5, 10
    if args.draws < 1 or args.n_factor < 2 or min(args.dout) < 1:
        raise C.AnalyzeError("--draws >= 1, --n-factor >= 2 and --dout >= 1 are required")
    ratios = sorted(set(args.ratios))
    results: dict = {}
    for dout in args.dout:
        n = args.n_factor * dout
        res = {"ratios": ratios, "d_in": [], "N": n, **{a: {"mean": [], "std": []} for a in args.acts}}
        for r in ratios:
            din = max(1, round(r * dout))
            res["d_in"].append(din)
            vals = {a: [] for a in args.acts}
            g = torch.Generator().manual_seed(args.seed * 100003 + dout * 1009 + din)
            for _ in range(args.draws):
                w = torch.randn(dout, din, generator=g, dtype=torch.float64) / din ** 0.5
                x = torch.randn(din, n, generator=g, dtype=torch.float64)
                z = w @ x
                for a in args.acts:
                    vals[a].append(normalised_rank(ACTS[a](z), args.rtol))
            for a in args.acts:
                res[a]["mean"].append(float(np.mean(vals[a])))
                res[a]["std"].append(float(np.std(vals[a])))
        results[str(dout)] = res
        C.progress(f"d_out={dout} done")
    print(f"\nReXNet rank study: normalised numerical rank of f(WX) (singular values > {args.rtol:g} x max), "
          f"N = {args.n_factor} d_out, {args.draws} draws, mean over draws\n")
    for dout, res in results.items():
        print(f"d_out = {dout}, N = {res['N']}")
        rows = [[r, res["d_in"][i]] + [res[a]["mean"][i] for a in args.acts] for i, r in enumerate(res["ratios"])]
        print(C.table(["d_in/d_out", "d_in"] + list(args.acts), rows))
        print()
    checks = {}
    for dout, res in results.items():
        if "relu" in res and "silu" in res:
            checks[dout] = {"d_in": res["d_in"][0], "relu": res["relu"]["mean"][0], "silu": res["silu"]["mean"][0]}
            c = checks[dout]
            print(f"smallest ratio at d_out={dout} (d_in={c['d_in']}): relu {c['relu']:.3f} "
                  f"{'<' if c['relu'] < c['silu'] else '>='} silu {c['silu']:.3f}")
    payload = {"command": "rank", "config": C.config(args), "results": results, "smallest_ratio": checks,
               "paper": {"source": "Han et al., ReXNet, Sec. 3 / Fig. 1",
                         "claims": ["nonlinearities expand the rank above the identity's d_in/d_out",
                                    "silu/elu expand it more than relu/relu6",
                                    "small d_in/d_out (drastic expansion) loses rank"]}}
    C.finish(args, payload, plot)
    return 0


def plot(plt, payload: dict):
    res = payload["results"]
    fig, ax = plt.subplots(1, len(res), figsize=(4.5 * len(res), 4.2), squeeze=False)
    for i, (dout, r) in enumerate(res.items()):
        for a in payload["config"]["acts"]:
            ax[0][i].errorbar(r["ratios"], r[a]["mean"], yerr=r[a]["std"], marker="o", ms=3, capsize=2, label=a)
        ax[0][i].set_xlabel("d_in / d_out"); ax[0][i].set_ylabel("rank / d_out")
        ax[0][i].set_title(f"d_out = {dout}, N = {r['N']}"); ax[0][i].set_ylim(0, 1.05)
        ax[0][i].legend(fontsize=7)
    return fig
