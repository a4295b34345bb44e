"""Where a video transformer's self-attention goes: attention mass by temporal and by spatial distance, per layer.

Sparse attention methods bet that attention is local in time and space (radial: mass decays with distance; window
methods keep nearby blocks). This module measures that bet on a real pipeline run: during generation it records, for
every self-attention call of a Wan-family transformer, the softmax attention probabilities and sums them by the
distance between the query token and the key token on the latent grid.

    stats = attention_locality(pipe, "a red circle moves right over a plain gray background",
                               num_frames=31, height=64, width=64, num_inference_steps=8)
    stats["temporal"][layer, d]   # mean mass a query puts on keys d latent frames away (rows sum to 1)
    stats["spatial"][layer, r]    # ... on keys at spatial (Chebyshev) distance r tokens, any frame

It reads the query and key tensors where the stock Wan processor hands them to ``dispatch_attention_fn`` (after
projections, q/k norm and RoPE), so it measures exactly the attention the model computes.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import numpy as np
import torch


class _LocalityRecorder:
    """Accumulates attention mass by distance for self-attention calls on a ``T × H × W`` token grid."""

    def __init__(self, grid: tuple[int, int, int], num_layers: int, query_chunk: int) -> None:
        t, h, w = grid
        self.grid, self.num_layers, self.query_chunk = grid, num_layers, query_chunk
        self.calls = 0
        self.temporal = torch.zeros(num_layers, t, dtype=torch.float64)
        self.spatial = torch.zeros(num_layers, max(h, w), dtype=torch.float64)
        self.counts = torch.zeros(num_layers, dtype=torch.float64)
        frame = torch.arange(t).repeat_interleave(h * w)
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        ys, xs = ys.flatten(), xs.flatten()
        self.token_frame = frame  # [S]
        self.token_cell = torch.arange(t * h * w) % (h * w)  # [S] spatial index within a frame
        # Chebyshev distance between spatial cells [H*W, H*W] and |Δt| between frames [T, T].
        self.cell_distance = torch.maximum((ys[:, None] - ys[None]).abs(), (xs[:, None] - xs[None]).abs())
        self.frame_distance = (torch.arange(t)[:, None] - torch.arange(t)[None]).abs()

    def record(self, query: torch.Tensor, key: torch.Tensor) -> None:
        """Add one call's probabilities; ``query``/``key`` are ``[B, S, heads, D]`` (diffusers layout)."""
        t, h, w = self.grid
        layer = self.calls % self.num_layers
        self.calls += 1
        q = query.transpose(1, 2).float()  # [B, heads, S, D]
        k = key.transpose(1, 2).float()
        scale = q.shape[-1] ** -0.5
        for start in range(0, q.shape[2], self.query_chunk):
            stop = min(start + self.query_chunk, q.shape[2])
            probs = torch.softmax(q[:, :, start:stop] @ k.transpose(-1, -2) * scale, dim=-1)  # [B, Hd, Sq, S]
            probs = probs.mean(dim=(0, 1)).double()  # [Sq, S], averaged over batch and heads
            per_frame = probs.view(stop - start, t, h * w)
            # Temporal: mass on key frame f, regrouped by |frame(q) - f|.
            frame_mass = per_frame.sum(-1)  # [Sq, T]
            q_frames = self.token_frame[start:stop]
            self.temporal[layer].index_add_(0, self.frame_distance[q_frames].flatten(), frame_mass.flatten())
            # Spatial: mass on key cell c (any frame), regrouped by Chebyshev distance to the query's cell.
            cell_mass = per_frame.sum(1)  # [Sq, H*W]
            q_cells = self.token_cell[start:stop]
            self.spatial[layer].index_add_(0, self.cell_distance[q_cells].flatten(), cell_mass.flatten())
            self.counts[layer] += stop - start

    def uniform(self) -> tuple[np.ndarray, np.ndarray]:
        """Return the same statistics for uniform attention (all keys weighted equally): the no-locality baseline."""
        t, h, w = self.grid
        temporal = torch.zeros(t, dtype=torch.float64).index_add_(
            0, self.frame_distance.flatten(), torch.ones(t * t, dtype=torch.float64)
        ) / (t * t)
        spatial = torch.zeros(max(h, w), dtype=torch.float64).index_add_(
            0, self.cell_distance.flatten(), torch.ones((h * w) ** 2, dtype=torch.float64)
        ) / ((h * w) ** 2)
        return temporal.numpy(), spatial.numpy()


@contextmanager
def _recording(recorder: _LocalityRecorder):
    """Route the Wan processors' attention calls through ``recorder`` (self-attention only) for the block."""
    from diffusers.models.transformers import transformer_wan

    original = transformer_wan.dispatch_attention_fn

    def dispatch(query, key, value, *args, **kwargs):
        if query.shape[1] == key.shape[1] == recorder.token_frame.numel():
            recorder.record(query, key)
        return original(query, key, value, *args, **kwargs)

    transformer_wan.dispatch_attention_fn = dispatch
    try:
        yield
    finally:
        transformer_wan.dispatch_attention_fn = original


def attention_locality(
    pipe,
    prompt: str,
    *,
    num_frames: int,
    height: int,
    width: int,
    num_inference_steps: int = 8,
    guidance_scale: float = 4.0,
    seed: int = 0,
    query_chunk: int = 512,
) -> dict[str, Any]:
    """Generate one clip with ``pipe`` (a Wan-family pipeline) and measure its self-attention locality.

    Args:
        pipe: ``WanPipeline`` (stock attention processors; patch size and VAE factors are read from it).
        prompt: The prompt of the generation.
        num_frames: Frames of the generation (pixels).
        height: Height in pixels.
        width: Width in pixels.
        num_inference_steps: Denoising steps (every step's attention is recorded).
        guidance_scale: Classifier-free guidance scale (both branches are recorded).
        seed: Seed of the initial noise.
        query_chunk: Queries per softmax chunk (memory: ``chunk × S`` floats per head).

    Returns:
        ``{"temporal": [layers, T'], "spatial": [layers, max(H', W')], "uniform_temporal": [T'],
        "uniform_spatial": [...], "grid": (T', H', W'), "calls_per_layer": int}``; every row of ``temporal`` and
        ``spatial`` sums to 1 (mean over queries, heads, batch, denoising steps and guidance branches).
    """
    transformer = pipe.transformer
    pt, ph, pw = transformer.config.patch_size
    st, ss = pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial
    grid = ((num_frames - 1) // st // pt + 1, height // ss // ph, width // ss // pw)
    recorder = _LocalityRecorder(grid, transformer.config.num_layers, query_chunk)
    with _recording(recorder), torch.no_grad():
        pipe(
            prompt,
            num_frames=num_frames,
            height=height,
            width=width,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=torch.Generator().manual_seed(seed),
            output_type="latent",
        )
    if recorder.calls == 0:
        raise ValueError(
            f"no self-attention call over {int(np.prod(grid))} tokens was seen: is {type(transformer).__name__} a "
            "Wan-family transformer with its stock attention processors?"
        )
    counts = recorder.counts.clamp(min=1)[:, None]
    uniform_t, uniform_s = recorder.uniform()
    return {
        "temporal": (recorder.temporal / counts).numpy(),
        "spatial": (recorder.spatial / counts).numpy(),
        "uniform_temporal": uniform_t,
        "uniform_spatial": uniform_s,
        "grid": grid,
        "calls_per_layer": recorder.calls // recorder.num_layers,
    }
