"""``vidsparse train-tiny``: train (or resume) the small "shapes" video model on procedural clips, on a CPU.

Examples::

  vidsparse train-tiny runs/shapes --minutes 60          # train for an hour, checkpointing; run again to resume
  vidsparse train-tiny runs/shapes --export out/shapes   # write the EMA weights as a diffusers pipeline folder

On a machine shared with other jobs, start it with OMP_WAIT_POLICY=PASSIVE: spinning OpenMP threads that wait on
a descheduled sibling made training steps about 5x slower in CPU time here.
"""

from __future__ import annotations

import argparse
import json


def _phases(text: str):
    """Parse ``"2400x5x4,400x15x2"`` (steps x frames x batch, comma-separated) into phases."""
    from vidsparse.pipelines.training.train_tiny import Phase

    phases = []
    for part in text.split(","):
        try:
            steps, frames, batch = (int(v) for v in part.strip().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"--phases: {part!r} is not STEPSxFRAMESxBATCH (three integers), e.g. 2400x5x4"
            ) from None
        if steps < 1 or batch < 1 or frames < 1 or (frames - 1) % 2:
            raise argparse.ArgumentTypeError(
                f"--phases: {part!r}: steps and batch must be >= 1 and frames odd (1 + 2k, the VAE packs frame pairs)"
            )
        phases.append(Phase(steps, frames, batch))
    return tuple(phases)


def register(subparsers) -> None:
    """Add the ``train-tiny`` sub-command."""
    p = subparsers.add_parser(
        "train-tiny",
        help="train or resume the small shapes video model (CPU), or export its weights",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run_dir", help="folder of the run: checkpoint.pt, config.json, train_log.jsonl")
    p.add_argument("--minutes", type=float, default=None, help="stop (with a checkpoint) after this many minutes")
    p.add_argument(
        "--phases",
        type=_phases,
        default=None,
        help="curriculum STEPSxFRAMESxBATCH,... (new runs; or a longer one for an existing run, before its decay)",
    )
    p.add_argument("--lr", type=float, default=None, help="new runs: peak learning rate")
    p.add_argument("--seed", type=int, default=None, help="new runs: seed of data, noise and initial weights")
    p.add_argument("--warmup-steps", type=int, default=None, help="new runs: linear warm-up steps")
    p.add_argument("--decay-steps", type=int, default=None, help="new runs: cosine-decay steps at the end")
    p.add_argument(
        "--init-from", metavar="RUN_DIR", default=None, help="new runs: start from this run's EMA weights (fine-tune)"
    )
    p.add_argument(
        "--new-text-encoder",
        action="store_true",
        help="new runs with --init-from: build the current text encoder instead of copying that run's",
    )
    p.add_argument(
        "--pure-noise-fraction",
        type=float,
        default=None,
        help="new runs: fraction of samples trained at sigma=1 (pure noise: teaches where the caption puts things)",
    )
    p.add_argument("--export", metavar="DIR", default=None, help="write the EMA weights as a pipeline folder to DIR")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Train/resume/extend unless ``--export`` is given alone; then export. Prints a JSON summary."""
    import dataclasses
    from pathlib import Path

    from vidsparse.pipelines.training import train_tiny

    new_run_options = {
        "lr": args.lr,
        "seed": args.seed,
        "warmup_steps": args.warmup_steps,
        "decay_steps": args.decay_steps,
        "init_from": args.init_from,
        "new_text_encoder": args.new_text_encoder or None,
        "pure_noise_fraction": args.pure_noise_fraction,
    }
    overrides = {k: v for k, v in (("phases", args.phases), *new_run_options.items()) if v is not None}
    saved = Path(args.run_dir) / "config.json"
    config = None
    if overrides and saved.exists():
        if set(overrides) != {"phases"}:
            raise ValueError(
                f"run_dir={args.run_dir!r} already holds a run; only --phases may change it "
                f"(--{', --'.join(k.replace('_', '-') for k in new_run_options)} apply to new runs)."
            )
        # Extending a run: its saved settings with the new phases (train() checks that the past is unchanged).
        config = dataclasses.replace(train_tiny.TrainConfig.from_json(json.loads(saved.read_text())), **overrides)
    elif overrides:
        config = train_tiny.TrainConfig(**overrides)
    if args.export is not None and args.minutes is None and config is None:
        if not (Path(args.run_dir) / "checkpoint.pt").exists():
            raise FileNotFoundError(f"{args.run_dir!r} holds no checkpoint.pt to export.")
        print(json.dumps({"exported": str(train_tiny.export(args.run_dir, args.export))}))
        return 0
    summary = train_tiny.train(args.run_dir, config, max_minutes=args.minutes)
    if args.export is not None:
        summary["exported"] = str(train_tiny.export(args.run_dir, args.export))
    print(json.dumps(summary))
    return 0
