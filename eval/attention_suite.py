"""The synthetic attention suite: attention-output error and density of every method on structured q/k/v.

For each geometry, structured inputs come from :mod:`vidsparse.eval.synthetic`; the dense output is the reference;
each method config plans and runs through the same executor, and the suite records density, relative L2 error,
cosine similarity and planning time. This is the quality yardstick of methods on raw tensors (cheap, CPU-only).

    python -m vidsparse.eval.attention_suite --methods radial:density=0.25 window:window=1 --json out.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from vidsparse.config import SparseConfig
from vidsparse.kernels import block_sparse_attention
from vidsparse.layout import VideoLayout
from vidsparse.methods import PlanContext, build_plan, parse_method_spec
from vidsparse.plan import BlockPlan

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
    """A markdown table of suite rows."""
    lines = [
        "| method | options | tokens | density | rel. L2 error | cosine | plan ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cfg = {k: v for k, v in r["config"].items() if k not in ("method", "backend")}
        opts = ", ".join(f"{k}={v}" for k, v in cfg.items() if v not in (None, 0) or k == "density")
        lines.append(
            f"| {r['method']} | {opts} | {r['tokens']} | {r['density']:.3f} | {r['rel_l2']:.4f} | "
            f"{r['cosine']:.4f} | {r['plan_ms']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry: ``python -m vidsparse.eval.attention_suite --methods ... [--json PATH]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", required=True, help="method specs, e.g. radial:density=0.25")
    parser.add_argument("--geometry", nargs="+", default=["9x30x52"], help="latent grids TxHxW")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--json", help="write the rows to this JSON file")
    args = parser.parse_args(argv)
    configs = [parse_method_spec(s) for s in args.methods]
    geometries = [tuple(int(x) for x in g.lower().split("x")) for g in args.geometry]
    rows = run_suite(
        configs, geometries, heads=args.heads, head_dim=args.head_dim, seed=args.seed, backend=args.backend
    )
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"rows": rows}, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
