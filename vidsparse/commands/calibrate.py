"""``vidsparse calibrate``: classify every (layer, head) of a model into a sparse pattern type, from dense runs.

Runs one dense generation per prompt, measures the exact attention mass of every block pair of every head at every
recorded step, gives each head the cheapest pattern type that keeps ``--recall`` of its attention mass (dense when
none does within ``--max-density``), and writes a versioned pattern file for the ``cached`` method:

vidsparse calibrate --model tiny-wan --prompts prompts.txt --out patterns.safetensors
vidsparse render --method cached:patterns=patterns.safetensors --out clip.mp4

The file records the model class and config fingerprint, the latent grid, the block size and the tile order; it is
refused for another model. Geometric pattern types are re-derived for another resolution or frame count; a file
with data-derived ``stripe`` heads is tied to its grid (``--no-stripes`` leaves them out).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch

from vidsparse.config import check_fraction
from vidsparse.integration import apply, describe_models, transformers_of
from vidsparse.pipelines.loading import load_pipeline

from .common import add_geometry_args, add_model_args, positive_int, resolve_device, resolve_dtype, step_count
from .render import check_frames


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``calibrate`` sub-command."""
    p = sub.add_parser(
        "calibrate",
        help="calibrate per-head pattern types for the cached method",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(p)
    p.add_argument(
        "--prompts", required=True, help="text file: one prompt per line (blank lines and # comments skipped)"
    )
    p.add_argument("--out", required=True, help="pattern file to write (.safetensors)")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.add_argument("--negative-prompt", default="")
    add_geometry_args(p, what="the calibration clips")
    p.add_argument("--steps", type=positive_int, help="denoising steps (default: the model's)")
    p.add_argument("--guidance-scale", type=float, help="classifier-free guidance (default: the model's)")
    p.add_argument("--recall", type=float, default=0.9, help="attention mass a pattern must keep (default 0.9)")
    p.add_argument(
        "--max-density", type=float, default=0.5, help="densest pattern worth using instead of dense (default 0.5)"
    )
    p.add_argument(
        "--skip-steps",
        type=step_count,
        default=0,
        help="first N steps (or a fraction) not recorded, e.g. the dense warm-up of inference (default 0)",
    )
    p.add_argument("--block-size", type=int, default=64, help="64 or 128 (default 64)")
    p.add_argument("--tile", default=None, help="TxHxW tile order of the blocks (default: raster order)")
    p.add_argument(
        "--no-stripes", action="store_true", help="only geometric pattern types (the file then works at any grid)"
    )
    p.set_defaults(func=run)


def read_prompts(path: str) -> list[str]:
    """The prompts of ``path``: one per line, blank lines and ``#`` comments skipped; at least one."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"--prompts {path!r}: no such file.")
    prompts = [line.strip() for line in file.read_text().splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise ValueError(f"--prompts {path!r} holds no prompt (one per line; # starts a comment).")
    return prompts


def _parse_tile(text: str | None) -> tuple[int, int, int] | None:
    if text is None or text.lower() == "none":
        return None
    try:
        tile = tuple(int(x) for x in text.lower().split("x"))
    except ValueError as err:
        raise ValueError(f"--tile {text!r} is invalid: expected TxHxW, e.g. 1x8x8.") from err
    if len(tile) != 3:
        raise ValueError(f"--tile {text!r} is invalid: expected TxHxW, e.g. 1x8x8.")
    return tile


def run(args: argparse.Namespace) -> int:
    """Calibrate, write the file, print what each head got."""
    from vidsparse.methods.cached import CachedConfig
    from vidsparse.methods.cached_patterns import PATTERN_TYPES, PatternRecorder
    from vidsparse.pipelines.offline.tiny import defaults_for

    # Everything that can be refused is refused before the (slow) model load and generations.
    out = Path(args.out)
    if out.exists() and not args.force:
        raise ValueError(f"--out {args.out!r} exists; pass --force to overwrite it.")
    if not out.parent.is_dir():
        raise ValueError(f"--out {args.out!r}: the folder {str(out.parent)!r} does not exist.")
    check_fraction("--recall", args.recall)
    check_fraction("--max-density", args.max_density)
    prompts = read_prompts(args.prompts)
    tile = _parse_tile(args.tile)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    with PatternRecorder(stripe_fractions=() if args.no_stripes else PatternRecorder().stripe_fractions) as recorder:
        config = CachedConfig(
            calibration=recorder, density=None, dense_steps=args.skip_steps, block_size=args.block_size, tile=tile
        )
        pipe, model = load_pipeline(args.model, device=device, dtype=dtype, seed=args.seed)
        d = defaults_for(model)
        frames = d.frames if args.frames is None else args.frames
        height = d.height if args.height is None else args.height
        width = d.width if args.width is None else args.width
        steps = d.steps if args.steps is None else args.steps
        guidance = d.guidance_scale if args.guidance_scale is None else args.guidance_scale
        check_frames(pipe, frames)
        t0 = time.perf_counter()
        with apply(pipe, config):
            for index, prompt in enumerate(prompts):
                pipe(
                    prompt=prompt,
                    negative_prompt=args.negative_prompt,
                    num_frames=frames,
                    height=height,
                    width=width,
                    num_inference_steps=steps,
                    guidance_scale=guidance,
                    generator=torch.Generator(device="cpu").manual_seed(args.seed + index),
                    output_type="latent",  # only the attention matters: no decoding
                )
        info = {
            "model": model,
            "prompts": len(prompts),
            "frames": frames,
            "height": height,
            "width": width,
            "steps": steps,
            "guidance_scale": guidance,
            "skip_steps": args.skip_steps,
            "seed": args.seed,
            "command": shlex.join(["vidsparse", *sys.argv[1:]]) if sys.argv else "",
        }
        models = describe_models(transformers_of(pipe))
        patterns = recorder.classify(models, recall=args.recall, max_density=args.max_density, info=info)
    path = patterns.save(out, force=args.force)
    counts = patterns.counts()
    m, nl, h = patterns.shape
    print(
        f"model      {model}: {m} transformer(s) x {nl} layers x {h} heads, latent grid "
        f"{'x'.join(map(str, patterns.grid))}, block {patterns.block_size}"
    )
    print(f"runs       {len(prompts)} prompt(s) x {steps} steps, dense, {time.perf_counter() - t0:.1f} s")
    print("patterns   " + ", ".join(f"{p.name} {counts[p.name]}" for p in PATTERN_TYPES))
    print(
        f"density    {float(patterns.density.mean()):.3f} mean over heads on the calibration grid "
        f"(recall target {args.recall}, mean calibrated recall {float(patterns.recall.mean()):.3f})"
    )
    print(f"wrote      {path}")
    return 0
