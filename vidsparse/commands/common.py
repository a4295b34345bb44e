"""Pieces the sub-commands share.

Loading a pipeline (embedded default, tiny, or a real checkpoint), the method options (``--method``, ``--density``,
...), devices and dtypes.
"""

from __future__ import annotations

import argparse

import torch

from vidsparse.config import SparseConfig
from vidsparse.methods import config_from_options, method_names, parse_option_value, split_method_spec
from vidsparse.pipelines.loading import DTYPES

#: Method used when none is given on the command line.
DEFAULT_METHOD = "radial"
#: ``--method`` value that leaves the pipeline untouched (stock diffusers attention).
STOCK = "none"


def step_count(text: str) -> int | float:
    """Parse a step count: ``"2"`` -> 2 steps, ``"0.25"`` -> a quarter of the run's steps."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r} is not a step count (an int, or a fraction like 0.25)") from err


#: Largest ``--height`` / ``--width`` the commands accept, in pixels: above any video model's resolution (Wan 2.2
#: and HunyuanVideo generate up to 1280x720), and a larger one would only fail later as an out-of-memory error.
MAX_PIXELS = 8192


def positive_int(text: str) -> int:
    """The argparse type of counts that must be >= 1 (``--frames``, ``--steps``, ...): ``0`` or ``-3`` are refused.

    argparse names the flag in its message (``argument --frames: ...``) and exits with status 2 before the command
    runs, so nothing is loaded for a bad value.
    """
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer: expected an integer >= 1.") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is invalid: expected an integer >= 1.")
    return value


def pixel_size(text: str) -> int:
    """The argparse type of ``--height`` / ``--width``: an integer in [1, :data:`MAX_PIXELS`]."""
    value = positive_int(text)
    if value > MAX_PIXELS:
        raise argparse.ArgumentTypeError(
            f"{value} is too large: at most {MAX_PIXELS} pixels per side (video models generate up to 1280x720)."
        )
    return value


def add_geometry_args(parser: argparse.ArgumentParser, *, what: str = "the clip", **defaults: int | None) -> None:
    """``--frames --height --width``, checked by :func:`positive_int` / :func:`pixel_size` at parse time.

    ``defaults`` may set ``frames``, ``height``, ``width`` (default None: the model's).
    """

    def shown(name: str) -> str:
        return "the model's" if defaults.get(name) is None else str(defaults[name])

    parser.add_argument(
        "--frames",
        type=positive_int,
        default=defaults.get("frames"),
        help=f"frames of {what} (default: {shown('frames')})",
    )
    for side in ("height", "width"):
        parser.add_argument(
            f"--{side}", type=pixel_size, default=defaults.get(side), help=f"pixels (default: {shown(side)})"
        )


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """``--model --device --dtype --seed``."""
    from vidsparse.pipelines.offline.tiny import default_model_name

    parser.add_argument(
        "--model",
        default=None,
        help=f"'tiny-<name>' (offline pipelines, see `vidsparse models`; default tiny-{default_model_name()}), "
        "or a hub id / local folder of a diffusers pipeline (real checkpoints: your machine, your download)",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: float32 on CPU, bf16 on CUDA")
    parser.add_argument("--seed", type=int, default=0)


def add_lora_arg(parser: argparse.ArgumentParser) -> None:
    """``--lora DIR``: a LoRA folder in diffusers' format (``vidsparse finetune`` writes one) loaded into the model."""
    parser.add_argument(
        "--lora",
        metavar="DIR",
        default=None,
        help="load this LoRA (a `vidsparse finetune` run folder or any diffusers LoRA folder) into the model",
    )


def add_backend_arg(parser: argparse.ArgumentParser, *, default: str | None = None, what: str = "executor") -> None:
    """``--backend NAME``: ``auto`` or one of the executor registry's names (choices and help come from it)."""
    from vidsparse.kernels.registry import backend_names

    parser.add_argument(
        "--backend",
        default=default,
        choices=backend_names(),
        metavar="NAME",
        help=f"{what}: {', '.join(backend_names())}" + (" (default: %(default)s)" if default else ""),
    )


def add_method_args(parser: argparse.ArgumentParser, *, default: str | None = DEFAULT_METHOD) -> None:
    """``--method`` and the shared method options; ``--opt key=value`` for method-specific ones."""
    parser.add_argument(
        "--method",
        default=default,
        help=f"one of: {', '.join(method_names())}, or '{STOCK}' for stock attention; options may follow as "
        "name:key=value,key=value (default: %(default)s)",
    )
    parser.add_argument("--density", type=float, help="target fraction of video block pairs computed, in (0, 1]")
    parser.add_argument("--block-size", type=int, help="64 or 128")
    parser.add_argument("--dense-steps", type=step_count, help="first N steps dense (int) or a fraction (float)")
    parser.add_argument("--dense-last-steps", type=step_count, help="last N steps dense (int) or a fraction")
    parser.add_argument("--dense-layers", type=int, help="first N transformer blocks dense")
    add_backend_arg(parser, what="executor (default: the config's, auto)")
    parser.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE", help="method-specific option")


def method_config(args: argparse.Namespace) -> SparseConfig | None:
    """The config chosen by the method arguments (``None`` for ``--method none``).

    Options come from three places: the ``--method name:key=value`` spec, the shared flags (``--density`` ...) and
    ``--opt key=value``. One given in two places is refused with both named (no silent winner).
    """
    if args.method == STOCK:
        return None
    name, options = split_method_spec(args.method, where=f"--method {args.method!r}")
    for flag in ("density", "block_size", "dense_steps", "dense_last_steps", "dense_layers", "backend"):
        value = getattr(args, flag)
        if value is not None:
            options.append((flag, value, f"--{flag.replace('_', '-')} {value}"))
    for item in args.opt:
        key, eq, value = item.partition("=")
        if not eq or not key.strip() or not value.strip():
            raise ValueError(f"--opt {item!r} is invalid: expected key=value.")
        options.append((key.strip().replace("-", "_"), parse_option_value(value.strip()), f"--opt {item}"))
    return config_from_options(name, options)


def resolve_device(name: str | None) -> torch.device:
    """``--device``: default cuda when available; a clear error when CUDA is asked for but absent."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name!r}: CUDA is not available on this machine; use --device cpu.")
    return device


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """``--dtype``: default float32 on CPU, bfloat16 on CUDA."""
    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]
