"""Synthetic spatio-temporal attention inputs: the cheap quality yardstick for sparse-attention methods.

Random q/k have no structure, so every sparse pattern looks equally bad on them. Video DiT attention is structured:
most heads attend nearby tokens in space and time, some attend the same place across many frames, a few attend
broadly or to a "sink". This module builds q/k/v with that structure:

- each head has a **content field** over the latent grid (t, h, w): white noise smoothed by a Gaussian whose width
  per axis depends on the head type, so tokens that are close in the smoothed axes have similar q and k;
- q and k share that field (plus independent noise), are scaled to a head-type sharpness, and are rotated by a
  3-D rotary embedding (the way Wan/HunyuanVideo apply RoPE), so attention also decays with relative position;
- v is an independent smooth field, so output errors weigh what a real layer would mix.

Head types (``HEAD_TYPES``): ``spatial`` (local in space and time), ``temporal`` (same place across frames),
``global`` (broad, smooth, with a first-frame sink), and for heterogeneous mixes (:data:`HETEROGENEOUS_HEAD_MIX`)
``sharp`` (very local and peaked: a few blocks hold nearly all of a row's mass) and ``diffuse`` (broad and flat:
mass spread over most blocks). Real DiT layers mix heads like these, which is what head-adaptive budgets
(AdaSpa) exploit; the default mix has none of the two extremes, so budgets per head barely matter on it.

``drift`` rotates the content field slowly with the step index,
to emulate how q/k change over denoising steps (for methods that reuse a pattern across steps).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vidsparse.layout import VideoLayout


@dataclass(frozen=True)
class HeadType:
    """Statistics of one kind of head.

    Attributes:
        sigma: Gaussian smoothing widths (t, h, w) of the content field, in tokens: large = similar far away.
        sharpness: Scale of q (inverse temperature): larger = more peaked attention.
        sink: Extra key norm given to the first latent frame (a first-frame "attention sink").
    """

    sigma: tuple[float, float, float]
    sharpness: float
    sink: float = 0.0


HEAD_TYPES: dict[str, HeadType] = {
    "spatial": HeadType(sigma=(1.0, 2.0, 2.0), sharpness=1.0),
    "temporal": HeadType(sigma=(6.0, 0.6, 0.6), sharpness=1.0),
    "global": HeadType(sigma=(4.0, 6.0, 6.0), sharpness=0.5, sink=1.5),
    "sharp": HeadType(sigma=(0.7, 1.2, 1.2), sharpness=2.5),
    "diffuse": HeadType(sigma=(3.0, 8.0, 8.0), sharpness=0.25),
}

#: Default mix of head types, cycled over heads (half local heads, as in real video DiTs).
DEFAULT_HEAD_MIX: tuple[str, ...] = ("spatial", "temporal", "spatial", "global")
#: A mix with very concentrated and very flat heads next to the default types (use 8 heads to see each once).
HETEROGENEOUS_HEAD_MIX: tuple[str, ...] = (
    "sharp",
    "spatial",
    "temporal",
    "diffuse",
    "sharp",
    "global",
    "spatial",
    "diffuse",
)
#: Named mixes (``vidsparse eval attention --head-types heterogeneous``).
HEAD_MIXES: dict[str, tuple[str, ...]] = {"default": DEFAULT_HEAD_MIX, "heterogeneous": HETEROGENEOUS_HEAD_MIX}


def resolve_head_types(names: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Head types from type names, or from one mix name of :data:`HEAD_MIXES`; ``ValueError`` naming a bad one."""
    names = tuple(names)
    if len(names) == 1 and names[0] in HEAD_MIXES:
        return HEAD_MIXES[names[0]]
    for name in names:
        if name not in HEAD_TYPES:
            raise ValueError(
                f"head type {name!r} is unknown; types: {', '.join(HEAD_TYPES)}; mixes: {', '.join(HEAD_MIXES)}."
            )
    return names


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    """Normalised 1-D Gaussian kernel, radius 3σ (at least 1 tap each side)."""
    radius = max(1, int(math.ceil(3 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (x / max(sigma, 1e-6)) ** 2)
    return kernel / kernel.sum()


def smooth_field(
    grid: tuple[int, int, int], channels: int, sigma: tuple[float, float, float], generator: torch.Generator
) -> torch.Tensor:
    """White noise smoothed separably by a Gaussian along (t, h, w), re-standardised per channel.

    Returns:
        float32 ``[T*H*W, channels]`` in raster (frame-major) token order, zero mean and unit variance per channel.
    """
    t, h, w = grid
    field = torch.randn(1, channels, t, h, w, generator=generator)
    for axis, s in enumerate(sigma):
        if s <= 0:
            continue
        kernel = _gaussian_kernel(s)
        size = kernel.numel()
        shape = [1, 1, 1]
        shape[axis] = size
        weight = kernel.view(1, 1, *shape).repeat(channels, 1, 1, 1, 1)
        pad = [0, 0, 0, 0, 0, 0]
        # F.pad order is (w_lo, w_hi, h_lo, h_hi, t_lo, t_hi); reflect where the axis is long enough.
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = size // 2
        mode = "replicate"
        field = torch.nn.functional.conv3d(torch.nn.functional.pad(field, pad, mode=mode), weight, groups=channels)
    field = field[0].reshape(channels, -1).T
    field = field - field.mean(0, keepdim=True)
    return field / field.std(0, keepdim=True).clamp_min(1e-6)


def rope_3d(x: torch.Tensor, layout: VideoLayout, theta: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding over (t, h, w), interleaved pairs, head dim split like Wan's.

    Args:
        x: ``[N, H, D]`` video tokens in raster order (D even).

    Returns:
        Rotated ``x``, same shape and dtype.
    """
    n, _, d = x.shape
    d_hw = 2 * (d // 6)
    d_t = d - 2 * d_hw
    coords = layout.token_coords().float()  # [N, 3]
    angles = []
    for axis, dim in enumerate((d_t, d_hw, d_hw)):
        freqs = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
        angles.append(coords[:, axis : axis + 1] * freqs[None])
    ang = torch.cat(angles, dim=1)  # [N, D/2]
    cos, sin = ang.cos()[:, None], ang.sin()[:, None]
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)
    return out.to(x.dtype)


def synthetic_qkv(
    layout: VideoLayout,
    *,
    heads: int = 4,
    head_dim: int = 64,
    batch: int = 1,
    head_types: tuple[str, ...] = DEFAULT_HEAD_MIX,
    seed: int = 0,
    step: int = 0,
    drift: float = 0.0,
    noise: float = 0.3,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Structured q, k, v for ``layout`` (video tokens; text tokens, if any, get unstructured features).

    Args:
        layout: Geometry of the sequence.
        heads: Number of heads; head ``i`` has type ``head_types[i % len(head_types)]``.
        head_dim: D (even).
        batch: B; every sample gets its own fields (seeded from ``seed + sample``).
        head_types: Names from :data:`HEAD_TYPES`.
        seed: Base seed: the same arguments always give the same tensors.
        step: Denoising step index (only matters with ``drift``).
        drift: Radians per step by which the content field rotates towards a second field: 0 = static q/k.
        noise: Weight of the per-token independent noise added to q and k (0 = q and k equal before RoPE).
        dtype: Output dtype.

    Returns:
        ``(q, k, v)``, each ``[B, S, H, D]`` (diffusers layout), S = ``layout.seq_len``, original token order.
    """
    for name in head_types:
        if name not in HEAD_TYPES:
            raise ValueError(f"head_types contains {name!r}; known types: {', '.join(HEAD_TYPES)}.")
    if head_dim % 2:
        raise ValueError(f"head_dim={head_dim} is invalid: rotary embeddings need an even head dimension.")
    n = layout.num_video_tokens
    qs, ks, vs = [], [], []
    for sample in range(batch):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + sample)
        q_heads, k_heads, v_heads = [], [], []
        for head in range(heads):
            spec = HEAD_TYPES[head_types[head % len(head_types)]]
            base = smooth_field(layout.grid, head_dim, spec.sigma, gen)
            if drift:
                other = smooth_field(layout.grid, head_dim, spec.sigma, gen)
                angle = drift * step
                base = math.cos(angle) * base + math.sin(angle) * other
            # Noise is drawn independently of the step, so only the drift moves q/k between steps.
            q = base + noise * torch.randn(n, head_dim, generator=gen)
            k = base + noise * torch.randn(n, head_dim, generator=gen)
            q = q * (spec.sharpness / math.sqrt(1 + noise**2))
            k = k / math.sqrt(1 + noise**2)
            if spec.sink:
                k[: layout.tokens_per_frame] *= 1 + spec.sink
            q_heads.append(q)
            k_heads.append(k)
            v_heads.append(smooth_field(layout.grid, head_dim, spec.sigma, gen))
        q_v = rope_3d(torch.stack(q_heads, 1), layout)
        k_v = rope_3d(torch.stack(k_heads, 1), layout)
        v_v = torch.stack(v_heads, 1)
        if layout.text_len:
            text = [torch.randn(layout.text_len, heads, head_dim, generator=gen) for _ in range(3)]
            parts = [
                (text[i], x) if layout.text_position == "before" else (x, text[i])
                for i, x in enumerate((q_v, k_v, v_v))
            ]
            q_v, k_v, v_v = (torch.cat(p, 0) for p in parts)
        qs.append(q_v)
        ks.append(k_v)
        vs.append(v_v)
    return tuple(torch.stack(x, 0).to(dtype) for x in (qs, ks, vs))


def output_error(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """Relative L2 error and mean cosine similarity of an attention output against the dense one.

    Args:
        out, ref: ``[B, S, H, D]``.

    Returns:
        ``{"rel_l2": ||out - ref|| / ||ref||, "cosine": mean over (B, S, H) of cos(out, ref)}``.
    """
    out, ref = out.float(), ref.float()
    rel = (out - ref).norm() / ref.norm().clamp_min(1e-12)
    cos = torch.nn.functional.cosine_similarity(out, ref, dim=-1).mean()
    return {"rel_l2": float(rel), "cosine": float(cos)}
