"""``vidsparse plan``: build one method's block plan for a geometry, print its density, draw its mask.

Users look at a mask before they trust it. Static methods (radial, window, dense) need only the geometry; dynamic
methods get structured synthetic q/k from :mod:`vidsparse.eval.synthetic`.

    vidsparse plan radial --frames 21 --height 30 --width 52 --density 0.3 --png mask.png
    vidsparse plan radial:faithful=true,decay=0.2,strict_tokens=false --block-size 128 --png faithful.png
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from vidsparse.layout import VideoLayout
from vidsparse.methods import PlanContext, build_plan, get_method, parse_method_spec
from vidsparse.plan import BlockPlan, num_blocks


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``plan`` sub-command."""
    parser = subparsers.add_parser(
        "plan",
        help="build a method's block plan for a geometry, print its density and draw the mask",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument("method", help="method name or spec, e.g. radial or radial:faithful=true,decay=0.2")
    parser.add_argument("--frames", type=int, default=21, help="latent frames T' (default 21)")
    parser.add_argument("--height", type=int, default=30, help="latent token rows H' (default 30)")
    parser.add_argument("--width", type=int, default=52, help="latent token columns W' (default 52)")
    parser.add_argument("--text-len", type=int, default=0, help="text tokens in the sequence (default 0)")
    parser.add_argument("--text-position", choices=("after", "before"), default="after")
    parser.add_argument("--block-size", type=int, default=None, help="tokens per block (method default if unset)")
    parser.add_argument("--density", type=float, default=None, help="target density, for methods that take one")
    parser.add_argument(
        "--opt", action="append", default=[], metavar="KEY=VALUE", help="a method option (repeatable), e.g. decay=0.2"
    )
    parser.add_argument("--heads", type=int, default=4, help="synthetic heads for dynamic methods (default 4)")
    parser.add_argument("--head-dim", type=int, default=64, help="synthetic head dim for dynamic methods")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic q/k")
    parser.add_argument("--png", type=Path, default=None, help="draw the video block mask to this PNG")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Plan, print the summary, draw the PNG when asked."""
    name, _, spec_opts = args.method.partition(":")
    options = [o for o in (spec_opts.split(",") if spec_opts else []) + list(args.opt) if o.strip()]
    if args.density is not None:
        options.append(f"density={args.density}")
    if args.block_size is not None:
        options.append(f"block_size={args.block_size}")
    config = parse_method_spec(f"{name}:{','.join(options)}" if options else name)
    layout = VideoLayout(args.frames, args.height, args.width, args.text_len, args.text_position)
    q = k = None
    if not get_method(config.method).static:
        from vidsparse.eval.synthetic import synthetic_qkv

        q, k, _ = synthetic_qkv(layout, heads=args.heads, head_dim=args.head_dim, seed=args.seed)
    start = time.perf_counter()
    plan = build_plan(config, q, k, layout, PlanContext())
    plan_s = time.perf_counter() - start
    for line in summary_lines(plan, layout):
        print(line)
    print(f"config:    {config.to_dict()}")
    print(f"plan time: {plan_s:.2f} s")
    if args.png is not None:
        draw_block_mask(plan, layout, args.png, title=f"{args.method}  {layout.describe()}")
        print(f"mask:      {args.png}")
    return 0


def summary_lines(plan: BlockPlan, layout: VideoLayout) -> list[str]:
    """Layout, density and kept block counts of ``plan`` (video→video blocks), one fact per line."""
    plan.validate()
    vb = num_blocks(layout.num_video_tokens, plan.block_size)
    per_head = plan.density_per_head()
    kept = per_head * vb * vb
    lines = [
        f"layout:    {layout.describe()}",
        f"blocks:    {vb} video blocks of {plan.block_size} tokens ({vb * vb} video block pairs)",
        f"density:   {plan.density():.4f}  (sparsity {1 - plan.density():.4f})",
        f"kept:      {kept.mean():.0f} video block pairs per head (mean over {per_head.numel()} batch x head)",
    ]
    if per_head.numel() > 1:
        lines.append(f"per head:  density {per_head.min():.4f} .. {per_head.max():.4f}")
    if plan.meta:
        lines.append(f"meta:      {plan.meta}")
    return lines


def _frame_of_block(plan: BlockPlan, layout: VideoLayout, vb: int) -> torch.Tensor:
    """Latent frame of the first token of each video block, in plan order: int64 ``[Vb]``."""
    starts = torch.arange(vb) * plan.block_size
    original = starts if plan.perm is None else plan.perm.cpu()[starts] - layout.video_start
    return original // layout.tokens_per_frame


def draw_block_mask(plan: BlockPlan, layout: VideoLayout, path: Path | str, *, title: str = "") -> Path:
    """Draw the video→video block mask of ``plan`` (plan order) with frame boundaries, to a PNG.

    Per-head or per-sample plans are drawn as the fraction of (batch, head) that keep each block pair.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vb = num_blocks(layout.num_video_tokens, plan.block_size)
    mask = plan.block_mask()[:, :, :vb, :vb].float().mean(dim=(0, 1)).cpu().numpy()
    frames = _frame_of_block(plan, layout, vb)
    size = min(12.0, max(4.0, vb / 40))
    fig, ax = plt.subplots(figsize=(size + 1.5, size), dpi=100)
    image = ax.imshow(mask, cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
    if bool((frames[1:] >= frames[:-1]).all()):  # frames contiguous in plan order: mark where each one starts
        for boundary in (torch.nonzero(frames[1:] != frames[:-1]).flatten() + 1).tolist():
            ax.axhline(boundary - 0.5, color="tab:red", linewidth=0.5)
            ax.axvline(boundary - 0.5, color="tab:red", linewidth=0.5)
    ax.set_xlabel("key block (plan order)")
    ax.set_ylabel("query block (plan order)")
    ax.set_title(f"{title}\ndensity {plan.density():.3f}, frame boundaries in red", fontsize=9)
    if plan.kv_num.shape[0] * plan.kv_num.shape[1] > 1:
        fig.colorbar(image, ax=ax, fraction=0.046, label="fraction of heads keeping the block")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path
