"""Sparse-vs-dense quality of every method on one pipeline: the measurement behind the quality regression test.

    from vidsparse.pipelines.offline.shapes import load_shapes_pipeline
    pipe = load_shapes_pipeline()
    rows = method_psnrs(pipe, density=0.5, num_inference_steps=3)   # [{"method", "config", "psnr_db", ...}]

``vidsparse study regression`` prints the rows as JSON for the shipped shapes model at its default render
geometry: run it to (re)measure the floors recorded in ``tests/test_shapes_quality.py``.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import torch

from vidsparse import apply, method_names
from vidsparse.config import SparseConfig
from vidsparse.methods import get_method, parse_method_spec

from .metrics import psnr

#: Prompt of the regression renders.
PROMPT = "a red circle moves right over a plain gray background"


def density_methods() -> list[str]:
    """Registered methods that plan to a target density (``MethodSpec.targets_density``), in registry order."""
    return [name for name in method_names() if get_method(name).targets_density]


def config_at_density(method: str, density: float) -> SparseConfig:
    """The config of ``method`` at ``density``, with its spec's ``density_options`` (MoBA: top-k selection).

    ``method`` is a name (one of :func:`density_methods`) or a CLI spec ``"name:opt=value,..."`` whose options win
    over both (``"cached:search_rows=none"``).
    """
    name, _, options = method.partition(":")
    settings = {"density": density, **get_method(name).density_options}
    defaults = ",".join(f"{key}={value}" for key, value in settings.items())
    spec = f"{name}:{defaults},{options}" if options else f"{name}:{defaults}"
    return parse_method_spec(spec)  # the spec's own options come last and override the defaults


def render(pipe, *, seed: int = 0, prompt: str = PROMPT, **geometry: Any) -> np.ndarray:
    """One clip as float ``[T, H, W, 3]`` in [0, 1] (``geometry``: num_frames, height, width, steps, guidance)."""
    generator = torch.Generator().manual_seed(seed)
    return pipe(prompt, generator=generator, output_type="np", **geometry).frames[0]


def method_psnrs(
    pipe,
    *,
    density: float = 0.5,
    methods: list[str] | None = None,
    seed: int = 0,
    **geometry: Any,
) -> list[dict[str, Any]]:
    """PSNR of each method's render against the dense render of the same seed, prompt and geometry.

    Args:
        pipe: A pipeline ``vidsparse.apply`` supports.
        density: Target density for methods that take one.
        methods: Method names or specs (default: :func:`density_methods`).
        seed: Seed of the initial noise (shared by all renders).
        **geometry: ``num_frames``, ``height``, ``width``, ``num_inference_steps``, ``guidance_scale``.

    Returns:
        One dict per method: ``method``, ``config`` (its fields), ``psnr_db``, ``measured_density`` (mean over the
        sparse calls, from the handle's statistics; ``None`` when no call was sparse), ``seconds``.
    """
    dense = render(pipe, seed=seed, **geometry)
    rows = []
    for name in methods or density_methods():
        config = config_at_density(name, density)
        t0 = time.perf_counter()
        with apply(pipe, config) as handle:
            frames = render(pipe, seed=seed, **geometry)
            summary = handle.summary()
        rows.append(
            {
                "method": name,
                "config": config.to_dict(),
                "psnr_db": round(psnr(frames, dense), 3),
                "measured_density": summary.get("sparse_density"),
                "seconds": round(time.perf_counter() - t0, 1),
            }
        )
    return rows


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Print :func:`method_psnrs` of the shipped shapes model (``--steps N``, default 3) as JSON."""
    import argparse

    from vidsparse.pipelines.offline.shapes import DEFAULT_GEOMETRY, load_shapes_pipeline

    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=3, help="denoising steps of each render")
    parser.add_argument("--density", type=float, default=0.5)
    parser.add_argument("--seeds", type=int, default=1, help="repeat over seeds 0..N-1")
    parser.add_argument(
        "--methods", nargs="+", default=None, metavar="SPEC", help="method names or specs (default: every method)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    pipe = load_shapes_pipeline()
    geometry = {**DEFAULT_GEOMETRY, "num_inference_steps": args.steps}
    for seed in range(args.seeds):
        for row in method_psnrs(pipe, density=args.density, methods=args.methods, seed=seed, **geometry):
            print(json.dumps({"seed": seed, "steps": args.steps, **row}))
    return 0
