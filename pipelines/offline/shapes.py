"""The project's own trained text-to-video model, "shapes", shipped inside the package.

A small ``WanTransformer3DModel`` trained on procedural clips of coloured shapes
(:mod:`vidsparse.pipelines.offline.procedural`) by :mod:`vidsparse.pipelines.training.train_tiny`, on a CPU. Unlike
the random-weight tiny pipelines its attention has the structure of a real video model (local in space and time), so
sparse-vs-dense quality numbers on it mean something.

The weights live in ``pipelines/offline/assets/shapes/`` as a complete diffusers pipeline folder (model_index.json,
transformer/, vae/, scheduler/, text_encoder/, tokenizer/; safetensors). The VAE is the parameter-free
:class:`~vidsparse.pipelines.offline.pixel_vae.PixelShuffleVAE` (config only); the text encoder and tokenizer are saved
too
(a few hundred kB), so the model does not depend on how a library version initialises random weights. The
transformer is a stock ``WanTransformer3DModel`` whose patch embedding also adds fixed absolute position features
(:mod:`~vidsparse.pipelines.offline.positions`, marked by ``absolute_positions.json`` in the folder):
:func:`load_shapes_pipeline` adds them after ``from_pretrained``, so load the model with it.

    from vidsparse.pipelines.offline.shapes import load_shapes_pipeline, DEFAULT_GEOMETRY
    pipe = load_shapes_pipeline()
    video = pipe("a red circle moves right over a plain gray background", **DEFAULT_GEOMETRY).frames[0]
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

#: Folder name of the shipped model under ``vidsparse/pipelines/offline/assets``.
MODEL_NAME = "shapes"

#: Default render settings: 31 frames of 64×64 → 16 latent frames × 16 × 16 tokens = 4096 tokens per
#: self-attention call (the trained model was trained up to this length).
DEFAULT_GEOMETRY: dict[str, Any] = {
    "num_frames": 31,
    "height": 64,
    "width": 64,
    "num_inference_steps": 10,
    "guidance_scale": 4.0,
}


def model_dir() -> Path:
    """Return the shipped pipeline folder inside the installed package."""
    # Next to this file, not importlib.resources: vidsparse.pipelines is a namespace package (see pyproject.toml),
    # and Python 3.11's namespace resource reader cannot serve one mapped from an editable checkout.
    return Path(__file__).resolve().parent / "assets" / MODEL_NAME


@contextmanager
def _quiet_diffusers():
    """Silence diffusers' warnings while loading.

    ``WanPipeline`` annotates its VAE as ``AutoencoderKLWan``; ours has the same interface but another class.
    """
    logger = logging.getLogger("diffusers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def load_shapes_pipeline(
    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, *, path: str | None = None
):
    """Load the trained shapes ``WanPipeline`` with ``from_pretrained`` from the package files (no network).

    Args:
        device: Where to put it.
        dtype: Transformer/text-encoder dtype (the VAE has no weights; it computes in this dtype too).
        path: Another folder in the same format (e.g. a freshly exported training run); default: the shipped one.

    Raises:
        FileNotFoundError: the folder has no ``model_index.json``.
    """
    from diffusers import WanPipeline

    # model_index.json names the VAE and scheduler classes by module; diffusers only loads classes of modules
    # already imported.
    from . import flow_x0, pixel_vae, positions  # noqa: F401

    folder = Path(path) if path is not None else model_dir()
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"{str(folder)!r} holds no model_index.json: not a diffusers pipeline folder.")
    with _quiet_diffusers():
        pipe = WanPipeline.from_pretrained(str(folder), dtype=dtype, local_files_only=True)
    if positions.has_marker(folder):
        positions.add_absolute_positions(pipe.transformer)  # parameter-free: not part of the saved weights
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def build_shapes(seed: int = 0):
    """``TINY_PIPELINES`` builder: the trained pipeline on the CPU (``seed`` is unused: the weights are trained)."""
    del seed
    return load_shapes_pipeline()
