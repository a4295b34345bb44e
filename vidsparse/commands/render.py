"""``vidsparse render``: generate one clip with sparse attention and write it as mp4 (and/or gif).

vidsparse render --out clip.mp4                       # embedded default model, default method
vidsparse render --method radial --density 0.3 --prompt "a blue square moves right" --out radial.mp4
vidsparse render --model Wan-AI/Wan2.1-T2V-1.3B-Diffusers --frames 81 --height 480 --width 832 --out wan.mp4
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from vidsparse.integration import apply
from vidsparse.pipelines.loading import load_pipeline
from vidsparse.video_io import check_video_path, write_video

from .common import (
    add_geometry_args,
    add_lora_arg,
    add_method_args,
    add_model_args,
    method_config,
    positive_int,
    resolve_device,
    resolve_dtype,
)


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``render`` sub-command."""
    p = sub.add_parser(
        "render",
        help="render a clip with sparse attention",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(p)
    add_lora_arg(p)
    add_method_args(p)
    p.add_argument("--prompt", default=None, help="text prompt (default: the model's example prompt)")
    p.add_argument("--negative-prompt", default="")
    add_geometry_args(p)
    p.add_argument("--steps", type=positive_int, help="denoising steps (default: the model's)")
    p.add_argument("--guidance-scale", type=float, help="classifier-free guidance (default: the model's)")
    p.add_argument("--fps", type=int, default=8)
    p.add_argument("--out", default="clip.mp4", help="output video (.mp4, .webm or .gif)")
    p.add_argument("--gif", default=None, help="also write a gif here")
    p.set_defaults(func=run)


def check_frames(pipe, frames: int) -> None:
    """Wan-style pipelines need ``frames = k * temporal_factor + 1``; say so instead of silently rounding."""
    factor = getattr(pipe, "vae_scale_factor_temporal", None)
    if factor and factor > 1 and (frames - 1) % factor:
        below = (frames - 1) // factor * factor + 1
        raise ValueError(
            f"--frames {frames} is invalid for this model: frames must be {factor}*k + 1 (e.g. {below} or "
            f"{below + factor})."
        )


def run(args: argparse.Namespace) -> int:
    """Render and write the clip; print time, steps and the measured density."""
    from vidsparse.pipelines.offline.tiny import defaults_for
    from vidsparse.pipelines.support import generation_kwargs
    from vidsparse.pipelines.training.finetune import check_lora_folder

    config = method_config(args)  # validate options before the (slow) model load
    # The output paths too: a bad one found after the generation would cost the whole generation.
    check_video_path(args.out, "--out", height=args.height, width=args.width)
    if args.gif:
        check_video_path(args.gif, "--gif", height=args.height, width=args.width)
    if args.lora is not None:
        check_lora_folder(args.lora)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    t0 = time.perf_counter()
    pipe, model = load_pipeline(args.model, device=device, dtype=dtype, seed=args.seed, lora=args.lora)
    load_s = time.perf_counter() - t0
    d = defaults_for(model)
    # None = not given (the flags' types refuse 0 and negatives, so `or` would hide nothing; `is None` says why).
    frames = d.frames if args.frames is None else args.frames
    height = d.height if args.height is None else args.height
    width = d.width if args.width is None else args.width
    steps = d.steps if args.steps is None else args.steps
    check_frames(pipe, frames)
    handle = apply(pipe, config) if config is not None else None
    t1 = time.perf_counter()
    result = pipe(
        **generation_kwargs(
            pipe,
            d,
            steps=steps,
            seed=args.seed,
            prompt=args.prompt,
            negative_prompt=args.negative_prompt,
            frames=frames,
            height=height,
            width=width,
            guidance_scale=args.guidance_scale,
            output_type="np",
        )
    )
    gen_s = time.perf_counter() - t1
    frames_np = result.frames[0]
    out = write_video(args.out, frames_np, fps=args.fps)
    if args.gif:
        write_video(args.gif, frames_np, fps=args.fps)
    summary = handle.summary() if handle else None
    method = "stock attention" if config is None else config.method
    lora_note = f" + LoRA {args.lora}" if args.lora else ""
    print(f"model      {model} ({type(pipe).__name__}, {dtype}, {device}){lora_note}")
    print(f"clip       {frames_np.shape[0]} frames {frames_np.shape[2]}x{frames_np.shape[1]}, {steps} steps")
    print(f"method     {method}")
    if summary:
        tokens = max((r["tokens"] for r in handle.stats()), default=0)
        density = summary["sparse_density"]
        dens = f"{density:.3f}" if density is not None else "n/a (no sparse call)"
        print(
            f"attention  {summary['sparse_calls']}/{summary['calls']} self-attention calls sparse, "
            f"{tokens} video tokens each; measured density of sparse calls {dens}, "
            f"over all calls {summary['overall_density']:.3f}"
        )
    print(f"time       {gen_s:.1f} s generation (+{load_s:.1f} s load)")
    print(f"wrote      {Path(out)}" + (f" and {args.gif}" if args.gif else ""))
    if handle:
        handle.remove()
    return 0
