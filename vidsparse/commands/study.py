"""``vidsparse study NAME ...``: the measurements behind the README's method and speed sections.

Each study is a module of :mod:`vidsparse.eval` with a ``main(argv, prog=...)``; this command only dispatches to it,
so every study is reached from the one CLI (``vidsparse study NAME --help`` for its own options).
"""

from __future__ import annotations

import argparse
import importlib

#: Study name -> (module of vidsparse.eval, what it measures). Add a study with one line here.
STUDIES: dict[str, tuple[str, str]] = {
    "regression": ("regression", "sparse-vs-dense PSNR of every method on the shipped model (the quality floors)"),
    "plan-cost": ("plan_cost", "planning time of a method relative to one dense attention call"),
    "moba-sweep": ("moba_sweep", "moba's error-vs-density curve per selection rule and partition, against the oracle"),
    "cached-report": ("cached_report", "cached: pattern reuse under drifting q/k (drift), pattern memory (memory)"),
    "compile-probe": ("compile_probe", "torch.compile graphs, breaks and recompiles per method, regional and whole"),
}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``vidsparse study``."""
    listing = "\n".join(f"  {name:<14} {what}" for name, (_, what) in STUDIES.items())
    p = subparsers.add_parser(
        "study",
        help="the measurements behind the README's method and speed sections (regression, moba-sweep, ...)",
        description=f"Run one study; `vidsparse study NAME --help` lists its options.\n\nstudies:\n{listing}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("study", choices=list(STUDIES), metavar="NAME", help="one of: " + ", ".join(STUDIES))
    p.add_argument("study_args", nargs=argparse.REMAINDER, help="the study's own options")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the named study with its own arguments."""
    module = importlib.import_module(f"vidsparse.eval.{STUDIES[args.study][0]}")
    return int(module.main(args.study_args, prog=f"vidsparse study {args.study}") or 0)
