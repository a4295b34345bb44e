"""``vidsparse bench``: speed of sparse attention vs dense, as ratios measured in one run.

vidsparse bench attention --json a.json                   # every density-targeting method x 0.1/0.25/0.5, 14k + 32k
vidsparse bench attention --methods radial moba:selection=topk --densities 0.25 --geometry 21x30x52 --threads 1
vidsparse bench e2e --json e.json                         # synthetic 4-layer Wan model (2 heads x 64, ffn 512)
vidsparse bench e2e --config wan2.1-1.3b --layers 2      # a real checkpoint's widths at its published token count
vidsparse bench scaling --json s.json                     # attention time vs length, 8k..128k tokens, log-log plot
vidsparse bench flops --json f.json                       # every real checkpoint: FLOP share, bounds, papers' claims

``attention``: one attention call (B=1, 2 heads x 64 by default) per method and density: dense SDPA time, planning
time, sparse attention time, speed-up = dense / (plan + sparse), ideal = 1/density, efficiency = speed-up / ideal.
Medians after a warm-up; the first call (compile, plan search, executor preparation) is reported apart.

``e2e``: by default a few denoising steps of a *synthetic* attention-dominated WanTransformer3DModel (real
diffusers class, random weights, 2 heads x 64, ffn_dim 512: its attention share is far above a real checkpoint's),
dense vs each method with its default warm-up; speed-up against the Amdahl bound from the measured attention share
and the effective density (dense warm-up calls count 1). With ``--config NAME`` (``wan2.1-1.3b``, ``wan2.1-14b``,
``wan2.2-5b``, ``hunyuanvideo``, ``cogvideox-5b``, ``ltx-video``, ``mochi``, ...): the transformer of that real
checkpoint (every width of its published config, ``--layers`` blocks, random weights) at its published token count
(or ``--geometry``): the measured attention share, one dense and one all-sparse step per method, the fraction of the
Amdahl bound the sparse step reaches, and the bound over the pipeline's real schedule (e.g. 50 steps) with the
method's dense warm-up counted, at each of ``--bound-densities``.

``flops``: no timing. Each real checkpoint's transformer runs one forward on the meta device under torch's FLOP
counter: dense FLOPs per forward, the FLOP share of the video->video attention core (the time share a GPU would show
if attention ran at its GEMM rate), the FLOP bound of each method (its own warm-up over the 50-step schedule) at
``--densities``; and every published speed-up in ``vidsparse.eval.flops.PUBLISHED`` next to the FLOP bound at the
paper's own density and warm-up (and the paper's dense FLOPs next to this count).

``scaling``: attention time of dense SDPA and each method at 8k..128k tokens (``--tokens``), fewer rounds at the
long end, the fitted exponent of each curve, each plan's memory, and a log-log plot next to ``--json``.

On a shared machine absolute times mean little: every number that matters is a ratio of timings taken back to back
in one process. ``--threads 1`` avoids most of the cost an oversubscribed CPU adds to multi-threaded small
operations; report the load average (recorded in the JSON).
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from typing import Any

import torch

from .common import add_backend_arg, add_geometry_args, positive_int, resolve_device, resolve_dtype

DEFAULT_E2E_DENSITY = 0.25


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``bench`` with its ``attention`` and ``e2e`` sub-commands."""
    p = sub.add_parser(
        "bench",
        help="speed: sparse vs dense attention (one call, and end to end), as ratios measured in one run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.set_defaults(func=lambda _args: p.print_help() or 2)
    inner = p.add_subparsers(dest="bench_command", metavar="{attention,e2e,scaling,flops,train}")

    a = inner.add_parser("attention", help="one attention call per method x density x geometry")
    _add_common_args(a)
    a.add_argument(
        "--densities",
        nargs="+",
        type=float,
        default=[0.1, 0.25, 0.5],
        help="densities for methods with a density target (default: %(default)s)",
    )
    a.add_argument(
        "--geometry",
        action="append",
        default=None,
        metavar="TxHxW",
        help="latent token grid, repeatable (default: 9x30x52 and 21x30x52, Wan 480p at 33 and 81 frames)",
    )
    a.add_argument("--heads", type=int, default=2, help="attention heads (default: %(default)s)")
    a.add_argument("--head-dim", type=int, default=64, help="head dimension (default: %(default)s)")
    a.add_argument("--repeats", type=int, default=3, help="timed rounds, interleaved (medians; default: 3)")
    add_backend_arg(a, default="auto")
    a.add_argument(
        "--backward",
        action="store_true",
        help="time forward + backward (training) of dense SDPA and the sparse executor, and their peak memory",
    )
    a.set_defaults(func=run_attention)

    e = inner.add_parser("e2e", help="a few denoising steps of WanTransformer3DModel, dense vs each method")
    _add_common_args(e)
    e.add_argument(
        "--density",
        type=float,
        default=DEFAULT_E2E_DENSITY,
        help="density for methods with a density target (default: %(default)s)",
    )
    e.add_argument(
        "--geometry",
        default=None,
        metavar="TxHxW",
        help="latent token grid (default: 9x30x52; with --config the checkpoint's published shape)",
    )
    e.add_argument("--layers", type=int, default=None, help="transformer blocks (default: 4; with --config 2)")
    e.add_argument("--heads", type=int, default=None, help="attention heads (default: 2; not with --config)")
    e.add_argument("--head-dim", type=int, default=None, help="head dimension (default: 64; not with --config)")
    _add_config_args(e)
    e.add_argument(
        "--steps",
        type=int,
        default=None,
        help="denoising steps per generation (default: 4; with --config the steps of the schedule the warm-up is "
        "counted over, default the checkpoint pipeline's, e.g. 50)",
    )
    e.add_argument("--repeats", type=int, default=1, help="timed generations per measurement (default: 1)")
    e.set_defaults(func=run_e2e)

    s = inner.add_parser("scaling", help="attention time vs sequence length, dense and each method, fitted exponents")
    _add_common_args(s)
    _add_scaling_args(s)
    s.set_defaults(func=run_scaling)

    f = inner.add_parser("flops", help="real checkpoints counted in FLOPs: attention share, bounds, papers' claims")
    f.add_argument("--config", nargs="+", default=None, metavar="NAME", help="checkpoint configs (default: all)")
    f.add_argument(
        "--methods",
        nargs="+",
        default=["radial", "draft", "moba", "cached"],
        metavar="SPEC",
        help="methods whose warm-up the bounds count (default: radial draft moba cached)",
    )
    f.add_argument("--densities", nargs="+", type=float, default=[0.1, 0.25, 0.5], help="default: 0.1 0.25 0.5")
    f.add_argument(
        "--geometry",
        default=None,
        metavar="TxHxW",
        help="token grid for every config (default: each one's published grid)",
    )
    f.add_argument("--no-claims", action="store_true", help="leave out the published speed-ups")
    f.add_argument("--json", metavar="PATH", help="write the results to this JSON file (atomically)")
    f.set_defaults(func=run_flops)

    t = inner.add_parser("train", help="one LoRA training step of the shipped model, dense vs each method")
    t.add_argument(
        "--methods",
        nargs="+",
        default=["radial:density=0.25"],
        metavar="SPEC",
        help="method specs to train with (default: radial:density=0.25); the dense arm is always measured",
    )
    add_geometry_args(t, what="the training clips")
    t.add_argument("--rounds", type=positive_int, default=4, help="timed rounds after a warm-up (default: 4)")
    t.add_argument("--rank", type=positive_int, default=16, help="LoRA rank (default: 16)")
    t.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's)")
    t.add_argument("--json", metavar="PATH", help="write the results to this JSON file (atomically)")
    t.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    t.set_defaults(func=run_train)


def _add_common_args(p: argparse.ArgumentParser) -> None:
    from vidsparse.eval.bench import default_bench_methods

    p.add_argument(
        "--methods",
        nargs="+",
        default=None,
        metavar="SPEC",
        help="method specs name or name:key=value,... (default: every method with a density target: "
        + " ".join(default_bench_methods())
        + ")",
    )
    p.add_argument(
        "--block-size",
        type=int,
        help="plan block size for every method, 64 or 128 (default: each method's own; 128 is faster on CPU)",
    )
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16 (default: float32 on CPU, bf16 on CUDA)")
    p.add_argument("--json", metavar="PATH", help="write the results to this JSON file (atomically)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def _add_config_args(e: argparse.ArgumentParser) -> None:
    """The ``e2e`` options of the real-checkpoint mode (``--config``)."""
    from vidsparse.eval.bench import BOUND_DENSITIES
    from vidsparse.eval.model_shapes import MODEL_SHAPES

    e.add_argument(
        "--config",
        default=None,
        metavar="NAME",
        help="a real checkpoint's transformer config (random weights): " + ", ".join(MODEL_SHAPES),
    )
    e.add_argument(
        "--bound-densities",
        nargs="+",
        type=float,
        default=list(BOUND_DENSITIES),
        help="with --config: densities the schedule's Amdahl bound is reported at (default: %(default)s)",
    )


def _add_scaling_args(s: argparse.ArgumentParser) -> None:
    """The options of ``bench scaling``."""
    from vidsparse.eval.bench import SCALING_TOKENS

    s.add_argument(
        "--tokens",
        nargs="+",
        type=int,
        default=list(SCALING_TOKENS),
        help="token counts, rounded to whole frames of --frame-grid (default: %(default)s)",
    )
    s.add_argument("--frame-grid", default="30x52", metavar="HxW", help="tokens per frame (default: 30x52, Wan 480p)")
    s.add_argument("--density", type=float, default=DEFAULT_E2E_DENSITY, help="constant density (default: 0.25)")
    s.add_argument("--heads", type=int, default=2, help="attention heads (default: %(default)s)")
    s.add_argument("--head-dim", type=int, default=64, help="head dimension (default: %(default)s)")
    s.add_argument("--repeats", type=int, default=3, help="rounds at the shortest length, fewer above (default: 3)")
    add_backend_arg(s, default="auto")


def _check_positive(name: str, value: int | None) -> None:
    if value is not None and (not isinstance(value, int) or value < 1):
        raise ValueError(f"--{name} {value!r} is invalid: expected an integer >= 1.")


def _setup(args: argparse.Namespace, densities: list[float]) -> tuple[list[Any], torch.device, torch.dtype]:
    """Validate the shared options, set the threads; returns (method runs, device, dtype)."""
    from vidsparse.commands.common import DTYPES
    from vidsparse.eval.bench import default_bench_methods
    from vidsparse.eval.specs import expand_methods

    _check_positive("threads", args.threads)
    _check_positive("repeats", args.repeats)
    _check_positive("heads", args.heads)
    _check_positive("head-dim", args.head_dim)
    if args.dtype is not None and args.dtype not in DTYPES:
        raise ValueError(f"--dtype {args.dtype!r} is invalid: expected one of {', '.join(sorted(DTYPES))}.")
    runs = expand_methods(args.methods or default_bench_methods(), densities)
    if args.block_size is not None:
        runs = [_with_block_size(run, args.block_size) for run in runs]
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    return runs, device, resolve_dtype(args.dtype, device)


def _with_block_size(run: Any, block_size: int) -> Any:
    """A method run with its config's ``block_size`` replaced (validated by the config: 64 or 128)."""
    from vidsparse.eval.specs import canonical_spec

    config = run.config.replace(block_size=block_size)
    return dataclasses.replace(run, config=config, spec=canonical_spec(config))


def _progress(args: argparse.Namespace):
    if args.quiet:
        return None
    return lambda line: print(line, file=sys.stderr, flush=True)


def _finish(args: argparse.Namespace, report: dict[str, Any], runs: list[Any], table: str) -> int:
    from vidsparse.eval.metrics import json_ready
    from vidsparse.eval.results import write_json_atomic

    report["command"] = shlex.join(["vidsparse", *sys.argv[1:]])
    report["notes"] = [run.note for run in runs if run.note]
    print(table)
    for note in report["notes"]:
        print(f"note: {note}")
    if args.json:
        write_json_atomic(args.json, json_ready(report))
        print(f"wrote {args.json}")
    return 0


def run_attention(args: argparse.Namespace) -> int:
    """``vidsparse bench attention``: print the table, write ``--json``."""
    from vidsparse.eval.attention_suite import parse_geometry
    from vidsparse.eval.bench import DEFAULT_GEOMETRIES, bench_attention

    runs, device, dtype = _setup(args, args.densities)
    geometries = [parse_geometry(g) for g in args.geometry] if args.geometry else list(DEFAULT_GEOMETRIES)
    report = bench_attention(
        [run.config for run in runs],
        geometries,
        heads=args.heads,
        head_dim=args.head_dim,
        repeats=args.repeats,
        device=device,
        dtype=dtype,
        backend=args.backend,
        progress=_progress(args),
        backward=args.backward,
    )
    return _finish(args, report, runs, attention_table(report))


def run_e2e(args: argparse.Namespace) -> int:
    """``vidsparse bench e2e``: print the table, write ``--json``."""
    from vidsparse.eval.attention_suite import parse_geometry
    from vidsparse.eval.bench import bench_e2e

    _check_positive("layers", args.layers)
    _check_positive("steps", args.steps)
    if args.config is not None:
        return run_e2e_config(args)
    args.heads = 2 if args.heads is None else args.heads
    args.head_dim = 64 if args.head_dim is None else args.head_dim
    runs, device, dtype = _setup(args, [args.density])
    report = bench_e2e(
        [run.config for run in runs],
        parse_geometry(args.geometry or "9x30x52"),
        layers=args.layers or 4,
        heads=args.heads,
        head_dim=args.head_dim,
        steps=args.steps or 4,
        repeats=args.repeats,
        device=device,
        dtype=dtype,
        progress=_progress(args),
    )
    return _finish(args, report, runs, e2e_table(report))


def run_e2e_config(args: argparse.Namespace) -> int:
    """``vidsparse bench e2e --config NAME``: a real checkpoint's transformer; print the tables, write ``--json``."""
    from vidsparse.eval.attention_suite import parse_geometry
    from vidsparse.eval.bench import bench_e2e_config
    from vidsparse.eval.model_shapes import get_shape

    get_shape(args.config)  # an unknown name fails before anything is built
    for name in ("heads", "head_dim"):
        if getattr(args, name) is not None:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} {getattr(args, name)!r} is invalid with --config: the checkpoint fixes it.")
    for density in args.bound_densities:
        if not 0 < density <= 1:
            raise ValueError(f"--bound-densities {density!r} is invalid: expected numbers in (0, 1].")
    args.heads = args.head_dim = None  # for _setup's checks (fixed by the config)
    runs, device, dtype = _setup(args, [args.density])
    report = bench_e2e_config(
        args.config,
        [run.config for run in runs],
        layers=args.layers or 2,
        grid=parse_geometry(args.geometry) if args.geometry else None,
        schedule_steps=args.steps,
        bound_densities=args.bound_densities,
        repeats=args.repeats,
        device=device,
        dtype=dtype,
        progress=_progress(args),
    )
    return _finish(args, report, runs, e2e_config_table(report))


def run_flops(args: argparse.Namespace) -> int:
    """``vidsparse bench flops``: print the two tables, write ``--json``."""
    from vidsparse.eval.attention_suite import parse_geometry
    from vidsparse.eval.flops import claims_report, flops_report
    from vidsparse.eval.metrics import json_ready
    from vidsparse.eval.model_shapes import MODEL_SHAPES, get_shape
    from vidsparse.eval.results import write_json_atomic
    from vidsparse.methods import parse_method_spec

    names = args.config or list(MODEL_SHAPES)
    for name in names:
        get_shape(name)  # unknown names fail before any counting
    for spec in args.methods:
        parse_method_spec(spec, where=f"--methods {spec!r}")
    for density in args.densities:
        if not 0 < density <= 1:
            raise ValueError(f"--densities {density!r} is invalid: expected numbers in (0, 1].")
    grid = parse_geometry(args.geometry) if args.geometry else None
    report = flops_report(names, methods=args.methods, densities=args.densities, grid=grid, progress=None)
    report["claims"] = None if args.no_claims else claims_report(progress=None)["rows"]
    report["command"] = shlex.join(["vidsparse", *sys.argv[1:]])
    print(flops_table(report))
    if report["claims"]:
        print()
        print(claims_table(report["claims"]))
    if args.json:
        write_json_atomic(args.json, json_ready(report))
        print(f"wrote {args.json}")
    return 0


def flops_table(report: dict[str, Any]) -> str:
    """Markdown: per config, tokens, dense TFLOP per forward, FLOP share, each method's 50-step bound per density."""
    methods = report["methods"]
    densities = [b["density"] for b in report["rows"][0]["bounds"][methods[0]]] if report["rows"] else []
    at = " / ".join(str(d) for d in densities)
    head = " | ".join(f"{m} bound @ {at}" for m in methods)
    lines = [
        f"| config | tokens | TFLOP / forward | FLOP share | step bound @ {at} | {head} |",
        "|:--|--:|--:|--:|--:|" + "--:|" * len(methods),
    ]
    for row in report["rows"]:
        step = " / ".join(f"{b['step_bound']:.2f}x" for b in row["bounds"][methods[0]])
        cells = " | ".join(" / ".join(f"{b['schedule_bound']:.2f}x" for b in row["bounds"][m]) for m in methods)
        lines.append(
            f"| {row['config']} | {row['tokens']} | {row['dense_tflops_per_forward']:.0f} | {row['flop_share']:.3f} "
            f"| {step} | {cells} |"
        )
    return "\n".join(lines)


def claims_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: each published speed-up next to the FLOP bound at the paper's density and warm-up."""
    lines = [
        "| method | model, shape | GPU | published | FLOP bound (ours / paper's FLOP ratio) | published / bound "
        "| dense FLOPs ours / paper's |",
        "|:--|:--|:--|--:|--:|--:|--:|",
    ]
    for r in rows:
        ours = r["our_bound"]["schedule_bound"] if r["our_bound"] else None
        paper = r["paper_flop_ratio"]
        bound = " / ".join("–" if x is None else f"{x:.2f}x" for x in (ours, paper))
        fraction = "–" if r["fraction_of_flop_bound"] is None else f"{r['fraction_of_flop_bound']:.2f}"
        check = "–" if r["count_vs_paper"] is None else f"{r['count_vs_paper']:.2f}"
        lines.append(
            f"| {r['method']} | {r['config']}, {r['shape']} ({r['tokens']} tokens) | {r['gpu']} | "
            f"{r['published_speedup']:.2f}x | {bound} | {fraction} | {check} |"
        )
    return "\n".join(lines)


def run_scaling(args: argparse.Namespace) -> int:
    """``vidsparse bench scaling``: print the tables, write ``--json`` and the log-log plot next to it (``.png``)."""
    from pathlib import Path

    from vidsparse.eval.bench import bench_scaling, write_scaling_plot

    for n in args.tokens:
        if n < 1:
            raise ValueError(f"--tokens {n!r} is invalid: expected integers >= 1.")
    parts = args.frame_grid.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"--frame-grid {args.frame_grid!r} is invalid: expected HxW latent tokens, e.g. 30x52.")
    runs, device, dtype = _setup(args, [args.density])
    report = bench_scaling(
        [run.config for run in runs],
        args.tokens,
        frame_grid=(int(parts[0]), int(parts[1])),
        heads=args.heads,
        head_dim=args.head_dim,
        repeats=args.repeats,
        device=device,
        dtype=dtype,
        backend=args.backend,
        progress=_progress(args),
    )
    if args.json:
        plot = str(Path(args.json).with_suffix(".png"))
        write_scaling_plot(report, plot)
        report["plot"] = plot
    return _finish(args, report, runs, scaling_table(report))


def run_train(args: argparse.Namespace) -> int:
    """``vidsparse bench train``: print the table of training-step times, write ``--json``."""
    from vidsparse.eval.bench_train import bench_train
    from vidsparse.methods import parse_method_spec

    for spec in args.methods:
        parse_method_spec(spec, where=f"--methods {spec!r}")  # every spec checked before any training
    if args.threads:
        torch.set_num_threads(args.threads)
    report = bench_train(
        args.methods,
        frames=args.frames,
        height=args.height,
        width=args.width,
        rounds=args.rounds,
        rank=args.rank,
        progress=_progress(args),
    )
    return _finish(args, report, [], train_table(report))


def train_table(report: dict[str, Any]) -> str:
    """Markdown table of a :func:`~vidsparse.eval.bench_train.bench_train` report."""
    lines = [
        f"training step, {report['frames']}x{report['height']}x{report['width']} clips, LoRA rank {report['rank']}, "
        f"{report['rounds']} interleaved rounds after a warm-up, {report['threads']} threads, load average "
        f"{report['loadavg_before'][0]} -> {report['loadavg_after'][0]}",
        "",
        "| arm | median step (s) | ratio to dense | first step (s) | density |",
        "|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        density = "-" if row["density"] is None else f"{row['density']:.3f}"
        lines.append(
            f"| {row['arm']} | {row['step_s']:.3f} | {row['ratio']:.3f} | {row['first_step_s']:.2f} | {density} |"
        )
    return "\n".join(lines)


def e2e_config_table(report: dict[str, Any]) -> str:
    """Markdown tables of a :func:`~vidsparse.eval.bench.bench_e2e_config` report: measured step, schedule bounds."""
    model = report["model"]
    steps = report["schedule"]["steps"]
    lines = [
        f"{model['name']} ({model['source']}: {model['class']}, real widths, random weights), {model['layers']} of "
        f"{model['depth']} layers, {report['tokens']} tokens (published {model['published_shape']}: "
        f"{'x'.join(map(str, model['published_grid']))}); attention share {report['attention_share']:.3f}; device: "
        f"{report['device']}, {report['cpu_threads']} threads, load average {_load(report)}",
        "",
        f"| method | density | dense step ms | sparse step ms | step speed-up | step bound | fraction of bound | "
        f"{steps}-step effective density | {steps}-step bound | predicted {steps}-step speed-up |",
        "|:--|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['spec']} | {r['density']:.3f} | {r['dense_ms']:.1f} | {r['sparse_ms']:.1f} | "
            f"{r['step_speedup']:.2f}x | {r['step_bound']:.2f}x | {r['fraction_of_bound']:.2f} | "
            f"{r['schedule_effective_density']:.3f} | {r['schedule_bound']:.2f}x | {r['predicted_speedup']:.2f}x |"
        )
    lines += [
        "",
        f"Amdahl bound at attention share {report['attention_share']:.3f}, with each method's dense warm-up over "
        f"{steps} steps:",
        "",
        "| method | density | effective density | schedule bound | all-sparse bound |",
        "|:--|--:|--:|--:|--:|",
    ]
    for b in report["bounds"]:
        lines.append(
            f"| {b['method']} | {b['density']:.2f} | {b['effective_density']:.3f} | {b['schedule_bound']:.2f}x | "
            f"{b['step_bound']:.2f}x |"
        )
    return "\n".join(lines)


def scaling_table(report: dict[str, Any]) -> str:
    """Markdown tables of a :func:`~vidsparse.eval.bench.bench_scaling` report: times per length, exponents."""
    lines = [
        f"{report['heads']} heads x {report['head_dim']}, frame grid {'x'.join(map(str, report['frame_grid']))}; "
        f"device: {report['device']}, {report['cpu_threads']} threads, load average {_load(report)}",
        "",
        "| method | tokens | density | rounds | dense ms | plan + sparse ms | efficiency | plan KiB | index fill |",
        "|:--|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in report["results"]:
        mem = r["plan_memory"]
        lines.append(
            f"| {r['spec']} | {r['tokens']} | {r['density']:.3f} | {r['repeats']} | {r['dense_ms']:.1f} | "
            f"{r['plan_ms'] + r['attn_ms']:.1f} | {r['efficiency']:.2f} | {mem['bytes'] / 1024:.1f} | "
            f"{mem['index_fill']:.2f} |"
        )
    lines += ["", "| curve | fitted exponent (time ~ tokens^k) |", "|:--|--:|"]
    for c in report["curves"]:
        lines.append(f"| {c['name']} | {'-' if c['exponent'] is None else format(c['exponent'], '.2f')} |")
    return "\n".join(lines)


def attention_table(report: dict[str, Any]) -> str:
    """Markdown table of a :func:`~vidsparse.eval.bench.bench_attention` report (with ``--backward``: fwd + bwd)."""
    memory = any("attn_peak_rss_bytes" in r for r in report["results"])
    timed = "forward + backward" if any(r.get("backward") for r in report["results"]) else "forward"
    lines = [
        f"device: {report['device']}, torch {report['torch']}, {report['cpu_threads']} threads, "
        f"load average {_load(report)}; timed: {timed}",
        "",
        "| method | tokens | density | dense ms | plan ms | sparse ms | speed-up | ideal | efficiency | rounds |"
        " first call s |" + (" dense peak MiB | sparse peak MiB |" if memory else ""),
        "|:--|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|" + ("--:|--:|" if memory else ""),
    ]
    for r in report["results"]:
        per_round = r.get("efficiency_rounds") or [r["efficiency"]]  # reports before the field: the median only
        lines.append(
            f"| {r['spec']} | {r['tokens']} | {r['density']:.3f} | {r['dense_ms']:.1f} | {r['plan_ms']:.2f} | "
            f"{r['attn_ms']:.1f} | {r['speedup']:.2f}x | {r['ideal']:.2f}x | {r['efficiency']:.2f} | "
            f"{min(per_round):.2f}-{max(per_round):.2f} | {r['compile_s']:.2f} |"
            + (
                f" {r['dense_peak_rss_bytes'] / 2**20:.0f} | {r['attn_peak_rss_bytes'] / 2**20:.0f} |"
                if "attn_peak_rss_bytes" in r
                else ""
            )
        )
    return "\n".join(lines)


def e2e_table(report: dict[str, Any]) -> str:
    """Markdown table of a :func:`~vidsparse.eval.bench.bench_e2e` report."""
    model = report["model"]
    lines = [
        f"synthetic WanTransformer3DModel (not a checkpoint's widths: ffn_dim {model['ffn_dim']}), "
        f"{model['num_layers']} layers, {model['num_attention_heads']} heads x "
        f"{model['attention_head_dim']}, {report['tokens']} tokens, {report['steps']} steps; attention share "
        f"{report['attention_share']:.3f}; device: {report['device']}, {report['cpu_threads']} threads, load average "
        f"{_load(report)}",
        "",
        "| method | density | effective density | dense s | sparse s | speed-up | Amdahl bound | fraction of bound |",
        "|:--|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in report["results"]:
        density = "-" if r["density"] is None else f"{r['density']:.3f}"
        lines.append(
            f"| {r['spec']} | {density} | {r['effective_density']:.3f} | {r['dense_s']:.2f} | {r['sparse_s']:.2f} | "
            f"{r['speedup']:.2f}x | {r['amdahl_bound']:.2f}x | {r['fraction_of_bound']:.2f} |"
        )
    return "\n".join(lines)


def _load(report: dict[str, Any]) -> str:
    load = report.get("load_average")
    return "n/a" if not load else " / ".join(f"{x:.2f}" for x in load)
