"""`fastres analyze`: residual-network claims reproduced at CPU scale.

    shattered    input-gradient correlation between points vs depth at init (Balduzzi et al. 2017)
    lesion       delete single residual branches at test time; path lengths (Veit et al. 2016)
    units        identity-mapping units a-e at equal depth (He et al. 2016)
    degradation  plain vs residual nets, shallow vs deep, training error (He et al. 2015)
    rank         output rank of a random layer f(WX) vs d_in/d_out (Han et al., ReXNet)
    dag          residual vs dense vs learned connectivity of DAG blocks, learned adjacency

Each subcommand is seeded, prints a table, and writes `--json PATH` and `--plot PATH` (PNG,
needs matplotlib); `--quick` runs it at a tiny size in seconds.

`register(subparsers)` adds the `analyze` command to an argparse sub-parser collection; each
leaf sets `fn`, which takes the parsed namespace and returns the exit status.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional

from fastres.analyze import dag, degradation, lesion, rank, shattered, units

MODULES = (shattered, lesion, units, degradation, rank, dag)


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `analyze` and its subcommands to `subparsers`; returns the `analyze` parser."""
    p = subparsers.add_parser("analyze", help="residual-network claims reproduced at CPU scale",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="analysis", required=True, metavar="ANALYSIS")
    for m in MODULES:
        m.add_parser(sub)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    """Stand-alone entry, `python -m fastres.analyze shattered --quick`: the same as
    `fastres analyze shattered --quick` once `register` is wired into the CLI."""
    parser = argparse.ArgumentParser(prog="fastres")
    register(parser.add_subparsers(dest="cmd", required=True))
    args = parser.parse_args(["analyze", *(sys.argv[1:] if argv is None else argv)])
    return args.fn(args)
