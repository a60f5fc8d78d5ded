"""Turn pytest-benchmark JSON files (`pytest bench/ --benchmark-json=PATH`) into a Markdown table
of providers side by side per group, with speedups against eager, and optionally a PNG bar chart
of those speedups (matplotlib).

    python -m bench.report results/bench.json [more.json ...] [--plot speedups.png]
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict


def load(paths: list[str]) -> dict[str, dict[str, float]]:
    """group -> provider -> mean seconds (a later file overrides an earlier one)."""
    groups: dict[str, dict[str, float]] = defaultdict(dict)
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        for b in data["benchmarks"]:
            provider = b.get("extra_info", {}).get("provider") or b["name"]
            groups[b["group"] or b["name"]][provider] = b["stats"]["mean"]
    return dict(groups)


def table(groups: dict[str, dict[str, float]]) -> str:
    providers = sorted({p for g in groups.values() for p in g}, key=lambda p: (p != "eager", p))
    lines = ["| group | " + " | ".join(providers) + " |", "|---" * (len(providers) + 1) + "|"]
    for name, times in sorted(groups.items()):
        base = times.get("eager")
        cells = []
        for p in providers:
            t = times.get(p)
            cells.append("" if t is None else f"{t * 1e3:.2f} ms" + (f" ({base / t:.2f}x)" if base else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(groups: dict[str, dict[str, float]], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [g for g in sorted(groups) if "eager" in groups[g]]
    providers = sorted({p for g in names for p in groups[g]} - {"eager"})
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(names)), 4))
    width = 0.8 / max(len(providers), 1)
    for i, p in enumerate(providers):
        ax.bar([k + i * width for k in range(len(names))],
               [groups[g]["eager"] / groups[g][p] if p in groups[g] else 0 for g in names], width, label=p)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(names))], names, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("speedup vs eager")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.splitlines()[0])
    p.add_argument("json", nargs="+", help="pytest-benchmark JSON files")
    p.add_argument("--plot", help="write a PNG bar chart of speedups vs eager")
    args = p.parse_args(argv)
    try:
        groups = load(args.json)
    except (OSError, KeyError, json.JSONDecodeError) as e:
        print(f"bench.report: cannot read benchmark JSON: {e}", file=sys.stderr)
        return 2
    print(table(groups))
    if args.plot:
        plot(groups, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
