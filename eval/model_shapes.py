"""Transformer configs of real checkpoints, their published video shapes, and random-weight models built from them.

The end-to-end benchmark (``vidsparse bench e2e --config NAME``) needs what a user of a real checkpoint runs: the
checkpoint's widths (heads, head size, feed-forward size, text width), its depth, and the token count of the
resolution and frame count it was published for. The values below are the ``transformer/config.json`` of each hub
repository (``source``), written here so that nothing is downloaded: the model is the real diffusers class built
from them with random weights. ``--layers N`` keeps every width and only cuts the depth; the attention share of a
step is a per-layer property (every block has the same shape), so a few layers measure it.

Token counts follow from the VAE compression and the patch size: e.g. Wan 2.1 at 832x480, 81 frames: latent
21 x 60 x 104, patch 1x2x2 -> 21 x 30 x 52 = 32 760 tokens; at 1280x720: 21 x 45 x 80 = 75 600.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class ModelShape:
    """A real checkpoint's transformer and the video shape it was published for.

    Attributes:
        name: The ``--config`` name.
        source: Hub repository id whose ``transformer/config.json`` the values come from.
        model_class: The diffusers transformer class.
        config: Its constructor arguments (the published config.json, without ``_class_name``/``_diffusers_version``).
        resolution: Width x height x frames in pixels of the published shape (for the report).
        grid: Latent token grid (T', H', W') of that shape, after VAE compression and patchify.
        text_tokens: Text tokens the pipeline passes (padded length).
        steps: The pipeline's default number of denoising steps (the schedule the warm-up is counted over).
        shift: Flow-matching shift of the default scheduler (timesteps of the schedule, for ``dense_above_timestep``).
        depth_keys: Config keys holding the block counts; ``--layers N`` sets the first to N and scales the others
            by their published ratio to it (HunyuanVideo: 20 double- and 40 single-stream blocks -> N and 2N).
    """

    name: str
    source: str
    model_class: str
    config: dict[str, Any]
    resolution: str
    grid: tuple[int, int, int]
    text_tokens: int
    steps: int = 50
    shift: float = 1.0
    depth_keys: tuple[str, ...] = ("num_layers",)
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def tokens(self) -> int:
        """Video tokens per self-attention call at the published shape."""
        return self.grid[0] * self.grid[1] * self.grid[2]

    @property
    def depth(self) -> int:
        """Sparsifiable self-attention layers of the full model (all block kinds together)."""
        return sum(int(self.config[key]) for key in self.depth_keys)

    def config_with_layers(self, layers: int | None) -> dict[str, Any]:
        """The constructor arguments with the depth cut to ``layers`` (None: the full model)."""
        config = dict(self.config)
        if layers is None:
            return config
        first = int(self.config[self.depth_keys[0]])
        for key in self.depth_keys:
            config[key] = max(1, round(layers * int(self.config[key]) / first)) if key != self.depth_keys[0] else layers
        return config


_WAN_COMMON = {
    "patch_size": (1, 2, 2),
    "attention_head_dim": 128,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "image_dim": None,
    "added_kv_proj_dim": None,
    "rope_max_seq_len": 1024,
}

MODEL_SHAPES: dict[str, ModelShape] = {
    s.name: s
    for s in [
        ModelShape(
            "wan2.1-1.3b",
            "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
            "WanTransformer3DModel",
            {**_WAN_COMMON, "num_attention_heads": 12, "ffn_dim": 8960, "num_layers": 30},
            "832x480x81",
            (21, 30, 52),
            512,
            shift=3.0,
        ),
        ModelShape(
            "wan2.1-14b",
            "Wan-AI/Wan2.1-T2V-14B-Diffusers",
            "WanTransformer3DModel",
            {**_WAN_COMMON, "num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40},
            "1280x720x81",
            (21, 45, 80),
            512,
            shift=5.0,
        ),
        ModelShape(
            "wan2.1-14b-480p",
            "Wan-AI/Wan2.1-T2V-14B-Diffusers",
            "WanTransformer3DModel",
            {**_WAN_COMMON, "num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40},
            "832x480x81",
            (21, 30, 52),
            512,
            shift=3.0,
        ),
        ModelShape(
            "wan2.2-5b",
            "Wan-AI/Wan2.2-TI2V-5B-Diffusers",
            "WanTransformer3DModel",
            {
                **_WAN_COMMON,
                "num_attention_heads": 24,
                "ffn_dim": 14336,
                "num_layers": 30,
                "in_channels": 48,
                "out_channels": 48,
            },
            "1280x704x121",  # VAE 4x16x16: latent 31 x 44 x 80, patch 1x2x2
            (31, 22, 40),
            512,
            shift=5.0,
        ),
        ModelShape(
            "hunyuanvideo",
            "hunyuanvideo-community/HunyuanVideo",
            "HunyuanVideoTransformer3DModel",
            {
                "in_channels": 16,
                "out_channels": 16,
                "num_attention_heads": 24,
                "attention_head_dim": 128,
                "num_layers": 20,
                "num_single_layers": 40,
                "num_refiner_layers": 2,
                "mlp_ratio": 4.0,
                "patch_size": 2,
                "patch_size_t": 1,
                "qk_norm": "rms_norm",
                "guidance_embeds": True,
                "text_embed_dim": 4096,
                "pooled_projection_dim": 768,
                "rope_theta": 256.0,
                "rope_axes_dim": (16, 56, 56),
            },
            "1280x720x129",  # VAE 4x8x8: latent 33 x 90 x 160, patch 1x2x2
            (33, 45, 80),
            256,
            shift=7.0,
            depth_keys=("num_layers", "num_single_layers"),
        ),
        ModelShape(
            "cogvideox-5b",
            "THUDM/CogVideoX-5b",
            "CogVideoXTransformer3DModel",
            {
                "num_attention_heads": 48,
                "attention_head_dim": 64,
                "in_channels": 16,
                "out_channels": 16,
                "flip_sin_to_cos": True,
                "freq_shift": 0,
                "time_embed_dim": 512,
                "text_embed_dim": 4096,
                "num_layers": 42,
                "dropout": 0.0,
                "attention_bias": True,
                "sample_width": 90,
                "sample_height": 60,
                "sample_frames": 49,
                "patch_size": 2,
                "temporal_compression_ratio": 4,
                "max_text_seq_length": 226,
                "activation_fn": "gelu-approximate",
                "timestep_activation_fn": "silu",
                "norm_elementwise_affine": True,
                "norm_eps": 1e-5,
                "spatial_interpolation_scale": 1.875,
                "temporal_interpolation_scale": 1.0,
                "use_rotary_positional_embeddings": True,
                "use_learned_positional_embeddings": False,
            },
            "720x480x49",  # VAE 4x8x8: latent 13 x 60 x 90, patch 2x2
            (13, 30, 45),
            226,
            notes=("the rotary embeddings the pipeline computes are not passed (their cost is outside attention)",),
        ),
        ModelShape(
            "ltx-video",
            "Lightricks/LTX-Video",
            "LTXVideoTransformer3DModel",
            {
                "in_channels": 128,
                "out_channels": 128,
                "patch_size": 1,
                "patch_size_t": 1,
                "num_attention_heads": 32,
                "attention_head_dim": 64,
                "cross_attention_dim": 2048,
                "num_layers": 28,
                "activation_fn": "gelu-approximate",
                "qk_norm": "rms_norm_across_heads",
                "norm_elementwise_affine": False,
                "norm_eps": 1e-6,
                "caption_channels": 4096,
                "attention_bias": True,
                "attention_out_bias": True,
            },
            "704x512x161",  # LTXPipeline's defaults; VAE 8x32x32: latent 21 x 16 x 22, no patchify
            (21, 16, 22),
            128,
        ),
        ModelShape(
            "mochi",
            "genmo/mochi-1-preview",
            "MochiTransformer3DModel",
            {
                "patch_size": 2,
                "num_attention_heads": 24,
                "attention_head_dim": 128,
                "num_layers": 48,
                "pooled_projection_dim": 1536,
                "in_channels": 12,
                "out_channels": None,
                "qk_norm": "rms_norm",
                "text_embed_dim": 4096,
                "time_embed_dim": 256,
                "activation_fn": "swiglu",
                "max_sequence_length": 256,
            },
            "848x480x163",  # the model card's 5.4 s at 30 fps; VAE 6x8x8: latent 28 x 60 x 106, patch 2x2
            (28, 30, 53),
            256,
            steps=64,
        ),
    ]
}


def get_shape(name: str) -> ModelShape:
    """The :class:`ModelShape` called ``name``; ``ValueError`` listing the names otherwise."""
    if name not in MODEL_SHAPES:
        raise ValueError(f"--config {name!r} is unknown: expected one of {', '.join(MODEL_SHAPES)}.")
    return MODEL_SHAPES[name]


def build_model(shape: ModelShape, layers: int | None, *, seed: int = 0) -> torch.nn.Module:
    """The diffusers transformer of ``shape`` with random weights, cut to ``layers`` blocks, in eval mode."""
    import diffusers

    torch.manual_seed(seed)
    return getattr(diffusers, shape.model_class)(**shape.config_with_layers(layers)).eval()


def latent_size(shape: ModelShape, model: torch.nn.Module, grid: tuple[int, int, int]) -> tuple[int, int, int]:
    """Latent (frames, height, width) before patchify for a token ``grid`` (the patch size times the grid)."""
    config = model.config
    p = config.patch_size
    pt, ph, pw = (
        (int(x) for x in p) if isinstance(p, list | tuple) else (getattr(config, "patch_size_t", None) or 1, p, p)
    )
    return grid[0] * pt, grid[1] * ph, grid[2] * pw


def forward_inputs(
    shape: ModelShape,
    model: torch.nn.Module,
    grid: tuple[int, int, int],
    *,
    device: torch.device,
    dtype: torch.dtype,
    seed: int = 0,
) -> dict[str, Any]:
    """Keyword arguments of one denoiser call (batch 1, random latents and text) for a token ``grid``.

    ``timestep`` is included (500); the caller replaces it per step. Every family's own layout: 5-D latents
    ``[B, C, F, H, W]`` (Wan, HunyuanVideo, Mochi), ``[B, F, C, H, W]`` (CogVideoX), pre-packed ``[B, S, C]`` with
    the latent sizes as arguments (LTX).
    """
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    frames, height, width = latent_size(shape, model, grid)

    def rand(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=g).to(device=device, dtype=dtype)

    text_dim = cfg.get("text_dim") or cfg.get("text_embed_dim") or cfg.get("caption_channels")
    text = rand(1, shape.text_tokens, text_dim)
    mask = torch.ones(1, shape.text_tokens, dtype=torch.bool, device=device)
    timestep = torch.tensor([500.0], device=device)
    kind = shape.model_class
    if kind == "WanTransformer3DModel":
        return dict(
            hidden_states=rand(1, cfg.in_channels, frames, height, width),
            timestep=timestep,
            encoder_hidden_states=text,
        )
    if kind == "CogVideoXTransformer3DModel":
        return dict(
            hidden_states=rand(1, frames, cfg.in_channels, height, width),
            timestep=timestep.long(),
            encoder_hidden_states=text,
        )
    if kind == "HunyuanVideoTransformer3DModel":
        return dict(
            hidden_states=rand(1, cfg.in_channels, frames, height, width),
            timestep=timestep,
            encoder_hidden_states=text,
            encoder_attention_mask=mask,
            pooled_projections=rand(1, cfg.pooled_projection_dim),
            guidance=torch.tensor([6000.0], device=device),
        )
    if kind == "LTXVideoTransformer3DModel":
        return dict(
            hidden_states=rand(1, frames * height * width, cfg.in_channels),
            timestep=timestep,
            encoder_hidden_states=text,
            encoder_attention_mask=mask,
            num_frames=frames,
            height=height,
            width=width,
            rope_interpolation_scale=(8 / 25, 32, 32),
        )
    if kind == "MochiTransformer3DModel":
        return dict(
            hidden_states=rand(1, cfg.in_channels, frames, height, width),
            timestep=timestep,
            encoder_hidden_states=text,
            encoder_attention_mask=mask,
        )
    raise ValueError(f"no inputs known for {kind}")


def schedule_timesteps(steps: int, shift: float) -> list[float]:
    """Timesteps (0..1000) of a flow-matching schedule of ``steps`` steps with ``shift`` (diffusers' formula)."""
    sigmas = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64)
    shifted = shift * sigmas / (1 + (shift - 1) * sigmas)
    return [float(1000 * s) for s in shifted]
