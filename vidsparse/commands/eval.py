"""``vidsparse eval``: dense vs sparse on the same seeds, with a report (quality vs speed, side by side).

vidsparse eval --out r/                                   # embedded default model, default methods and prompts
vidsparse eval --out r/ --methods window:window=0 radial --densities 0.2 0.4 --prompts prompts.txt --seeds 0 1
vidsparse eval --out r/ --resume                          # continue an interrupted sweep (finished runs kept)
vidsparse eval --out r/ --num-processes 4                 # the runs shared by 4 processes (one GPU each)
accelerate launch --multi_gpu --num_processes 4 -m vidsparse eval --out r/      # the same, started by hand
vidsparse eval report --out r/                            # rebuild the report from the run files
vidsparse eval attention --json a.json                    # synthetic attention suite, every method x density

Each prompt x seed is rendered once with stock dense attention (the reference, cached under r/refs/) and once per
method configuration, with the same seed, schedule and shapes. Each run's result is written atomically to
r/runs/<run_id>.json when it ends; a run that fails is recorded with its error and the sweep continues (exit status
1 at the end only with --strict). The report (r/report.json, report.md, index.html, plots/pareto.png, clips/) is
rebuilt from every run file in r/. Several processes (torchrun, accelerate launch, --num-processes) share the runs
by dense reference, each on its own GPU, and the main process builds the one report (see vidsparse.eval.distributed).
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import subprocess
import sys
from pathlib import Path

from vidsparse.eval.distributed import (
    DEFAULT_TIMEOUT_S,
    SweepProcesses,
    forwarded_arguments,
    launch_command,
    launched_world_size,
    shard_jobs,
)
from vidsparse.eval.specs import default_methods
from vidsparse.pipelines.loading import load_pipeline

from .common import add_geometry_args, add_lora_arg, add_model_args, positive_int, resolve_device, resolve_dtype


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``eval`` with its ``attention`` and ``report`` sub-commands."""
    p = sub.add_parser(
        "eval",
        help="dense vs sparse quality and speed, with an HTML/Markdown/JSON report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_sweep_args(p)
    p.set_defaults(func=run, sweep_parser=p)
    inner = p.add_subparsers(dest="eval_command", metavar="{attention,arms,report}")

    from vidsparse.eval.attention_suite import add_suite_args, run_from_args

    a = inner.add_parser(
        "attention",
        help="synthetic attention suite: output error of every method x density vs dense (CPU, no model)",
        description="Structured q/k/v (smooth fields over (t, h, w) + 3-D RoPE; spatial, temporal and global heads) "
        "at realistic geometries; relative L2 error and cosine similarity of each method's attention output "
        "against dense.",
    )
    add_suite_args(a)
    a.set_defaults(func=run_from_args)

    from vidsparse.eval import arms as arms_module

    m = inner.add_parser(
        "arms",
        help="training arms of the shipped model side by side: (LoRA, method) pairs on the same prompts and seeds",
        description=arms_module.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    m.add_argument(
        "--arm",
        action="append",
        required=True,
        metavar="NAME=[LORA][@METHOD]",
        help="an arm: 'base=' (no LoRA, stock attention), 'dense=runs/d', 'radial=runs/r@radial:density=0.25'",
    )
    m.add_argument("--reference", required=True, help="the arm the others are compared with (PSNR/SSIM/LPIPS, time)")
    m.add_argument("--out", required=True, help="folder for arms.json and arms.png")
    add_geometry_args(m, what="each clip (61: twice the shipped model's 31)", frames=61, height=64, width=64)
    m.add_argument("--steps", type=positive_int, default=10, help="denoising steps (default 10, the shipped model's)")
    m.add_argument(
        "--prompts", type=positive_int, default=8, help="how many of the 8 prompt-following prompts (default 8)"
    )
    m.add_argument("--lpips", default="alex", choices=("alex", "vgg", "none"))
    m.add_argument("--quiet", action="store_true", help="no progress bar")
    m.set_defaults(func=run_arms)

    r = inner.add_parser("report", help="rebuild report.json / report.md / index.html from the run files")
    r.add_argument("--out", required=True, help="the eval directory")
    r.set_defaults(func=run_report)


def add_sweep_args(p: argparse.ArgumentParser) -> None:
    """The sweep's options (model, methods, prompts, geometry, output, robustness)."""
    add_model_args(p)
    add_lora_arg(p)
    p.add_argument(
        "--methods",
        nargs="+",
        default=None,
        metavar="SPEC",
        help="method specs name or name:key=value,... (default: " + " ".join(default_methods()) + ")",
    )
    p.add_argument(
        "--densities",
        nargs="+",
        type=float,
        default=None,
        help="run every method that has a density target once per density (others run once, noted in the report)",
    )
    p.add_argument("--prompts", metavar="FILE", help="text file, one prompt per line (default: built-in prompts)")
    p.add_argument("--seeds", nargs="+", type=int, help="generation seeds (default: --seed)")
    add_geometry_args(p, what="each clip")
    p.add_argument("--steps", type=positive_int, help="denoising steps (default: the model's)")
    p.add_argument("--guidance-scale", type=float, help="classifier-free guidance (default: the model's)")
    p.add_argument("--repeats", type=int, help="timed generations after the warm-up (default: 1 on CPU, 3 on CUDA)")
    p.add_argument("--out", default="vidsparse-eval", help="output directory (default: %(default)s)")
    p.add_argument("--resume", action="store_true", help="continue in an existing --out: skip finished runs")
    p.add_argument("--force", action="store_true", help="delete the previous results in --out first")
    p.add_argument("--strict", action="store_true", help="exit with status 1 when any run failed")
    p.add_argument("--lpips", default="alex", choices=["alex", "vgg", "none"], help="LPIPS backbone, or none")
    p.add_argument("--lpips-weights", metavar="PATH", help="LPIPS backbone weights file (see vidsparse compare)")
    p.add_argument("--diff-gain", type=float, default=4.0, help="gain of the |difference| panel (default: 4)")
    p.add_argument("--fps", type=int, default=8, help="frame rate of the written clips")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--num-processes",
        type=int,
        help="share the runs among N processes (one GPU each on CUDA) started with `accelerate launch`; under "
        "torchrun or accelerate launch the processes are those of the launcher",
    )
    p.add_argument(
        "--dist-timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        metavar="SECONDS",
        help="with several processes: how long one waits for the others to finish their runs (default: 24 h)",
    )


def read_prompts(path: str | None) -> list[str]:
    """Prompts from ``--prompts FILE`` (one per line; blank lines and ``#`` comments skipped) or the built-ins."""
    from vidsparse.eval.harness import DEFAULT_PROMPTS

    if path is None:
        return list(DEFAULT_PROMPTS)
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--prompts {path!r}: no such file.")
    prompts = [line.strip() for line in file.read_text().splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise ValueError(f"--prompts {path!r} holds no prompt (one per line; '#' starts a comment).")
    return prompts


def lora_identity(path: str | None) -> tuple[str | None, str | None]:
    """``--lora``: (absolute folder, SHA-256 prefix of its weights file), or ``(None, None)`` without one."""
    import hashlib

    from vidsparse.pipelines.training.finetune import LORA_WEIGHT_NAME, check_lora_folder

    if path is None:
        return None, None
    checked = check_lora_folder(path).resolve()
    weights = checked if checked.is_file() else checked / LORA_WEIGHT_NAME
    return str(checked), hashlib.sha256(weights.read_bytes()).hexdigest()[:12]


def check_out_dir(out: Path, *, resume: bool, force: bool) -> None:
    """Refuse to mix with earlier results unless asked: ``--resume`` continues, ``--force`` deletes them first.

    Also refuses, before any model loads, a folder another running eval holds the lock of.
    """
    from vidsparse.eval.out_dir import LOCK, OutDirLock

    if resume and force:
        raise ValueError(
            "--resume and --force contradict each other: --resume keeps finished runs, --force deletes them."
        )
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} exists and is not a directory.")
    OutDirLock(out).check()
    if not force and not resume and out.is_dir() and any(p.name != LOCK for p in out.iterdir()):
        raise ValueError(
            f"--out {str(out)!r} is not empty. Pass --resume to continue that sweep (finished runs are kept and not "
            "redone) or --force to delete its previous results; or choose another --out."
        )
    from vidsparse.video_io import check_writable_folder

    check_writable_folder(out, "--out", create=False)  # a parent that is a file, a read-only folder: one line


def prepare_out_dir(out: Path, *, resume: bool, force: bool) -> None:
    """:func:`check_out_dir`, then create ``out``; the caller holds its lock.

    ``--force`` deletes exactly the files an earlier vidsparse eval listed in the folder's manifest (see
    :mod:`vidsparse.eval.out_dir`) and says how many; leftover ``.tmp-*`` files of a killed run are removed too.
    """
    from vidsparse.eval.out_dir import remove_leftover_temporaries, remove_recorded

    check_out_dir(out, resume=resume, force=force)
    out.mkdir(parents=True, exist_ok=True)
    files, size = remove_leftover_temporaries(out)
    if files:
        print(f"eval: removed {files} temporary file(s) ({size / 1e6:.1f} MB) left by an interrupted run", flush=True)
    if force:
        removed = remove_recorded(out)
        folders = sorted({rel.split("/")[0] for rel in removed})
        print(
            f"eval --force: removed {len(removed)} file(s) an earlier vidsparse eval wrote"
            + (f" (in {', '.join(folders)})" if removed else "")
            + "; anything else in the folder is kept",
            flush=True,
        )


def command_line(resolved: dict, flags: list[str]) -> str:
    """The command with every resolved setting spelled out (recorded in each run file and the report).

    Args:
        resolved: option name (``guidance_scale``) -> value; lists become several arguments, None is left out.
        flags: boolean flags that were given (``"resume"``, ...).
    """
    parts = ["vidsparse", "eval"]
    for name, value in resolved.items():
        if value is None:
            continue
        values = value if isinstance(value, list) else [value]
        parts += ["--" + name.replace("_", "-"), *(repr(v) if isinstance(v, float) else str(v) for v in values)]
    return shlex.join(parts + ["--" + flag for flag in flags])


def run(args: argparse.Namespace) -> int:
    """Plan the sweep, run what is not finished, rebuild the report; print where everything is."""
    from vidsparse.commands.render import check_frames
    from vidsparse.eval.harness import Geometry, Runner, plan_jobs, run_sweep
    from vidsparse.eval.report import build_report, summary_markdown
    from vidsparse.eval.results import load_run
    from vidsparse.eval.specs import expand_methods
    from vidsparse.pipelines.offline.tiny import default_model_name, defaults_for

    # Everything that can be wrong with the arguments fails here, before the model loads.
    method_specs = args.methods or default_methods()
    method_runs = expand_methods(method_specs, args.densities)
    prompts = read_prompts(args.prompts)
    seeds = args.seeds if args.seeds else [args.seed]
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    dtype_name = str(dtype).removeprefix("torch.")
    repeats = args.repeats if args.repeats is not None else (3 if device.type == "cuda" else 1)
    if repeats < 1:
        raise ValueError(f"--repeats {repeats} is invalid: expected an integer >= 1.")
    model = args.model or f"tiny-{default_model_name()}"
    lora, lora_digest = lora_identity(args.lora)
    d = defaults_for(model)
    geometry = Geometry(
        frames=d.frames if args.frames is None else args.frames,
        height=d.height if args.height is None else args.height,
        width=d.width if args.width is None else args.width,
        steps=d.steps if args.steps is None else args.steps,
        guidance_scale=d.guidance_scale if args.guidance_scale is None else args.guidance_scale,
    )
    out = Path(args.out)
    check_out_dir(out, resume=args.resume, force=args.force)
    if args.num_processes is not None and args.num_processes < 1:
        raise ValueError(f"--num-processes {args.num_processes} is invalid: expected an integer >= 1.")
    world = launched_world_size()
    if world == 1 and (args.num_processes or 1) > 1:
        return launch_processes(args)
    if world > 1 and args.num_processes not in (None, world):
        raise ValueError(
            f"--num-processes {args.num_processes} disagrees with the {world} processes the launcher started "
            "(WORLD_SIZE); under torchrun or accelerate launch leave --num-processes out."
        )
    processes = SweepProcesses.start(args.dist_timeout)
    device = processes.device(device)
    with contextlib.ExitStack() as held:
        if processes.is_main:
            from vidsparse.eval.out_dir import OutDirLock

            lock = held.enter_context(OutDirLock(out, command=shlex.join(["vidsparse", "eval", *sys.argv[2:]])))
            if lock.note:
                print(f"eval: {lock.note}", flush=True)
            prepare_out_dir(out, resume=args.resume, force=args.force)
        processes.wait_for_everyone()  # nobody writes before the main process has prepared the directory

        resolved = {
            "model": model,
            "lora": lora,
            "seed": args.seed,
            "seeds": seeds,
            "methods": [m.spec for m in method_runs],
            "densities": args.densities,
            "prompts": args.prompts,
            **vars(geometry),
            "repeats": repeats,
            "device": str(device),
            "dtype": dtype_name,
            "out": args.out,
            "lpips": args.lpips,
            "lpips_weights": args.lpips_weights,
            "diff_gain": args.diff_gain,
            "fps": args.fps,
            "num_processes": processes.count if processes.count > 1 else None,
        }
        command = command_line(resolved, [f for f in ("resume", "force", "strict", "quiet") if getattr(args, f)])
        jobs = plan_jobs(
            model=model,
            prompts=prompts,
            seeds=seeds,
            methods=method_runs,
            geometry=geometry,
            dtype=dtype_name,
            device_type=device.type,
            model_seed=args.seed,
            lora=lora,
            lora_digest=lora_digest,
        )
        mine = shard_jobs(jobs, processes.index, processes.count)

        def load(job):
            pipe, _ = load_pipeline(job.model, device=device, dtype=dtype, seed=job.model_seed, lora=job.lora)
            check_frames(pipe, job.frames)
            return pipe

        runner = Runner(
            out,
            device=device,
            repeats=repeats,
            fps=args.fps,
            diff_gain=args.diff_gain,
            lpips_net=None if args.lpips == "none" else args.lpips,
            lpips_weights=args.lpips_weights,
            command=command,
            progress=not args.quiet,
            load_pipeline=load,
            process=(processes.index, processes.count),
        )
        share = f"; process {processes.index} of {processes.count}: {len(mine)} of them" if processes.count > 1 else ""
        print(
            f"eval: {len(jobs)} runs ({len(prompts)} prompts x {len(seeds)} seeds x (dense + {len(method_runs)} "
            f"method configs)) on {model} {geometry.frames}x{geometry.height}x{geometry.width}, "
            f"{geometry.steps} steps, {device} {dtype_name}, warm-up + {repeats} timed{share}",
            flush=True,
        )
        result = run_sweep(mine, runner, resume=args.resume, progress=not args.quiet)
        prefix = f"process {processes.index} of {processes.count}: " if processes.count > 1 else ""
        print(
            f"{prefix}runs: {len(result.executed)} run, {len(result.skipped)} already done, {len(result.failed)} failed"
            + (f" ({', '.join(result.failed)})" if result.failed else ""),
            flush=True,
        )
        processes.wait_for_everyone()  # every run file of the sweep is written
        if not processes.is_main:
            return 1 if (args.strict and result.failed) else 0
        report = build_report(out, command=command, device=device)
        print(summary_markdown(report))
        for note in report["notes"]:
            print(f"note: {note}")
        failed = result.failed
        if processes.count > 1:
            failed = [job.run_id for job in jobs if (load_run(out, job.run_id)[0] or {}).get("status") == "failed"]
            print(f"sweep: {len(jobs)} runs by {processes.count} processes, {len(failed)} failed")
        print(f"wrote {out / 'index.html'}, {out / 'report.md'}, {out / 'report.json'}")
        return 1 if (args.strict and failed) else 0


def launch_processes(args: argparse.Namespace) -> int:
    """``--num-processes N`` outside a launcher: run this command again in N processes with ``accelerate launch``."""
    forwarded = forwarded_arguments(args.sweep_parser, args, drop=("num_processes",))
    command = launch_command(args.num_processes, forwarded)
    print(f"eval: starting {args.num_processes} processes: {shlex.join(command)}", flush=True)
    return subprocess.run(command, check=False).returncode


def run_report(args: argparse.Namespace) -> int:
    """``vidsparse eval report --out DIR``: rebuild the report files from the run files."""
    from vidsparse.eval.report import build_report

    out = Path(args.out)
    if not (out / "runs").is_dir():
        raise FileNotFoundError(f"--out {args.out!r} has no runs/ folder: it is not a vidsparse eval directory.")
    report = build_report(out, command=shlex.join(["vidsparse", "eval", "report", "--out", args.out]))
    print(f"{len(report['rows'])} runs; wrote {out / 'index.html'}, {out / 'report.md'}, {out / 'report.json'}")
    if report["skipped_files"]:
        print(f"skipped {len(report['skipped_files'])} incomplete run files", file=sys.stderr)
    return 0


def run_arms(args: argparse.Namespace) -> int:
    """``vidsparse eval arms``: render every arm, write ``arms.json`` and ``arms.png`` into ``--out``."""
    from imageio.v3 import imwrite

    from vidsparse.eval.arms import check_arms, compare_arms, parse_arm, side_by_side
    from vidsparse.eval.results import write_json_atomic
    from vidsparse.video_io import check_writable_folder

    arms = [parse_arm(text) for text in args.arm]
    check_arms(arms, args.reference)  # before any pipeline loads
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file; expected a folder.")
    check_writable_folder(out, "--out", create=True)
    result, clips = compare_arms(
        arms,
        reference=args.reference,
        frames=args.frames,
        height=args.height,
        width=args.width,
        steps=args.steps,
        prompts=args.prompts,
        lpips_net=None if args.lpips == "none" else args.lpips,
        progress=not args.quiet,
    )
    result["command"] = "vidsparse eval arms " + " ".join(
        [
            *(f"--arm {a}" for a in args.arm),
            f"--reference {args.reference}",
            f"--frames {args.frames}",
            f"--height {args.height}",
            f"--width {args.width}",
            f"--steps {args.steps}",
            f"--prompts {args.prompts}",
            f"--lpips {args.lpips}",
            "--out",
            str(out),
        ]
    )
    write_json_atomic(out / "arms.json", result)
    imwrite(out / "arms.png", side_by_side(clips))
    for name, arm in result["arms"].items():
        scores = (
            ""
            if name == args.reference
            else (f", vs {args.reference}: PSNR {arm['psnr']} dB, SSIM {arm['ssim']}, LPIPS {arm['lpips']}")
        )
        print(
            f"{name}: follows {arm['follows']}/{arm['clips']}, visible frames {arm['visible_frames']:.2f}, "
            f"render {arm['render_s_median']:.1f} s ({arm['render_time_vs_reference']:.2f}x){scores}"
        )
    print(f"wrote {out / 'arms.json'} and {out / 'arms.png'} (rows: {', '.join(result['arms'])})")
    return 0
