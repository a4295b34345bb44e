"""Measurements of the ``cached`` method: pattern reuse under drifting q/k, and the memory a cached pattern takes.

``drift``: synthetic q/k/v whose content field rotates by ``drift`` radians per denoising step
(:func:`vidsparse.eval.synthetic.synthetic_qkv`). At every step the suite's :func:`~vidsparse.eval.attention_suite.
evaluate` runs the ``cached`` method twice: once with the pattern searched at step ``s0`` and reused (one store kept
across steps, refresh off), once with a fresh search (an empty store every step). Each row gives the recall (the
fraction of the step's true attention mass inside the kept blocks, exact), the density, the relative L2 error of the
attention output against dense, and the planning time (a reused step plans in microseconds).

``memory``: bytes of one layer's cached pattern in both storage formats (``indices``: the executable plan, int32
``kv_idx`` cut to the longest row; ``bits``: a bit-packed block mask), measured on the tensors the method keeps, for
a given geometry (default Wan 2.1 720p, 81 frames: 21x45x80 latent tokens, 40 heads, 40 layers).

    vidsparse study cached-report drift --geometry 9x30x52 --steps 10 --drift 0.05 --json drift.json
    vidsparse study cached-report memory --geometry 21x45x80 --heads 40 --layers 40
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

import torch

from vidsparse.kernels.dispatch import block_sparse_attention
from vidsparse.layout import VideoLayout
from vidsparse.methods import PlanContext, parse_method_spec
from vidsparse.methods.cached import CachedConfig, CachedPattern, block_attention_mass, kept_recall, video_qk
from vidsparse.plan import BlockPlan, num_blocks

from .attention_suite import SuiteInputs, evaluate
from .synthetic import synthetic_qkv

#: The two selections compared by default: AdaSpa's fixed density (head-adaptive) and a recall target.
DEFAULT_SELECTIONS: tuple[dict[str, Any], ...] = (
    {"density": 0.25},
    {"recall": 0.9, "density": None},
)


def _label(selection: dict[str, Any]) -> str:
    return f"recall {selection['recall']}" if selection.get("recall") is not None else f"density {selection['density']}"


def drift_rows(
    layout: VideoLayout,
    *,
    steps: int = 10,
    drift: float = 0.05,
    search_step: int = 0,
    selections: Sequence[dict[str, Any]] = DEFAULT_SELECTIONS,
    heads: int = 4,
    head_dim: int = 64,
    seed: int = 0,
    backend: str = "auto",
    search_rows: int | None = CachedConfig.search_rows,
) -> list[dict[str, Any]]:
    """Reused vs fresh patterns over ``steps`` steps of drifting q/k; one row per (step, selection, kind).

    ``search_rows``: the method's option (query rows per block its search scores; ``None``: every row). The recall
    of each row is measured against the step's exact block masses either way.
    """
    configs = [CachedConfig(dense_steps=0, refresh_steps="never", search_rows=search_rows, **sel) for sel in selections]
    reuse_stores: list[dict[str, Any]] = [{} for _ in configs]
    rows = []
    for step in range(search_step, steps):
        q, k, v = synthetic_qkv(layout, heads=heads, head_dim=head_dim, seed=seed, step=step, drift=drift)
        dense = block_sparse_attention(q, k, v, BlockPlan.full(layout.seq_len, 64), backend=backend)
        inputs = SuiteInputs(layout, q, k, v, dense)
        mass = block_attention_mass(*video_qk(q, k, layout, None), 64)  # this step's truth
        for sel, cfg, store in zip(selections, configs, reuse_stores):
            for kind, ctx in (
                ("reused", PlanContext(step=step, num_steps=steps, store=store)),
                ("fresh", PlanContext(step=step, num_steps=steps)),
            ):
                row = evaluate(cfg, inputs, backend=backend, ctx=ctx)
                pattern: CachedPattern = ctx.store["pattern"]
                vb = num_blocks(layout.num_video_tokens, 64)
                plan = pattern.to_plan(q.device)
                video_mask = plan.block_mask()[..., :vb, :vb]
                row.update(
                    step=step,
                    angle=drift * step,
                    selection=_label(sel),
                    kind=kind,
                    searched_at=pattern.step,
                    recall=float(kept_recall(video_mask, mass).mean()),
                )
                rows.append(row)
    return rows


def format_drift_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown: one line per step, reused vs fresh for every selection."""
    selections = list(dict.fromkeys(r["selection"] for r in rows))
    head = "| step | drift (rad) |"
    rule = "|---|---|"
    for sel in selections:
        head += f" {sel}: recall reused / fresh | density reused / fresh | rel. L2 reused / fresh |"
        head += " plan ms reused / fresh |"
        rule += "---|---|---|---|"
    lines = [head, rule]
    by_key = {(r["step"], r["selection"], r["kind"]): r for r in rows}
    for step in sorted({r["step"] for r in rows}):
        angle = next(r["angle"] for r in rows if r["step"] == step)
        line = f"| {step} | {angle:.2f} |"
        for sel in selections:
            a, b = by_key[(step, sel, "reused")], by_key[(step, sel, "fresh")]
            line += (
                f" {a['recall']:.3f} / {b['recall']:.3f} | {a['density']:.3f} / {b['density']:.3f} |"
                f" {a['rel_l2']:.4f} / {b['rel_l2']:.4f} | {a['plan_ms']:.1f} / {b['plan_ms']:.0f} |"
            )
        lines.append(line)
    return "\n".join(lines)


def memory_row(
    grid: tuple[int, int, int],
    *,
    heads: int = 40,
    layers: int = 40,
    block_size: int = 64,
    density: float = 0.2,
    seed: int = 0,
) -> dict[str, Any]:
    """Bytes of one layer's cached pattern (one cache context, batch 1) in each storage format, measured.

    The mask has AdaSpa's head-adaptive budgets in their widest case (a quarter of the heads at half the budget, a
    quarter at 1.5x), own block included; which blocks are kept does not change the bytes.
    """
    layout = VideoLayout(*grid)
    vb = num_blocks(layout.num_video_tokens, block_size)
    budgets = torch.full((heads,), max(1, round(density * vb)))
    budgets[: heads // 4] = max(1, round(density / 2 * vb))
    budgets[heads // 4 : heads // 2] = min(vb, round(1.5 * density * vb))
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(1, heads, vb, vb, generator=gen) + 2 * torch.eye(vb)  # own block ranked first
    rank = scores.argsort(-1, descending=True).argsort(-1)
    mask = rank < budgets[None, :, None, None]
    out: dict[str, Any] = {
        "grid": list(grid),
        "tokens": layout.num_video_tokens,
        "blocks": vb,
        "heads": heads,
        "layers": layers,
        "block_size": block_size,
        "density": float(mask.float().mean()),
        "row_max": int(budgets.max()),
    }
    for storage in ("indices", "bits"):
        pattern = CachedPattern.from_mask(mask, layout, block_size, step=0, storage=storage, order=None, meta={})
        out[f"{storage}_bytes_per_layer"] = pattern.nbytes()
    out["dense_bool_bytes_per_layer"] = heads * vb * vb  # an unpacked bool block mask, for comparison
    return out


def format_memory(row: dict[str, Any]) -> str:
    """Markdown table of :func:`memory_row`."""
    mib = 1 << 20
    lines = [
        f"Geometry {'x'.join(map(str, row['grid']))} ({row['tokens']} tokens, {row['blocks']} blocks of "
        f"{row['block_size']}), {row['heads']} heads, density {row['density']:.3f}, longest row {row['row_max']} "
        "blocks; one cache context, batch 1.",
        "",
        f"| storage | per layer | {row['layers']} layers |",
        "|---|---|---|",
    ]
    for name, key in (
        ("indices (int32 kv_idx cut to the longest row + kv_num)", "indices_bytes_per_layer"),
        ("bits (bit-packed block mask)", "bits_bytes_per_layer"),
        ("unpacked bool block mask (not used)", "dense_bool_bytes_per_layer"),
    ):
        lines.append(f"| {name} | {row[key] / mib:.1f} MiB | {row[key] * row['layers'] / mib:.0f} MiB |")
    return "\n".join(lines)


def _grid(text: str) -> tuple[int, int, int]:
    values = tuple(int(x) for x in text.lower().split("x"))
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"{text!r} is not a grid TxHxW")
    return values


def _search_rows(text: str) -> int | None:
    """``--search-rows`` in the method-spec syntax ("16", "none"), validated by :class:`CachedConfig` itself."""
    try:
        return parse_method_spec(f"cached:search_rows={text}").search_rows
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """``vidsparse study cached-report drift|memory ...``."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    d = sub.add_parser("drift", help="reused vs fresh patterns over drifting q/k")
    d.add_argument("--geometry", type=_grid, default=(9, 30, 52))
    d.add_argument("--steps", type=int, default=10)
    d.add_argument("--drift", type=float, default=0.05, help="radians per step")
    d.add_argument("--heads", type=int, default=4)
    d.add_argument("--head-dim", type=int, default=64)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--backend", default="auto")
    d.add_argument(
        "--search-rows",
        type=_search_rows,
        default=CachedConfig.search_rows,
        help="query rows per block the search scores, or 'none' for every row (default: the method's)",
    )
    d.add_argument("--json", help="write the rows here")
    m = sub.add_parser("memory", help="bytes of a cached pattern")
    m.add_argument("--geometry", type=_grid, default=(21, 45, 80))
    m.add_argument("--heads", type=int, default=40)
    m.add_argument("--layers", type=int, default=40)
    m.add_argument("--block-size", type=int, default=64)
    m.add_argument("--density", type=float, default=0.2)
    m.add_argument("--json", help="write the row here")
    args = parser.parse_args(argv)
    if args.what == "drift":
        rows = drift_rows(
            VideoLayout(*args.geometry),
            steps=args.steps,
            drift=args.drift,
            heads=args.heads,
            head_dim=args.head_dim,
            seed=args.seed,
            backend=args.backend,
            search_rows=args.search_rows,
        )
        print(format_drift_table(rows))
        result: Any = {"rows": rows}
    else:
        result = memory_row(
            args.geometry, heads=args.heads, layers=args.layers, block_size=args.block_size, density=args.density
        )
        print(format_memory(result))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2, default=str)
    return 0
