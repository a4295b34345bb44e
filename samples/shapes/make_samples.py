"""Sample sheet of the trained "shapes" model: dense renders (PNG frame grid + GIF) and attention locality (plot).

    python samples/shapes/make_samples.py                      # the shipped model, default render geometry
    python samples/shapes/make_samples.py --model DIR --out D  # an exported training run

Writes into ``--out`` (default: this folder): ``renders.png`` (one row per prompt, 8 frames each, 2× upscaled),
``renders.gif`` (the prompts side by side, 1×), ``locality.png`` + ``locality.json`` (self-attention mass by temporal
and by spatial distance, per layer, against the uniform-attention baseline) and ``prompt_following.json`` (does the
clip show the prompted colour moving the prompted way; see :mod:`vidsparse.eval.prompt_following`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

PROMPTS = [
    "a red circle moves right over a plain gray background",
    "a yellow square moves left over a blue gradient background",
    "a green triangle moves down over a plain black background",
    "a cyan ring bounces over a plain purple background",
    "a white star rotates over a green gradient background",
    "a pink circle grows over a plain blue background",
]


def main(argv: list[str] | None = None) -> int:
    """Render the sheet; prints one JSON line with timings and the output paths."""
    from vidsparse.eval.frame_grid import frame_grid
    from vidsparse.eval.locality import attention_locality
    from vidsparse.eval.prompt_following import FOLLOWING, prompt_following
    from vidsparse.pipelines.offline.shapes import DEFAULT_GEOMETRY, load_shapes_pipeline
    from vidsparse.video_io import write_video

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="pipeline folder (default: the shipped shapes model)")
    parser.add_argument("--out", default=str(Path(__file__).parent), help="output folder")
    parser.add_argument("--steps", type=int, default=DEFAULT_GEOMETRY["num_inference_steps"])
    parser.add_argument("--locality-steps", type=int, default=8, help="denoising steps of the locality run")
    parser.add_argument("--skip-following", action="store_true", help="skip the 8-clip prompt-following check")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    geometry = {**DEFAULT_GEOMETRY, "num_inference_steps": args.steps}

    t0 = time.time()
    pipe = load_shapes_pipeline(path=args.model)
    load_s = time.time() - t0

    def render(prompt: str, seed: int) -> np.ndarray:
        generator = torch.Generator().manual_seed(seed)
        return pipe(prompt, generator=generator, output_type="np", **geometry).frames[0]

    t0 = time.time()
    clips = [render(p, i) for i, p in enumerate(PROMPTS)]
    render_s = (time.time() - t0) / len(PROMPTS)
    big = [np.repeat(np.repeat(c, 2, axis=1), 2, axis=2) for c in clips]
    from imageio.v3 import imwrite

    imwrite(out / "renders.png", frame_grid(big, columns=8))
    tiles = [np.concatenate(clips[i : i + 3], axis=2) for i in range(0, len(clips), 3)]  # 1x: GIF under 1 MB
    write_video(out / "renders.gif", np.concatenate(tiles, axis=1), fps=8)
    (out / "renders.txt").write_text("\n".join(PROMPTS) + "\n")

    following = None
    if not args.skip_following:
        results = []
        for i, (colour, direction, prompt) in enumerate(FOLLOWING):
            results.append({"prompt": prompt, **prompt_following(render(prompt, 100 + i), colour, direction)})
        following = {
            "follows": sum(r["follows"] for r in results),
            "visible": sum(r["visible"] for r in results),
            "clips": len(results),
            "results": results,
        }
        (out / "prompt_following.json").write_text(json.dumps(following, indent=1) + "\n")

    stats = attention_locality(pipe, PROMPTS[0], **{**geometry, "num_inference_steps": args.locality_steps}, seed=0)
    _plot_locality(stats, out / "locality.png")
    (out / "locality.json").write_text(
        json.dumps({k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in stats.items()}, indent=1) + "\n"
    )
    print(
        json.dumps(
            {
                "load_s": round(load_s, 1),
                "render_s_per_clip": round(render_s, 1),
                "geometry": geometry,
                "tokens_per_attention_call": int(np.prod(stats["grid"])),
                "prompt_following": None if following is None else f"{following['follows']}/{following['clips']}",
                "command": " ".join(["python", *sys.argv]),
            }
        )
    )
    return 0


def _plot_locality(stats: dict, path: Path) -> None:
    """Two panels: mass by temporal distance and by spatial distance, one line per layer, uniform baseline dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    t, h, w = stats["grid"]
    panels = (
        ("temporal", "uniform_temporal", "temporal distance |Δt| (latent frames)"),
        ("spatial", "uniform_spatial", "spatial distance (tokens, Chebyshev)"),
    )
    for ax, (key, base, label) in zip(axes, panels):
        for layer, row in enumerate(stats[key]):
            ax.plot(np.arange(len(row)), row, marker="o", markersize=3, label=f"layer {layer}")
        ax.plot(np.arange(len(stats[base])), stats[base], "k--", label="uniform attention")
        ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("attention mass (mean over queries)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"shapes model: self-attention locality, {t}×{h}×{w} = {t * h * w} tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
