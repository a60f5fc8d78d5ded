"""Turn benchmark JSON files (`pytest bench/ --benchmark-json=PATH`, or `fastres bench --json PATH`,
which writes the same shape) into a Markdown table of providers side by side per group, with
speedups against eager, and optionally a PNG bar chart of those speedups (matplotlib).
Times are medians (means for entries that carry no median).

    python -m bench.report results/bench.json [more.json ...] [--plot speedups.png] [--readme README.md]

With --readme the table (and a link to the --plot chart) replaces what lies between the lines
`<!-- results:begin -->` and `<!-- results:end -->` of that file, so no number is typed by hand.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict

from fastres.benchmark import markers, replace_between_markers
from fastres.benchmark import plot_speedups as plot  # one chart for both JSON sources
from fastres.benchmark import provider_key

BEGIN, END = markers("results")


def _collect(paths: list[str], value) -> dict[str, dict[str, float]]:
    """group -> provider -> value(entry), for entries where it is not None (later files override)."""
    groups: dict[str, dict[str, float]] = defaultdict(dict)
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        for b in data["benchmarks"]:
            v = value(b)
            if v is not None:
                groups[b["group"] or b["name"]][b.get("extra_info", {}).get("provider") or b["name"]] = v
    return dict(groups)


def load(paths: list[str]) -> dict[str, dict[str, float]]:
    """group -> provider -> median seconds (means for entries that carry no median)."""
    return _collect(paths, lambda b: b["stats"].get("median", b["stats"]["mean"]))


def load_setup(paths: list[str]) -> dict[str, dict[str, float]]:
    """group -> provider -> setup seconds (convert / compile plus the first call), where recorded."""
    return _collect(paths, lambda b: b.get("extra_info", {}).get("setup_s"))


def setup_table(groups: dict[str, dict[str, float]]) -> str:
    """Setup seconds per group and provider (empty when no entry recorded any)."""
    if not groups:
        return ""
    providers = sorted({p for g in groups.values() for p in g}, key=provider_key)
    lines = ["| setup s (convert / compile + first call) | " + " | ".join(providers) + " |",
             "|---" * (len(providers) + 1) + "|"]
    for name, secs in sorted(groups.items()):
        lines.append(f"| {name} | " + " | ".join("" if secs.get(p) is None else f"{secs[p]:.2f}" for p in providers)
                     + " |")
    return "\n".join(lines)


def table(groups: dict[str, dict[str, float]]) -> str:
    providers = sorted({p for g in groups.values() for p in g}, key=provider_key)
    lines = ["| group | " + " | ".join(providers) + " |", "|---" * (len(providers) + 1) + "|"]
    for name, times in sorted(groups.items()):
        base = times.get("eager")
        cells = []
        for p in providers:
            t = times.get(p)
            cells.append("" if t is None else f"{t * 1e3:.2f} ms" + (f" ({base / t:.2f}x)" if base else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def update_readme(path: str, block: str, marker: str = "results") -> None:
    """Replace the lines between the `marker` markers of `path` with `block`."""
    replace_between_markers(path, marker, block)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.splitlines()[0])
    p.add_argument("json", nargs="+", help="JSON from pytest bench --benchmark-json or fastres bench --json")
    p.add_argument("--plot", help="write a PNG bar chart of speedups vs eager")
    p.add_argument("--readme", help=f"also write the table (and chart link) between {BEGIN} and {END} in this file")
    p.add_argument("--marker", default="results", help="with --readme: the markers' name (default results)")
    args = p.parse_args(argv)
    try:
        groups, setups = load(args.json), load_setup(args.json)
    except (OSError, KeyError, json.JSONDecodeError) as e:
        print(f"bench.report: cannot read benchmark JSON: {e}", file=sys.stderr)
        return 2
    text = table(groups) + ("\n\n" + setup_table(setups) if setups else "")
    print(text)
    if args.plot:
        try:
            plot(groups, args.plot)
        except (ImportError, OSError) as e:
            print(f"bench.report: {e}", file=sys.stderr)
            return 2
    if args.readme:
        chart = ""
        if args.plot:
            chart = f"\n\n![speedups vs eager]({os.path.relpath(args.plot, os.path.dirname(os.path.abspath(args.readme)))})"
        try:
            update_readme(args.readme, text + chart, args.marker)
        except (OSError, ValueError) as e:
            print(f"bench.report: cannot update {args.readme}: {e}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
