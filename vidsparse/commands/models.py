"""``vidsparse models``: the supported model families, their tiny offline pipelines, the methods, and what runs where.

vidsparse models                       # families, tiny pipelines, methods (text)
vidsparse models --json                # the same, machine-readable
vidsparse models --markdown            # support matrix family x method, measured: one tiny generation per cell
vidsparse models --markdown --tiny mochi --method window --steps 2

The matrix is never typed by hand: every cell is a tiny generation with the method applied (the check the test
suite asserts, :func:`vidsparse.pipelines.support.check_support`), showing the measured density of the sparse
self-attention calls.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from .common import add_backend_arg


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``models`` sub-command."""
    p = sub.add_parser(
        "models",
        help="list supported model families, tiny pipelines and methods; print the measured support matrix",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print the listing as JSON")
    fmt.add_argument(
        "--markdown",
        action="store_true",
        help="run one tiny generation per (family, method) and print the support matrix as a markdown table",
    )
    p.add_argument(
        "--tiny", action="append", default=None, metavar="NAME", help="matrix rows (default: every tiny pipeline)"
    )
    p.add_argument("--method", action="append", default=None, metavar="NAME", help="matrix columns (default: all)")
    p.add_argument("--steps", type=int, default=2, help="denoising steps per matrix generation (default: %(default)s)")
    add_backend_arg(p, default="auto", what="executor for the matrix runs")
    p.add_argument("--results-json", default=None, metavar="PATH", help="also write the matrix results as JSON here")
    p.set_defaults(func=run)


def listing() -> dict[str, Any]:
    """Families (with their tiny pipelines), tiny pipelines and methods, JSON-friendly."""
    from vidsparse.methods import get_method, method_names
    from vidsparse.pipelines.offline.tiny import TINY_PIPELINES
    from vidsparse.pipelines.registry import ADAPTERS

    families = []
    for adapter in ADAPTERS:
        entry = adapter.describe()
        entry["tiny_pipelines"] = [name for name, spec in TINY_PIPELINES.items() if spec.family == adapter.name]
        families.append(entry)
    tiny = [
        {"name": spec.name, "model": f"tiny-{spec.name}", "family": spec.family, "description": spec.description}
        for spec in TINY_PIPELINES.values()
    ]
    methods = []
    for name in method_names():
        spec = get_method(name)
        methods.append(
            {"name": name, "summary": spec.summary, "static": spec.static, "defaults": spec.config_cls().to_dict()}
        )
    return {"families": families, "tiny_pipelines": tiny, "methods": methods}


def _print_text(info: dict[str, Any]) -> None:
    print("Model families (vidsparse.apply(pipe, method) on any pipeline whose transformer is one of these):")
    for f in info["families"]:
        print(f"  {f['family']:<18} {', '.join(f['transformer_classes'])}")
        print(f"  {'':<18} text: {f['text_position']}; sparse modules: {', '.join(f['attention_modules'])}")
        print(f"  {'':<18} tiny: {', '.join('tiny-' + t for t in f['tiny_pipelines']) or '-'}")
    print("\nMethods (vidsparse.apply(pipe, name, **options); --method name:key=value on the command line):")
    for m in info["methods"]:
        print(f"  {m['name']:<10} {m['summary']}")
    print("\nSupport matrix (one tiny generation per family and method): `vidsparse models --markdown`.")


def run(args: argparse.Namespace) -> int:
    """Print the listing, or run and print the support matrix."""
    if not args.markdown:
        if args.tiny or args.method or args.results_json or args.backend != "auto":
            raise ValueError("--tiny, --method, --backend and --results-json only apply with --markdown")
        info = listing()
        if args.json:
            print(json.dumps(info, indent=2))
        else:
            _print_text(info)
        return 0

    from vidsparse.methods import get_method
    from vidsparse.pipelines.offline.tiny import get_spec
    from vidsparse.pipelines.support import matrix_markdown, support_matrix

    for name in args.tiny or []:
        get_spec(name)  # unknown names: one clear error before any work
    for name in args.method or []:
        get_method(name)
    if args.steps < 1:
        raise ValueError(f"--steps {args.steps} is invalid: expected an integer >= 1.")
    results = support_matrix(args.tiny, args.method, steps=args.steps, backend=args.backend)
    print(matrix_markdown(results))
    print(
        f"\nMeasured by `vidsparse models --markdown --steps {args.steps} --backend {args.backend}`: one "
        f"{args.steps}-step tiny generation per "
        "cell (random weights, CPU), method options from vidsparse.pipelines.support.tiny_method_config; the number "
        "is the mean measured density of the sparse self-attention calls."
    )
    if args.results_json:
        with open(args.results_json, "w") as fh:
            json.dump([r.to_dict() for r in results], fh, indent=2)
    return 0 if all(r.ok for r in results) else 1
