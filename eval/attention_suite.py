"""The synthetic attention suite: attention-output error and density of every method on structured q/k/v.

For each geometry, structured inputs come from :mod:`vidsparse.eval.synthetic`; the dense output is the reference;
each method config plans and runs through the same executor, and the suite records density, relative L2 error,
cosine similarity and planning time. This is the quality yardstick of methods on raw tensors (cheap, CPU-only).

Next to every method's error the suite puts the **oracle**'s (:mod:`vidsparse.methods.oracle`): the top-mass block
selection from the exact attention at the method's own measured density and in its own token order (the best of
its per-row, per-head and head-adaptive rules), and the ratio method error / oracle error. Oracle rows at each
target density are added as references (``--no-oracle`` leaves all of that out).

    vidsparse eval attention --json out.json          # every registered method x density
    vidsparse eval attention --methods radial:density=0.25 window:window=1 --json out.json
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from vidsparse.config import SparseConfig
from vidsparse.kernels.dispatch import block_sparse_attention
from vidsparse.layout import VideoLayout
from vidsparse.methods import PlanContext, build_plan
from vidsparse.methods.oracle import SCOPES, OracleConfig, exact_video_mass, forced_video_pairs, oracle_mask
from vidsparse.plan import BlockPlan, finalize_plan

from .specs import canonical_spec
from .synthetic import DEFAULT_HEAD_MIX, HEAD_MIXES, output_error, resolve_head_types, synthetic_qkv

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
    #: Exact block masses by (block size, token order), computed once for the oracle.
    masses: dict = field(default_factory=dict, compare=False, repr=False)


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


def plan_video_order(plan: BlockPlan, layout: VideoLayout) -> torch.Tensor | None:
    """The order of the video tokens in ``plan`` (indices into the raster video part), ``None`` for raster."""
    if plan.perm is None:
        return None
    order = plan.perm[: layout.num_video_tokens].cpu() - layout.video_start
    return None if bool(torch.equal(order, torch.arange(layout.num_video_tokens))) else order


def oracle_error(
    inputs: SuiteInputs,
    density: float,
    *,
    block_size: int = 64,
    order: torch.Tensor | None = None,
    backend: str = "auto",
) -> dict[str, Any]:
    """The oracle's error at ``density`` in token ``order``: the best of its selection rules.

    Returns:
        ``{"density", "rel_l2", "cosine", "scope"}`` of the selection with the lower relative L2 error.
    """
    layout = inputs.layout
    key = (block_size, None if order is None else hash(order.numpy().tobytes()))
    mass = inputs.masses.get(key)
    if mass is None:
        mass = inputs.masses[key] = exact_video_mass(inputs.q, inputs.k, layout, block_size, order)
    forced = forced_video_pairs(layout, block_size, mass.device)
    best: dict[str, Any] | None = None
    for scope in SCOPES:
        mask = oracle_mask(mass, density, forced=forced, scope=scope)
        plan = finalize_plan(mask, layout, block_size, video_order=order, meta={"method": "oracle"})
        err = output_error(
            block_sparse_attention(inputs.q, inputs.k, inputs.v, plan, backend=backend), inputs.dense_out
        )
        if best is None or err["rel_l2"] < best["rel_l2"]:
            best = {"density": plan.density(), **err, "scope": scope}
    return best


def evaluate(
    config: SparseConfig,
    inputs: SuiteInputs,
    *,
    backend: str = "auto",
    ctx: PlanContext | None = None,
    oracle: bool = False,
) -> dict[str, Any]:
    """Plan with ``config`` on ``inputs`` and measure the output error against dense.

    Args:
        oracle: Also measure the oracle at this plan's density and token order (:func:`oracle_error`; not for
            dense plans, where both are exact).

    Returns:
        A row: method, config, tokens, density, rel_l2, cosine, plan_ms; with ``oracle``: oracle_rel_l2,
        oracle_scope and vs_oracle (rel_l2 / oracle_rel_l2), ``None`` for a dense plan.
    """
    start = time.perf_counter()
    plan = build_plan(config, inputs.q, inputs.k, inputs.layout, ctx or PlanContext(layer=0, step=0))
    density = plan.density()  # synchronises: the plan is complete
    plan_ms = (time.perf_counter() - start) * 1000
    out = block_sparse_attention(inputs.q, inputs.k, inputs.v, plan, backend=backend)
    row = {
        "method": config.method,
        "spec": canonical_spec(config),
        "config": config.to_dict(),
        "geometry": list(inputs.layout.grid),
        "tokens": inputs.layout.seq_len,
        "density": density,
        "plan_ms": plan_ms,
        **output_error(out, inputs.dense_out),
    }
    if oracle:
        row.update(oracle_rel_l2=None, oracle_scope=None, vs_oracle=None)
        if density < 1.0:
            ref = oracle_error(
                inputs,
                density,
                block_size=plan.block_size,
                order=plan_video_order(plan, inputs.layout),
                backend=backend,
            )
            row.update(oracle_rel_l2=ref["rel_l2"], oracle_scope=ref["scope"])
            row["vs_oracle"] = row["rel_l2"] / ref["rel_l2"] if ref["rel_l2"] > 0 else None
    return row


def oracle_rows(inputs: SuiteInputs, densities: Sequence[float], *, backend: str = "auto") -> list[dict[str, Any]]:
    """Reference rows: the oracle (raster order, block 64) at each target density of the suite."""
    rows = []
    for target in densities:
        config = OracleConfig(density=float(target))
        ref = oracle_error(inputs, float(target), block_size=config.block_size, backend=backend)
        rows.append(
            {
                "method": "oracle",
                "spec": canonical_spec(config.replace(scope=ref["scope"])),
                "config": config.replace(scope=ref["scope"]).to_dict(),
                "geometry": list(inputs.layout.grid),
                "tokens": inputs.layout.seq_len,
                "density": ref["density"],
                "plan_ms": None,
                "rel_l2": ref["rel_l2"],
                "cosine": ref["cosine"],
                "oracle_rel_l2": ref["rel_l2"],
                "oracle_scope": ref["scope"],
                "vs_oracle": 1.0,
            }
        )
    return rows


def run_suite(
    configs: Sequence[SparseConfig],
    geometries: Sequence[tuple[int, int, int]] = DEFAULT_GEOMETRIES,
    *,
    heads: int = 4,
    head_dim: int = 64,
    seed: int = 0,
    backend: str = "auto",
    oracle_densities: Sequence[float] | None = (),
    head_types: tuple[str, ...] = DEFAULT_HEAD_MIX,
    layer: int = 0,
) -> list[dict[str, Any]]:
    """Evaluate every config on every geometry; returns one row per (geometry, config).

    Args:
        oracle_densities: ``None``: no oracle. Otherwise every row gets its oracle comparison, and each geometry
            starts with one oracle reference row per density listed here.
        head_types: Head types of the synthetic inputs, cycled over the heads.
        layer: Transformer layer the plans are made for (``moba`` cycles its partition by layer: 0 = 1-D).
    """
    rows = []
    with_oracle = oracle_densities is not None
    for grid in geometries:
        inputs = make_inputs(
            VideoLayout(*grid), heads=heads, head_dim=head_dim, seed=seed, head_types=head_types, backend=backend
        )
        if with_oracle:
            rows.extend(oracle_rows(inputs, oracle_densities, backend=backend))
        # A fresh context per config: methods keep state in its store (cached's searched pattern).
        rows.extend(
            evaluate(cfg, inputs, backend=backend, ctx=PlanContext(layer=layer, step=0), oracle=with_oracle)
            for cfg in configs
        )
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A markdown table of suite rows: one line per (geometry, method configuration)."""
    oracle = any("vs_oracle" in r for r in rows)
    head = "| geometry | method | target density | measured density | rel. L2 error | cosine | plan ms |"
    if oracle:
        head += " oracle rel. L2 | error / oracle |"
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in rows:
        grid = "x".join(map(str, r["geometry"]))
        target = r["config"].get("density")
        target_text = "–" if target is None else f"{target:g}"
        plan_ms = "–" if r.get("plan_ms") is None else f"{r['plan_ms']:.1f}"
        line = (
            f"| {grid} | {r['spec']} | {target_text} | {r['density']:.3f} | {r['rel_l2']:.4f} | {r['cosine']:.4f} | "
            f"{plan_ms} |"
        )
        if oracle:
            ref, ratio = r.get("oracle_rel_l2"), r.get("vs_oracle")
            line += f" {'–' if ref is None else f'{ref:.4f}'} | {'–' if ratio is None else f'{ratio:.2f}x'} |"
        lines.append(line)
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
    parser.add_argument(
        "--layer", type=int, default=0, help="layer index the plans are made for (moba: 0/1/2 = 1-D/2-D/3-D chunks)"
    )
    parser.add_argument("--backend", default="auto")
    parser.add_argument(
        "--no-oracle",
        action="store_true",
        help="leave out the oracle (top-mass block selection from the exact attention) rows and ratios",
    )
    parser.add_argument(
        "--head-types",
        nargs="+",
        default=list(DEFAULT_HEAD_MIX),
        help=f"synthetic head types cycled over the heads, or one mix name ({', '.join(HEAD_MIXES)}); "
        "default: %(default)s",
    )
    parser.add_argument("--json", help="write the rows to this JSON file")


def run_from_args(args: argparse.Namespace) -> int:
    """Run the suite for parsed arguments: print the table, write ``--json``; returns the exit status."""
    from vidsparse.methods import method_names

    from .results import write_json_atomic
    from .specs import expand_methods

    runs = expand_methods(args.methods or method_names(), args.densities)
    geometries = [parse_geometry(g) for g in args.geometry]
    head_types = resolve_head_types(args.head_types)
    rows = run_suite(
        [r.config for r in runs],
        geometries,
        heads=args.heads,
        head_dim=args.head_dim,
        seed=args.seed,
        backend=args.backend,
        oracle_densities=None if args.no_oracle else args.densities,
        head_types=head_types,
        layer=args.layer,
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
                "schema_version": 2,
                "geometries": [list(g) for g in geometries],
                "heads": args.heads,
                "head_dim": args.head_dim,
                "seed": args.seed,
                "backend": args.backend,
                "head_types": list(head_types),
                "layer": args.layer,
                "oracle": not args.no_oracle,
                "notes": notes,
                "rows": rows,
            },
        )
        print(f"wrote {args.json}")
    return 0
