"""``vidsparse env``: the versions this installation runs with, to paste into a bug report.

vidsparse env            # one "name: version" line each
vidsparse env --json     # the same, machine-readable

Versions come from the installed distributions' metadata (nothing heavy is imported), so the command works even
where a dependency is missing or broken: that dependency prints as "not installed".
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import sys

#: Distributions whose versions decide how vidsparse behaves, in the order printed.
DISTRIBUTIONS: tuple[str, ...] = (
    "vidsparse",
    "torch",
    "diffusers",
    "transformers",
    "triton",
    "accelerate",
    "peft",
    "safetensors",
    "numpy",
    "lpips",
    "imageio-ffmpeg",
)


def environment_versions() -> dict[str, str]:
    """``{name: version}`` for Python, the platform, every distribution in :data:`DISTRIBUTIONS` and torch's CUDA."""
    versions = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in DISTRIBUTIONS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    if versions["torch"] != "not installed":
        import torch

        versions["torch cuda build"] = str(torch.version.cuda)
        versions["cuda devices"] = str(torch.cuda.device_count() if torch.cuda.is_available() else 0)
    return versions


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``env`` sub-command."""
    p = sub.add_parser(
        "env",
        help="print the versions of Python, torch, diffusers, transformers, triton, ... (for bug reports)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--json", action="store_true", help="print the versions as a JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the versions."""
    versions = environment_versions()
    if args.json:
        print(json.dumps(versions, indent=2))
    else:
        width = max(map(len, versions))
        for name, version in versions.items():
            print(f"{name + ':':<{width + 1}} {version}")
    return 0
