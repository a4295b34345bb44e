"""Planning cost of a method relative to dense attention, measured in one process (ratios, not absolute times).

Dynamic methods (draft, moba) plan on every attention call, so planning is part of their cost. This measures, on the
same synthetic q/k/v (:mod:`vidsparse.eval.synthetic`):

- ``plan_ms``: median of ``repeats`` calls of the method's planner after ``warmup`` calls (bypassing the static
  plan cache, so a static method is charged for building its plan too);
- ``dense_sdpa_ms``: median dense ``scaled_dot_product_attention``;
- ``dense_executor_ms``: median dense attention through the same executor as the sparse run (``backend``; ``auto`` is
  gather on CPU) with the full plan at the method's block size (compiled once before timing);
- ``sparse_ms``: median attention through ``backend`` with the method's plan;
- ``plan_over_dense_*`` ratios, and ``plan_over_sparse``.

    vidsparse study plan-cost --methods draft draft:faithful=true --geometry 9x30x52 [--threads N] [--json F]

Planning is many small tensor operations, attention a few large ones: on an oversubscribed CPU (more runnable
threads than cores) every multi-threaded small operation waits for descheduled threads, and planning looks far
slower relative to attention than on a quiet machine. ``--threads 1`` removes most of that effect; report the load.

:func:`measure_plan_cost` is the function a ``vidsparse bench`` command can call.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

import torch

from vidsparse.config import SparseConfig
from vidsparse.kernels.dispatch import block_sparse_attention
from vidsparse.layout import VideoLayout
from vidsparse.methods import PlanContext, get_method, parse_method_spec
from vidsparse.plan import BlockPlan

from .bench import time_ms
from .synthetic import synthetic_qkv


def measure_plan_cost(
    configs: Sequence[SparseConfig],
    layout: VideoLayout,
    *,
    heads: int = 4,
    head_dim: int = 64,
    batch: int = 1,
    repeats: int = 5,
    warmup: int = 2,
    backend: str = "auto",
    seed: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> list[dict[str, Any]]:
    """Planning time vs dense and sparse attention time for each config on ``layout``.

    Args:
        configs: Method configs to measure (any registered method).
        layout: Geometry, e.g. ``VideoLayout(9, 30, 52)``.
        heads, head_dim, batch: Shape of the synthetic q/k/v ``[batch, S, heads, head_dim]``.
        repeats, warmup: Timed runs (median reported) and untimed runs before them.
        backend: Executor of the sparse run and of the dense-executor run.
        device, dtype: Where and in what precision everything runs.

    Returns:
        One row per config: method, config, tokens, density, plan_ms, dense_sdpa_ms, dense_executor_ms, sparse_ms,
        plan_over_dense_sdpa, plan_over_dense_executor, plan_over_sparse.
    """
    device = torch.device(device)
    q, k, v = (
        x.to(device) for x in synthetic_qkv(layout, heads=heads, head_dim=head_dim, batch=batch, seed=seed, dtype=dtype)
    )
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))
    dense_sdpa = time_ms(
        lambda: torch.nn.functional.scaled_dot_product_attention(qh, kh, vh),
        device,
        repeats=repeats,
        warmup=1,
    )
    dense_executor: dict[int, float] = {}
    rows = []
    with torch.no_grad():
        for config in configs:
            spec = get_method(config.method)
            ctx = PlanContext(layer=0, step=0)
            # The method's plan function directly: build_plan would serve a static method from its cache.
            plan_ms = time_ms(
                lambda spec=spec, config=config, ctx=ctx: spec.plan(q, k, layout, config, ctx),
                device,
                repeats=repeats,
                warmup=warmup,
            )
            plan = spec.plan(q, k, layout, config, ctx)
            bs = plan.block_size
            if bs not in dense_executor:
                full = BlockPlan.full(layout.seq_len, bs, device=device)
                dense_executor[bs] = time_ms(
                    lambda full=full: block_sparse_attention(q, k, v, full, backend=backend),
                    device,
                    repeats=repeats,
                    warmup=1,
                )
            sparse_ms = time_ms(
                lambda plan=plan: block_sparse_attention(q, k, v, plan, backend=backend),
                device,
                repeats=repeats,
                warmup=1,
            )
            rows.append(
                {
                    "method": config.method,
                    "config": config.to_dict(),
                    "geometry": list(layout.grid),
                    "tokens": layout.seq_len,
                    "heads": heads,
                    "head_dim": head_dim,
                    "batch": batch,
                    "device": str(device),
                    "threads": torch.get_num_threads(),
                    "density": plan.density(),
                    "plan_ms": plan_ms,
                    "dense_sdpa_ms": dense_sdpa,
                    "dense_executor_ms": dense_executor[bs],
                    "sparse_ms": sparse_ms,
                    "plan_over_dense_sdpa": plan_ms / dense_sdpa,
                    "plan_over_dense_executor": plan_ms / dense_executor[bs],
                    "plan_over_sparse": plan_ms / sparse_ms,
                }
            )
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A markdown table of :func:`measure_plan_cost` rows."""
    lines = [
        "| method | options | tokens | density | plan ms | dense SDPA ms | dense executor ms | sparse ms | "
        "plan / dense SDPA | plan / dense executor | plan / sparse |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cfg = {k: v for k, v in r["config"].items() if k not in ("method", "backend")}
        opts = ", ".join(f"{k}={v}" for k, v in cfg.items() if v not in (None, 0) or k == "density")
        lines.append(
            f"| {r['method']} | {opts} | {r['tokens']} | {r['density']:.3f} | {r['plan_ms']:.1f} | "
            f"{r['dense_sdpa_ms']:.0f} | {r['dense_executor_ms']:.0f} | {r['sparse_ms']:.0f} | "
            f"{r['plan_over_dense_sdpa']:.2%} | {r['plan_over_dense_executor']:.2%} | {r['plan_over_sparse']:.2%} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Command-line entry: ``vidsparse study plan-cost --methods ... [--geometry TxHxW] [--json F]``."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", required=True, help="method specs, e.g. draft:density=0.25")
    parser.add_argument("--geometry", nargs="+", default=["9x30x52"], help="latent grids TxHxW")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads for the whole run (plan and attention alike); default: torch's own choice",
    )
    parser.add_argument("--json", help="write the rows to this JSON file")
    args = parser.parse_args(argv)
    configs = [parse_method_spec(s) for s in args.methods]
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rows = []
    for g in args.geometry:
        grid = tuple(int(x) for x in g.lower().split("x"))
        rows += measure_plan_cost(
            configs,
            VideoLayout(*grid),
            heads=args.heads,
            head_dim=args.head_dim,
            batch=args.batch,
            repeats=args.repeats,
            warmup=args.warmup,
            backend=args.backend,
            device=args.device,
        )
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"rows": rows}, fh, indent=2)
    return 0
