"""``vidsparse finetune``: LoRA fine-tuning of a Wan video transformer, with or without sparse attention.

vidsparse finetune runs/dense --steps 300                                 # shipped tiny-shapes, procedural clips
vidsparse finetune runs/radial --method radial --density 0.25 --frames 61 --minutes 30
vidsparse finetune runs/radial --method radial --density 0.25 --frames 61 --minutes 30 --resume   # continue
vidsparse finetune runs/mine --data clips/ --frames 17 --height 64 --width 64          # your clips + captions
vidsparse render --lora runs/radial --method radial --density 0.25 --frames 61 --out long.mp4

The run folder holds pytorch_lora_weights.safetensors (diffusers' LoRA format: pipe.load_lora_weights(folder)
loads it), checkpoint.pt, finetune_config.json and train_log.jsonl (one line per step). --data DIR: clip files
(.mp4 .webm .mov .mkv .avi .gif, or .npy uint8 [T, H, W, 3]) each with its caption in a same-stem .txt file.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vidsparse.pipelines.loading import load_pipeline

from .common import (
    STOCK,
    add_geometry_args,
    add_method_args,
    add_model_args,
    method_config,
    positive_int,
    resolve_device,
    resolve_dtype,
)


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``finetune`` sub-command."""
    p = sub.add_parser(
        "finetune",
        help="LoRA fine-tuning (peft, diffusers format) with any vidsparse method applied in training",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("out", help="run folder: the LoRA weights, checkpoint.pt, finetune_config.json, train_log.jsonl")
    add_model_args(p)
    add_method_args(p, default=STOCK)
    p.add_argument("--data", metavar="DIR", help="folder of clips + same-stem .txt captions (default: procedural)")
    add_geometry_args(p, what="each training clip")
    p.add_argument(
        "--steps", type=positive_int, default=200, help="optimizer steps of the whole run (default: %(default)s)"
    )
    p.add_argument("--minutes", type=float, help="stop (with a checkpoint) after this many minutes of this call")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default: %(default)s)")
    p.add_argument("--warmup-steps", type=int, default=10, help="linear learning-rate warm-up (default: %(default)s)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (default: %(default)s)")
    p.add_argument("--alpha", type=float, help="LoRA alpha (default: the rank; output scaled by alpha/rank)")
    p.add_argument("--batch", type=int, default=1, help="clips per step (default: %(default)s)")
    p.add_argument("--caption-dropout", type=float, default=0.1, help="fraction of empty captions (default: 0.1)")
    p.add_argument(
        "--pure-noise-fraction",
        type=float,
        default=0.0,
        help="fraction of samples at sigma=1 (the shipped model was trained with 0.3; default: %(default)s)",
    )
    p.add_argument("--checkpoint-every", type=float, default=120.0, metavar="SECONDS", help="default: %(default)s")
    p.add_argument("--resume", action="store_true", help="continue the run in OUT (same flags; --steps may grow)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Check every flag, load the model, train (or resume); print a JSON summary."""
    from vidsparse.pipelines.offline.tiny import default_model_name, defaults_for
    from vidsparse.pipelines.training import finetune as F

    # Everything that can be wrong with the flags fails here, before the model loads.
    for flag in ("dense_steps", "dense_last_steps"):
        if getattr(args, flag) is not None:
            raise ValueError(
                f"--{flag.replace('_', '-')}: denoising-step schedules do not apply to finetune (each training step "
                "sees one random noise level); use --dense-layers or --opt dense_above_timestep=T."
            )
    if args.minutes is not None and not args.minutes > 0:
        raise ValueError(f"--minutes {args.minutes}: expected a number of minutes > 0.")
    if args.checkpoint_every <= 0:
        raise ValueError(f"--checkpoint-every {args.checkpoint_every}: expected seconds > 0.")
    sparse = method_config(args)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if sparse is not None:
        sparse = F.sparse_training_config(sparse, args.backend, device)
    elif args.backend is not None:
        raise ValueError("--backend chooses the sparse executor: it needs --method (not 'none').")
    model = args.model or f"tiny-{default_model_name()}"
    d = defaults_for(model)
    config = F.FinetuneConfig(
        model=model,
        sparse=sparse,
        rank=args.rank,
        alpha=float(args.rank if args.alpha is None else args.alpha),
        steps=args.steps,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        batch=args.batch,
        frames=d.frames if args.frames is None else args.frames,
        height=d.height if args.height is None else args.height,
        width=d.width if args.width is None else args.width,
        seed=args.seed,
        data=args.data,
        caption_dropout=args.caption_dropout,
        pure_noise_fraction=args.pure_noise_fraction,
        dtype=str(dtype).removeprefix("torch."),
        checkpoint_every_s=args.checkpoint_every,
    )
    F.check_run_folder(Path(args.out), config, args.resume)
    data = F.ClipFolder(config.data, config.frames) if config.data is not None else None
    if sparse is not None:
        F.check_backward(sparse.backend, device, dtype)

    pipe, _ = load_pipeline(model, device=device, dtype=dtype, seed=args.seed)
    F.check_trainable(pipe)
    F.check_geometry(pipe, config)
    summary = F.finetune(
        args.out, config, pipe, resume=args.resume, max_minutes=args.minutes, progress=not args.quiet, data=data
    )
    print(json.dumps(summary))
    return 0
