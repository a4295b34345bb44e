"""Tiny offline pipelines of the real diffusers classes: the trained "shapes" model, and random-weight ones.

"shapes" (the default) loads the project's own trained weights from the package files
(:mod:`vidsparse.pipelines.offline.shapes`). The others are built from configs with deterministic weights. No file is
downloaded: text encoders and tokenizers are built in memory (:mod:`vidsparse.pipelines.offline.text`), every
other component from a config. Their weights are random (from a fixed seed), so the clips are noise-like: these
pipelines exercise the integration (hooks, processors, step counting, masks) exactly as a real checkpoint would.

    pipe = vidsparse.pipelines.offline.tiny.build("wan")
    video = pipe("a red circle moves left", num_frames=9, height=64, width=64, num_inference_steps=4).frames[0]

One per model family (``tiny_names()``): ``wan``, ``wan2.2`` (two experts), ``wan_i2v``, ``skyreels_v2``,
``skyreels_v2_df`` (diffusion forcing), ``cogvideox``, ``cogvideox_1.5``, ``hunyuan_video``, ``hunyuan_video_1.5``,
``ltx``, ``mochi``. Some need extra call arguments (short text lengths, a prompt template, an I2V image): the spec's
``call_kwargs`` / ``inputs``, which :func:`vidsparse.pipelines.support.generation_kwargs` adds for you.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .shapes import DEFAULT_GEOMETRY as _SHAPES_GEOMETRY
from .shapes import build_shapes
from .text import (
    build_clip_text_encoder,
    build_clip_vision_encoder,
    build_llama_encoder,
    build_qwen25vl_text_encoder,
    build_t5_encoder,
    build_umt5_encoder,
    build_word_tokenizer,
    seeded_model,
)

DEFAULT_PROMPT = "a red circle moves left"

#: Every tiny transformer uses 2 heads of 16 channels: the attention shapes (and so the executors' compiled kernels)
#: are comparable across families.
HEADS, HEAD_DIM = 2, 16


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
        family: Name of the adapter serving the pipeline's transformer (see ``vidsparse.pipelines.registry.ADAPTERS``).
        call_kwargs: Extra keyword arguments every call of this pipeline needs (prompt templates, short text
            lengths, ...), merged under the caller's own.
        inputs: Optional ``inputs(height, width) -> dict`` of conditioning inputs (e.g. the image of an I2V
            pipeline).
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
    family: str = "wan"
    call_kwargs: dict[str, Any] = field(default_factory=dict)
    inputs: Callable[[int, int], dict[str, Any]] | None = None


def _seeded(seed: int, fn: Callable[[], Any]) -> Any:
    """Build a module under a private RNG seeded with ``seed`` (the global RNG is left untouched)."""
    return seeded_model(fn, seed)


# ------------------------------------------------------------------------------------------------ Wan, SkyReels
def _wan_vae(seed: int):
    from diffusers import AutoencoderKLWan

    return _seeded(
        seed,
        lambda: AutoencoderKLWan(
            base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
        ),
    )


def _wan_transformer_kwargs(text_dim: int) -> dict[str, Any]:
    return dict(
        patch_size=(1, 2, 2),
        num_attention_heads=HEADS,
        attention_head_dim=HEAD_DIM,
        in_channels=16,
        out_channels=16,
        text_dim=text_dim,
        freq_dim=32,
        ffn_dim=64,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=64,
    )


def _wan_components(seed: int, *, two_experts: bool) -> dict[str, Any]:
    from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel

    tokenizer = build_word_tokenizer(model_max_length=512)
    text_dim = 32
    text_encoder = build_umt5_encoder(len(tokenizer), text_dim, seed=seed)

    def transformer(offset: int) -> WanTransformer3DModel:
        return _seeded(seed + offset, lambda: WanTransformer3DModel(**_wan_transformer_kwargs(text_dim)))

    components = {
        "transformer": transformer(1),
        "vae": _wan_vae(seed + 10),
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


def build_wan_i2v(seed: int = 0):
    """A tiny ``WanImageToVideoPipeline`` in the Wan 2.1 I2V layout.

    A CLIP vision encoder feeds image tokens to every ``attn2`` through its extra key/value projections
    (``image_dim`` / ``added_kv_proj_dim``); the latent input carries the encoded first frame and its mask
    (16 + 4 + 16 = 36 channels).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline, WanTransformer3DModel

    tokenizer = build_word_tokenizer(model_max_length=512)
    text_dim, image_dim = 32, 16
    kwargs = _wan_transformer_kwargs(text_dim) | dict(
        in_channels=36, image_dim=image_dim, added_kv_proj_dim=HEADS * HEAD_DIM
    )
    image_encoder, image_processor = build_clip_vision_encoder(image_dim, 32, seed=seed + 20)
    return WanImageToVideoPipeline(
        tokenizer=tokenizer,
        text_encoder=build_umt5_encoder(len(tokenizer), text_dim, seed=seed),
        vae=_wan_vae(seed + 10),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        image_processor=image_processor,
        image_encoder=image_encoder,
        transformer=_seeded(seed + 1, lambda: WanTransformer3DModel(**kwargs)),
    )


def example_image(height: int, width: int):
    """A deterministic RGB gradient image (PIL) of ``height`` x ``width`` pixels: the I2V pipelines' first frame."""
    from PIL import Image

    y = torch.linspace(0, 1, height)[:, None].expand(height, width)
    x = torch.linspace(0, 1, width)[None, :].expand(height, width)
    rgb = torch.stack([x, y, 1 - x * y], dim=-1)
    return Image.fromarray((rgb * 255).round().to(torch.uint8).numpy())


def _image_inputs(height: int, width: int) -> dict[str, Any]:
    return {"image": example_image(height, width)}


def _skyreels_components(seed: int, *, frames_per_block: int = 1) -> dict[str, Any]:
    from diffusers import SkyReelsV2Transformer3DModel, UniPCMultistepScheduler

    tokenizer = build_word_tokenizer(model_max_length=512)
    text_dim = 32
    kwargs = _wan_transformer_kwargs(text_dim) | dict(num_frame_per_block=frames_per_block)
    return {
        "tokenizer": tokenizer,
        "text_encoder": build_umt5_encoder(len(tokenizer), text_dim, seed=seed),
        "transformer": _seeded(seed + 1, lambda: SkyReelsV2Transformer3DModel(**kwargs)),
        "vae": _wan_vae(seed + 10),
        "scheduler": UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0),
    }


def build_skyreels_v2(seed: int = 0):
    """A tiny ``SkyReelsV2Pipeline`` (text-to-video, Wan-like blocks)."""
    from diffusers import SkyReelsV2Pipeline

    return SkyReelsV2Pipeline(**_skyreels_components(seed))


def build_skyreels_v2_df(seed: int = 0):
    """A tiny ``SkyReelsV2DiffusionForcingPipeline``.

    Its self-attention gets the block-causal diffusion-forcing mask (blocks of 2 latent frames).
    """
    from diffusers import SkyReelsV2DiffusionForcingPipeline

    return SkyReelsV2DiffusionForcingPipeline(**_skyreels_components(seed, frames_per_block=2))


# ---------------------------------------------------------------------------------------------------- CogVideoX
def _build_cogvideox(seed: int, *, temporal_patch: int | None):
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel

    tokenizer = build_word_tokenizer(model_max_length=226)
    text_dim = 32
    transformer = _seeded(
        seed + 1,
        lambda: CogVideoXTransformer3DModel(
            num_attention_heads=HEADS,
            attention_head_dim=HEAD_DIM,
            in_channels=4,
            out_channels=4,
            time_embed_dim=8,
            text_embed_dim=text_dim,
            num_layers=2,
            # The rotary grid of the 1.5 layout is cropped from the sample size: it must cover the latent grid.
            sample_width=16 if temporal_patch is None else 64,
            sample_height=16 if temporal_patch is None else 64,
            sample_frames=9,
            patch_size=2,
            patch_size_t=temporal_patch,
            temporal_compression_ratio=4,
            max_text_seq_length=16,
            use_rotary_positional_embeddings=True,
        ),
    )
    vae = _seeded(
        seed + 10,
        lambda: AutoencoderKLCogVideoX(
            block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1, norm_num_groups=2
        ),
    )
    return CogVideoXPipeline(
        tokenizer=tokenizer,
        text_encoder=build_t5_encoder(len(tokenizer), text_dim, seed=seed),
        vae=vae,
        transformer=transformer,
        # The released CogVideoX scheduler settings (v-prediction, zero terminal SNR, trailing timesteps).
        scheduler=CogVideoXDDIMScheduler(
            beta_schedule="scaled_linear",
            beta_start=0.00085,
            beta_end=0.012,
            prediction_type="v_prediction",
            rescale_betas_zero_snr=True,
            timestep_spacing="trailing",
        ),
    )


def build_cogvideox(seed: int = 0):
    """A tiny ``CogVideoXPipeline`` (CogVideoX 1.0 layout: text first in joint attention, rotary embeddings)."""
    return _build_cogvideox(seed, temporal_patch=None)


def build_cogvideox15(seed: int = 0):
    """A tiny ``CogVideoXPipeline`` in the CogVideoX 1.5 layout (temporal patch ``patch_size_t=2``)."""
    return _build_cogvideox(seed, temporal_patch=2)


# ------------------------------------------------------------------------------------------------ HunyuanVideo
def build_hunyuan_video(seed: int = 0):
    """A tiny ``HunyuanVideoPipeline``: video first, padded text after, one dual- and one single-stream block."""
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoPipeline,
        HunyuanVideoTransformer3DModel,
    )

    tokenizer = build_word_tokenizer(model_max_length=256, bos=True)
    tokenizer_2 = build_word_tokenizer(model_max_length=77, bos=True)
    text_dim, pooled_dim = 16, 8
    transformer = _seeded(
        seed + 1,
        lambda: HunyuanVideoTransformer3DModel(
            in_channels=4,
            out_channels=4,
            num_attention_heads=HEADS,
            attention_head_dim=HEAD_DIM,
            num_layers=1,
            num_single_layers=1,
            num_refiner_layers=1,
            patch_size=2,
            patch_size_t=1,
            guidance_embeds=True,
            text_embed_dim=text_dim,
            pooled_projection_dim=pooled_dim,
            rope_axes_dim=(4, 6, 6),
        ),
    )
    vae = _seeded(
        seed + 10,
        lambda: AutoencoderKLHunyuanVideo(
            latent_channels=4,
            down_block_types=("HunyuanVideoDownBlock3D",) * 4,
            up_block_types=("HunyuanVideoUpBlock3D",) * 4,
            block_out_channels=(8, 8, 8, 8),
            layers_per_block=1,
            norm_num_groups=4,
            spatial_compression_ratio=8,
            temporal_compression_ratio=4,
        ),
    )
    return HunyuanVideoPipeline(
        text_encoder=build_llama_encoder(len(tokenizer), text_dim, seed=seed),
        tokenizer=tokenizer,
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder_2=build_clip_text_encoder(len(tokenizer_2), pooled_dim, seed=seed + 2),
        tokenizer_2=tokenizer_2,
    )


#: A chat template that keeps only the user's words (the real one wraps them in a system prompt that the pipeline
#: crops away again).
_USER_ONLY_CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}{% endif %}{% endfor %}"
)


def build_hunyuan_video15(seed: int = 0):
    """A tiny ``HunyuanVideo15Pipeline``: video first, then image, ByT5 and MLLM text tokens with a padding mask.

    The real pipeline reserves 729 image tokens, 256 ByT5 and 1000 MLLM tokens; the tiny one shortens them (8, 8,
    16) through the pipeline's own attributes so the sequence stays small.
    """
    from diffusers import (
        AutoencoderKLHunyuanVideo15,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideo15Pipeline,
        HunyuanVideo15Transformer3DModel,
    )
    from diffusers.guiders import ClassifierFreeGuidance
    from transformers import ByT5Tokenizer

    tokenizer = build_word_tokenizer(model_max_length=1024, chat_template=_USER_ONLY_CHAT_TEMPLATE)
    tokenizer_2 = ByT5Tokenizer()
    text_dim, byt5_dim, image_dim = 16, 16, 12
    transformer = _seeded(
        seed + 1,
        lambda: HunyuanVideo15Transformer3DModel(
            in_channels=9,
            out_channels=4,
            num_attention_heads=HEADS,
            attention_head_dim=HEAD_DIM,
            num_layers=2,
            num_refiner_layers=1,
            mlp_ratio=2.0,
            patch_size=1,
            patch_size_t=1,
            text_embed_dim=text_dim,
            text_embed_2_dim=byt5_dim,
            image_embed_dim=image_dim,
            rope_axes_dim=(4, 6, 6),
            target_size=128,
            task_type="t2v",
        ),
    )
    vae = _seeded(
        seed + 10,
        lambda: AutoencoderKLHunyuanVideo15(
            latent_channels=4,
            block_out_channels=(8, 8, 8, 8, 8),
            layers_per_block=1,
            spatial_compression_ratio=16,
            temporal_compression_ratio=4,
            downsample_match_channel=False,
            upsample_match_channel=False,
        ),
    )
    pipe = HunyuanVideo15Pipeline(
        text_encoder=build_qwen25vl_text_encoder(len(tokenizer), text_dim, seed=seed),
        tokenizer=tokenizer,
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder_2=build_t5_encoder(len(tokenizer_2), byt5_dim, seed=seed + 2),
        tokenizer_2=tokenizer_2,
        guider=ClassifierFreeGuidance(guidance_scale=6.0),
    )
    pipe.prompt_template_encode_start_idx = 0
    pipe.tokenizer_max_length = 16
    pipe.tokenizer_2_max_length = 8
    pipe.vision_num_semantic_tokens = 8
    return pipe


# ------------------------------------------------------------------------------------------------------ LTX-Video
def build_ltx(seed: int = 0):
    """A tiny ``LTXPipeline``: pre-packed latents, self-attention ``attn1`` and cross-attention ``attn2``."""
    from diffusers import (
        AutoencoderKLLTXVideo,
        FlowMatchEulerDiscreteScheduler,
        LTXPipeline,
        LTXVideoTransformer3DModel,
    )

    tokenizer = build_word_tokenizer(model_max_length=128)
    text_dim = 32
    transformer = _seeded(
        seed + 1,
        lambda: LTXVideoTransformer3DModel(
            in_channels=8,
            out_channels=8,
            patch_size=1,
            patch_size_t=1,
            num_attention_heads=HEADS,
            attention_head_dim=HEAD_DIM,
            cross_attention_dim=HEADS * HEAD_DIM,
            num_layers=2,
            caption_channels=text_dim,
        ),
    )
    vae = _seeded(
        seed + 10,
        lambda: AutoencoderKLLTXVideo(
            latent_channels=8,
            block_out_channels=(8, 8, 8, 8),
            decoder_block_out_channels=(8, 8, 8, 8),
            layers_per_block=(1, 1, 1, 1, 1),
            decoder_layers_per_block=(1, 1, 1, 1, 1),
            # Three 2x2x2 scalings: 8x8x8 compression (the real VAE is 8x32x32 with a 4x4 patch).
            spatio_temporal_scaling=(True, True, True, False),
            decoder_spatio_temporal_scaling=(True, True, True, False),
            decoder_inject_noise=(False, False, False, False, False),
            upsample_residual=(False, False, False, False),
            upsample_factor=(1, 1, 1, 1),
            timestep_conditioning=False,
            patch_size=1,
            patch_size_t=1,
            encoder_causal=True,
            decoder_causal=False,
        ),
    )
    return LTXPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=build_t5_encoder(len(tokenizer), text_dim, seed=seed),
        tokenizer=tokenizer,
        transformer=transformer,
    )


# ----------------------------------------------------------------------------------------------------------- Mochi
def build_mochi(seed: int = 0):
    """A tiny ``MochiPipeline``: joint attention with only each sample's valid text tokens."""
    from diffusers import AutoencoderKLMochi, FlowMatchEulerDiscreteScheduler, MochiPipeline, MochiTransformer3DModel

    tokenizer = build_word_tokenizer(model_max_length=256)
    text_dim = 32

    def transformer():
        model = MochiTransformer3DModel(
            patch_size=2,
            num_attention_heads=HEADS,
            attention_head_dim=HEAD_DIM,
            num_layers=2,
            pooled_projection_dim=16,
            in_channels=12,
            qk_norm="rms_norm",
            text_embed_dim=text_dim,
            time_embed_dim=4,
            activation_fn="swiglu",
            max_sequence_length=24,
        )
        # The model initialises its learned RoPE frequencies to zero (an identity rotation); random ones make the
        # tiny model's attention position-dependent, as a trained checkpoint's is.
        with torch.no_grad():
            model.pos_frequencies.normal_(0.0, 0.5)
        return model

    vae = _seeded(
        seed + 10,
        lambda: AutoencoderKLMochi(
            latent_channels=12,
            out_channels=3,
            # The Mochi VAE's group norms have 32 groups: 32 channels is its smallest width.
            encoder_block_out_channels=(32, 32, 32, 32),
            decoder_block_out_channels=(32, 32, 32, 32),
            layers_per_block=(1, 1, 1, 1, 1),
        ),
    )
    return MochiPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=build_t5_encoder(len(tokenizer), text_dim, seed=seed),
        tokenizer=tokenizer,
        transformer=_seeded(seed + 1, transformer),
    )


def _spec(name: str, builder, family: str, description: str, **kw: Any) -> TinySpec:
    geometry = dict(frames=17, height=128, width=176, steps=8, guidance_scale=5.0) | kw
    return TinySpec(name=name, builder=builder, description=description, family=family, **geometry)


TINY_PIPELINES: dict[str, TinySpec] = {
    spec.name: spec
    for spec in [
        # The project's trained model (weights in pipelines/offline/assets/shapes): the default of render and eval.
        TinySpec(
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
        TinySpec("wan", build_wan, 17, 128, 128, 8, 5.0, "Wan 2.1 T2V layout, random weights"),
        TinySpec("wan2.2", build_wan22, 17, 128, 128, 8, 5.0, "Wan 2.2 A14B two-expert layout, random weights"),
        _spec(
            "wan_i2v",
            build_wan_i2v,
            "wan",
            "Wan 2.1 I2V layout (CLIP image tokens in attn2), random weights",
            inputs=_image_inputs,
        ),
        _spec("skyreels_v2", build_skyreels_v2, "skyreels_v2", "SkyReels-V2 T2V layout, random weights"),
        _spec(
            "skyreels_v2_df",
            build_skyreels_v2_df,
            "skyreels_v2",
            "SkyReels-V2 diffusion forcing (block-causal self-attention mask), random weights",
            frames=13,
            call_kwargs={"causal_block_size": 2, "base_num_frames": 13},
        ),
        _spec(
            "cogvideox",
            build_cogvideox,
            "cogvideox",
            "CogVideoX 1.0 layout (text first, rotary), random weights",
            guidance_scale=6.0,
            call_kwargs={"max_sequence_length": 16},
        ),
        _spec(
            "cogvideox_1.5",
            build_cogvideox15,
            "cogvideox",
            "CogVideoX 1.5 layout (temporal patch 2), random weights",
            frames=25,
            guidance_scale=6.0,
            call_kwargs={"max_sequence_length": 16},
        ),
        _spec(
            "hunyuan_video",
            build_hunyuan_video,
            "hunyuan_video",
            "HunyuanVideo layout (video first, padded text; dual + single stream), random weights",
            call_kwargs={"prompt_template": {"template": "{}", "crop_start": 0}, "max_sequence_length": 24},
        ),
        _spec(
            "hunyuan_video_1.5",
            build_hunyuan_video15,
            "hunyuan_video_1.5",
            "HunyuanVideo 1.5 layout (video first, image/ByT5/MLLM text with padding), random weights",
        ),
        _spec(
            "ltx",
            build_ltx,
            "ltx",
            "LTX-Video layout (pre-packed latents, attn1 self / attn2 cross), random weights",
            frames=33,
            height=64,
            width=96,
            guidance_scale=3.0,
            call_kwargs={"max_sequence_length": 24},
        ),
        _spec(
            "mochi",
            build_mochi,
            "mochi",
            "Mochi layout (joint attention over valid text only), random weights",
            frames=25,
            guidance_scale=4.5,
            call_kwargs={"max_sequence_length": 24},
        ),
    ]
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
