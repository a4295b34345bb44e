"""Error-vs-density curve of the ``moba`` method: each selection rule swept over its knob, per partition type.

Runs on the synthetic attention suite's inputs (:mod:`vidsparse.eval.attention_suite`): for every selection rule
(``topk`` and ``head_global`` over ``density``, ``threshold`` over ``tau``) and every partition type (1-D, 2-D, 3-D:
layers 0, 1, 2 of the cycle) it records the plan's density, relative L2 error and cosine against dense attention,
and the overhead of expressing chunks with plan blocks: token pairs in the kept plan blocks over token pairs the
chunk selection itself needs, minus 1 (0 with the default block-aligned chunks), and the error over the oracle's
(:func:`vidsparse.eval.attention_suite.oracle_error`, the best top-mass block selection at the row's density and
token order).

    vidsparse study moba-sweep --geometry 9x30x52 --json moba_sweep.json
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

from vidsparse.layout import VideoLayout
from vidsparse.methods import PlanContext, parse_method_spec
from vidsparse.methods.moba import select_chunks

from .attention_suite import SuiteInputs, evaluate, make_inputs

#: (label, knob name, knob values, extra options) of the default sweep.
DEFAULT_SWEEP: tuple[tuple[str, str, tuple[float, ...], str], ...] = (
    ("topk", "density", (0.1, 0.2, 0.3, 0.5, 0.7), "selection=topk"),
    ("head_global", "density", (0.1, 0.2, 0.3, 0.5, 0.7), "selection=head_global"),
    ("threshold", "tau", (0.1, 0.25, 0.4, 0.6, 0.8), "selection=threshold"),
    ("threshold faithful", "tau", (0.1, 0.25, 0.4), "selection=threshold,faithful=true"),
    ("threshold head pool", "tau", (0.25, 0.4, 0.6), "selection=threshold,threshold_pool=head"),
    ("threshold softmax", "tau", (0.5, 0.8, 0.95), "selection=threshold,normalize=softmax"),
)
PARTITIONS: tuple[str, ...] = ("1d", "2d", "3d")


def sweep_rows(
    inputs: SuiteInputs, sweep=DEFAULT_SWEEP, extra: str = "", *, oracle: bool = True
) -> list[dict[str, Any]]:
    """One row per (rule, knob value, partition): density, rel_l2, cosine, chunk_density, overhead, vs_oracle."""
    rows = []
    for label, knob, values, options in sweep:
        for value in values:
            for partition in PARTITIONS:
                spec = f"moba:{options},{knob}={value},partition={partition}" + (f",{extra}" if extra else "")
                config = parse_method_spec(spec)
                ctx = PlanContext(layer=0, step=0)
                row = evaluate(config, inputs, ctx=ctx, oracle=oracle)
                selection = select_chunks(inputs.q, inputs.k, inputs.layout, config, ctx)
                chunk_density = float(selection.token_density().mean())
                block_density = float(selection.block_token_density().mean())
                rows.append(
                    {
                        "rule": label,
                        "knob": knob,
                        "value": value,
                        "partition": partition,
                        "spec": spec,
                        "chunk_density": chunk_density,
                        "block_token_density": block_density,
                        "overhead": block_density / chunk_density - 1,
                        **{key: row[key] for key in ("density", "rel_l2", "cosine", "plan_ms")},
                        "vs_oracle": row.get("vs_oracle"),
                    }
                )
                print(
                    f"{label:20s} {knob}={value:<5} {partition}: density {row['density']:.3f} "
                    f"rel_l2 {row['rel_l2']:.4f} cos {row['cosine']:.4f} / oracle {row.get('vs_oracle') or 0:.2f}",
                    flush=True,
                )
    return rows


def format_tables(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown: one table with a column group per partition, and the mean over partitions."""
    lines = [
        "| rule | knob | 1-D density / rel. L2 / cos | 2-D density / rel. L2 / cos | 3-D density / rel. L2 / cos "
        "| mean density | mean rel. L2 | mean cos | block overhead | error / oracle 1-D / 2-D / 3-D |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    keys = list(dict.fromkeys((r["rule"], r["knob"], r["value"]) for r in rows))
    for rule, knob, value in keys:
        group = [r for r in rows if (r["rule"], r["knob"], r["value"]) == (rule, knob, value)]
        by_part = {r["partition"]: r for r in group}
        cells = [
            f"{by_part[p]['density']:.3f} / {by_part[p]['rel_l2']:.3f} / {by_part[p]['cosine']:.3f}" for p in PARTITIONS
        ]
        mean = {key: sum(r[key] for r in group) / len(group) for key in ("density", "rel_l2", "cosine")}
        overhead = sum(r["block_token_density"] for r in group) / sum(r["chunk_density"] for r in group) - 1
        ratios = " / ".join(
            "–" if by_part[p].get("vs_oracle") is None else f"{by_part[p]['vs_oracle']:.2f}" for p in PARTITIONS
        )
        lines.append(
            f"| {rule} | {knob}={value} | {' | '.join(cells)} | {mean['density']:.3f} | {mean['rel_l2']:.3f} | "
            f"{mean['cosine']:.3f} | {100 * overhead:+.1f} % | {ratios} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Command-line entry: ``vidsparse study moba-sweep [--geometry 9x30x52] [--json PATH]``."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--geometry", default="9x30x52", help="latent grid TxHxW")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--extra", default="", help="options added to every spec, e.g. frames_1d=1")
    parser.add_argument("--no-oracle", action="store_true", help="leave out the oracle comparison")
    parser.add_argument("--json", help="write the rows to this JSON file")
    args = parser.parse_args(argv)
    grid = tuple(int(x) for x in args.geometry.lower().split("x"))
    inputs = make_inputs(VideoLayout(*grid), heads=args.heads, head_dim=args.head_dim, seed=args.seed)
    rows = sweep_rows(inputs, extra=args.extra, oracle=not args.no_oracle)
    print(format_tables(rows))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"geometry": grid, "extra": args.extra, "rows": rows}, fh, indent=2)
    return 0
