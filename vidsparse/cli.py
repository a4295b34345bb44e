"""The ``vidsparse`` command line: one sub-command per module of :mod:`vidsparse.commands`.

Each module there defines ``register(subparsers)``, which adds its parser and sets ``func`` to the function that
runs it; this file only assembles them.
"""

from __future__ import annotations

import argparse
import importlib
import sys

#: Sub-command modules, in the order ``vidsparse --help`` lists them.
COMMAND_MODULES: list[str] = [
    "vidsparse.commands.render",
    "vidsparse.commands.compare",
    "vidsparse.commands.lpips_weights",
    "vidsparse.commands.models",
    "vidsparse.commands.eval",
    "vidsparse.commands.plan",
    "vidsparse.commands.calibrate",
    "vidsparse.commands.bench",
    "vidsparse.commands.study",
    "vidsparse.commands.train_tiny",
    "vidsparse.commands.finetune",
    "vidsparse.commands.env",
]


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser."""
    parser = argparse.ArgumentParser(
        prog="vidsparse",
        description="Block-sparse attention for diffusers video pipelines: render, evaluate, benchmark.",
    )
    from vidsparse import __version__

    parser.add_argument("--version", action="version", version=f"vidsparse {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``vidsparse`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as err:
        # Bad input: one clear line, no traceback, non-zero exit.
        print(f"vidsparse {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Ctrl-C: say what was kept and how to go on, instead of a traceback; 130 is the shell's code for SIGINT.
        hint = INTERRUPTED.get(args.command, "nothing was written.")
        print(f"\nvidsparse {args.command}: interrupted; {hint.format(**vars(args))}", file=sys.stderr)
        return 130


#: What an interrupted command leaves, by command (formatted with its parsed arguments). Every file vidsparse
#: writes is written atomically, so an interrupted write leaves no partial file behind.
INTERRUPTED = {
    "eval": "the runs that finished are kept in {out!r}; run the same command with --resume to continue.",
    "finetune": "the last checkpoint in {out!r} is kept; run the same command with --resume to continue.",
    "calibrate": "nothing was written; run it again.",
    "render": "nothing was written.",
}


if __name__ == "__main__":
    sys.exit(main())
