"""The synthetic attention suite: attention-output error and density of every method on structured q/k/v.

For each geometry, structured inputs come from :mod:`vidsparse.eval.synthetic`; the dense output is the reference;
each method config plans and runs through the same executor, and the suite records density, relative L2 error,
cosine similarity and planning time. This is the quality yardstick of methods on raw tensors (cheap, CPU-only).

    vidsparse eval attention --json out.json          # every registered method x density
    python -m vidsparse.eval.attention_suite --methods radial:density=0.25 window:window=1 --json out.json
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from vidsparse.config import SparseConfig
from vidsparse.kernels.dispatch import block_sparse_attention
from vidsparse.layout import VideoLayout
from vidsparse.methods import PlanContext, build_plan
from vidsparse.plan import BlockPlan

from .specs import canonical_spec
from .synthetic import DEFAULT_HEAD_MIX, output_error, synthetic_qkv

#: Default geometries (latent tokens): a short 480p-like clip and a small one.
DEFAULT_GEOMETRIES: tuple[tuple[int, int, int], ...] = ((9, 30, 52),)


@dataclass(frozen=True)
class SuiteInputs:
    """One geometry's inputs and dense output (computed once, shared by every method)."""

    layout: VideoLayout
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    dense_out: torch.Tensor


def make_inputs(
    layout: VideoLayout,
    *,
    heads: int = 4,
    head_dim: int = 64,
    seed: int = 0,
    head_types: tuple[str, ...] = DEFAULT_HEAD_MIX,
    backend: str = "auto",
) -> SuiteInputs:
    """Structured q/k/v for ``layout`` and their dense attention output."""
    q, k, v = synthetic_qkv(layout, heads=heads, head_dim=head_dim, seed=seed, head_types=head_types)
    dense = BlockPlan.full(layout.seq_len, 64)
    dense_out = block_sparse_attention(q, k, v, dense, backend=backend)
    return SuiteInputs(layout, q, k, v, dense_out)


def evaluate(
    config: SparseConfig, inputs: SuiteInputs, *, backend: str = "auto", ctx: PlanContext | None = None
) -> dict[str, Any]:
    """Plan with ``config`` on ``inputs`` and measure the output error against dense.

    Returns:
        A row: method, config, tokens, density, rel_l2, cosine, plan_ms.
    """
    start = time.perf_counter()
    plan = build_plan(config, inputs.q, inputs.k, inputs.layout, ctx or PlanContext(layer=0, step=0))
    density = plan.density()  # synchronises: the plan is complete
    plan_ms = (time.perf_counter() - start) * 1000
    out = block_sparse_attention(inputs.q, inputs.k, inputs.v, plan, backend=backend)
    return {
        "method": config.method,
        "spec": canonical_spec(config),
        "config": config.to_dict(),
        "geometry": list(inputs.layout.grid),
        "tokens": inputs.layout.seq_len,
        "density": density,
        "plan_ms": plan_ms,
        **output_error(out, inputs.dense_out),
    }


def run_suite(
    configs: Sequence[SparseConfig],
    geometries: Sequence[tuple[int, int, int]] = DEFAULT_GEOMETRIES,
    *,
    heads: int = 4,
    head_dim: int = 64,
    seed: int = 0,
    backend: str = "auto",
) -> list[dict[str, Any]]:
    """Evaluate every config on every geometry; returns one row per (geometry, config)."""
    rows = []
    for grid in geometries:
        inputs = make_inputs(VideoLayout(*grid), heads=heads, head_dim=head_dim, seed=seed, backend=backend)
        rows.extend(evaluate(cfg, inputs, backend=backend) for cfg in configs)
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A markdown table of suite rows: one line per (geometry, method configuration)."""
    lines = [
        "| geometry | method | target density | measured density | rel. L2 error | cosine | plan ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        grid = "x".join(map(str, r["geometry"]))
        target = r["config"].get("density")
        target_text = "–" if target is None else f"{target:g}"
        lines.append(
            f"| {grid} | {r['spec']} | {target_text} | {r['density']:.3f} | {r['rel_l2']:.4f} | {r['cosine']:.4f} | "
            f"{r['plan_ms']:.1f} |"
        )
    return "\n".join(lines)


#: Densities of the default suite (methods without a density target run once).
DEFAULT_DENSITIES: tuple[float, ...] = (0.125, 0.25, 0.5)


def parse_geometry(text: str) -> tuple[int, int, int]:
    """``"9x30x52"`` -> ``(9, 30, 52)`` (latent frames x height x width in tokens); ValueError naming the value."""
    parts = text.lower().split("x")
    try:
        grid = tuple(int(x) for x in parts)
    except ValueError:
        grid = ()
    if len(grid) != 3 or min(grid) < 1:
        raise ValueError(f"--geometry {text!r} is invalid: expected TxHxW latent tokens, e.g. 9x30x52.")
    return grid


def add_suite_args(parser: argparse.ArgumentParser) -> None:
    """The suite's command-line options (``vidsparse eval attention`` and ``python -m ...attention_suite``)."""
    parser.add_argument(
        "--methods",
        nargs="+",
        default=None,
        metavar="SPEC",
        help="method specs, e.g. radial:density=0.25 (default: every registered method)",
    )
    parser.add_argument(
        "--densities",
        nargs="+",
        type=float,
        default=list(DEFAULT_DENSITIES),
        help="densities for methods with a density target (default: %(default)s)",
    )
    parser.add_argument(
        "--geometry", nargs="+", default=["x".join(map(str, g)) for g in DEFAULT_GEOMETRIES], help="latent grids TxHxW"
    )
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--json", help="write the rows to this JSON file")


def run_from_args(args: argparse.Namespace) -> int:
    """Run the suite for parsed arguments: print the table, write ``--json``; returns the exit status."""
    from vidsparse.methods import method_names

    from .results import write_json_atomic
    from .specs import expand_methods

    runs = expand_methods(args.methods or method_names(), args.densities)
    geometries = [parse_geometry(g) for g in args.geometry]
    rows = run_suite(
        [r.config for r in runs],
        geometries,
        heads=args.heads,
        head_dim=args.head_dim,
        seed=args.seed,
        backend=args.backend,
    )
    notes_by_spec = {r.spec: r.note for r in runs}
    for row in rows:
        row["note"] = notes_by_spec.get(row["spec"])
    print(format_table(rows))
    notes = sorted({r.note for r in runs if r.note})
    for note in notes:
        print(f"note: {note}")
    if args.json:
        write_json_atomic(
            args.json,
            {
                "schema": "vidsparse.eval.attention_suite",
                "schema_version": 1,
                "geometries": [list(g) for g in geometries],
                "heads": args.heads,
                "head_dim": args.head_dim,
                "seed": args.seed,
                "backend": args.backend,
                "notes": notes,
                "rows": rows,
            },
        )
        print(f"wrote {args.json}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry: ``python -m vidsparse.eval.attention_suite [--methods ...] [--json PATH]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_suite_args(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
