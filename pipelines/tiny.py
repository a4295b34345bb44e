"""Tiny offline pipelines of the real diffusers classes: the trained "shapes" model, and random-weight ones.

"shapes" (the default) loads the project's own trained weights from the package files
(:mod:`vidsparse.pipelines.shapes`). The others are built from configs with deterministic weights. No file is
downloaded: text encoders and tokenizers are built in memory (:mod:`vidsparse.pipelines.text`), every
other component from a config. Their weights are random (from a fixed seed), so the clips are noise-like: these
pipelines exercise the integration (hooks, processors, step counting, masks) exactly as a real checkpoint would.

    pipe = vidsparse.pipelines.tiny.build("wan")
    video = pipe("a red circle moves left", num_frames=9, height=64, width=64, num_inference_steps=4).frames[0]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .shapes import DEFAULT_GEOMETRY as _SHAPES_GEOMETRY
from .shapes import build_shapes
from .text import build_umt5_encoder, build_word_tokenizer

DEFAULT_PROMPT = "a red circle moves left"


@dataclass(frozen=True)
class TinySpec:
    """How to build one tiny pipeline and the render geometry that suits it.

    Attributes:
        name: Name used by ``build(name)`` and ``--model tiny-<name>``.
        builder: ``builder(seed) -> DiffusionPipeline``.
        frames, height, width, steps: Default render geometry (pixels / frames / denoising steps).
        guidance_scale: Default classifier-free guidance scale.
        description: One line for ``vidsparse models``.
        prompt: Example prompt used when none is given.
    """

    name: str
    builder: Callable[[int], Any]
    frames: int
    height: int
    width: int
    steps: int
    guidance_scale: float
    description: str
    prompt: str = DEFAULT_PROMPT


def _seeded(seed: int, fn: Callable[[], Any]) -> Any:
    """Build a module under a private RNG seeded with ``seed`` (the global RNG is left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn()


def _wan_components(seed: int, *, two_experts: bool) -> dict[str, Any]:
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel

    tokenizer = build_word_tokenizer(model_max_length=512)
    text_dim = 32
    text_encoder = build_umt5_encoder(len(tokenizer), text_dim, seed=seed)

    def transformer(offset: int) -> WanTransformer3DModel:
        return _seeded(
            seed + offset,
            lambda: WanTransformer3DModel(
                patch_size=(1, 2, 2),
                num_attention_heads=2,
                attention_head_dim=16,
                in_channels=16,
                out_channels=16,
                text_dim=text_dim,
                freq_dim=32,
                ffn_dim=64,
                num_layers=2,
                cross_attn_norm=True,
                qk_norm="rms_norm_across_heads",
                rope_max_seq_len=64,
            ).eval(),
        )

    vae = _seeded(
        seed + 10,
        lambda: AutoencoderKLWan(
            base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
        ).eval(),
    )
    components = {
        "transformer": transformer(1),
        "vae": vae,
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0),
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
    }
    if two_experts:
        components["transformer_2"] = transformer(2)
        components["boundary_ratio"] = 0.875
    return components


def build_wan(seed: int = 0):
    """A tiny ``WanPipeline`` (Wan 2.1 T2V layout: one transformer)."""
    from diffusers import WanPipeline

    return WanPipeline(**_wan_components(seed, two_experts=False))


def build_wan22(seed: int = 0):
    """A tiny ``WanPipeline`` with two experts (Wan 2.2 A14B layout: ``transformer`` + ``transformer_2``)."""
    from diffusers import WanPipeline

    return WanPipeline(**_wan_components(seed, two_experts=True))


TINY_PIPELINES: dict[str, TinySpec] = {
    # The project's trained model (weights shipped in pipelines/assets/shapes): the default of render and eval.
    "shapes": TinySpec(
        "shapes",
        build_shapes,
        _SHAPES_GEOMETRY["num_frames"],
        _SHAPES_GEOMETRY["height"],
        _SHAPES_GEOMETRY["width"],
        _SHAPES_GEOMETRY["num_inference_steps"],
        _SHAPES_GEOMETRY["guidance_scale"],
        "Wan 2.1 T2V layout trained on procedural shapes clips; 4096 tokens per self-attention call",
        "a red circle moves right over a plain gray background",
    ),
    "wan": TinySpec("wan", build_wan, 17, 128, 128, 8, 5.0, "Wan 2.1 T2V layout, random weights"),
    "wan2.2": TinySpec("wan2.2", build_wan22, 17, 128, 128, 8, 5.0, "Wan 2.2 A14B two-expert layout, random weights"),
}


def tiny_names() -> list[str]:
    """Names accepted by :func:`build`."""
    return list(TINY_PIPELINES)


def get_spec(name: str) -> TinySpec:
    """The :class:`TinySpec` of ``name``; ``ValueError`` listing the names otherwise."""
    if name not in TINY_PIPELINES:
        raise ValueError(f"tiny pipeline {name!r} is unknown; available: {', '.join(TINY_PIPELINES)}.")
    return TINY_PIPELINES[name]


def default_model_name() -> str:
    """The embedded default model of ``vidsparse render`` / ``eval``: the first entry of :data:`TINY_PIPELINES`."""
    return next(iter(TINY_PIPELINES))


def defaults_for(model: str) -> TinySpec:
    """Render defaults for ``--model``: the tiny spec's for ``tiny-<name>``; Wan-like 480p defaults otherwise."""
    if model.startswith("tiny-"):
        return get_spec(model[len("tiny-") :])
    return TinySpec(model, lambda seed: None, 33, 480, 832, 30, 5.0, "checkpoint", DEFAULT_PROMPT)


def build(name: str | None = None, seed: int = 0):
    """Build the tiny pipeline ``name`` (default: the embedded default) with weights from ``seed``, on the CPU."""
    return get_spec(name or default_model_name()).builder(seed)
