"""Absolute position features for a stock ``WanTransformer3DModel``: fixed sinusoids added after the patch embedding.

Why: Wan encodes positions only with RoPE, which makes attention depend on *relative* offsets. When the input is
pure noise (the first sampling steps) every token then looks alike, and the network cannot tell where in the frame
it is: it cannot put "a circle that moves right" at the left edge, only guess from the noise. Our first tiny models
(trained for an hour on a CPU) answered with a faint tint everywhere that later steps turned into scattered
fragments of the shape. Large video models break that symmetry through scale; a tiny one needs to be told where it
is. The features are parameter-free, so the transformer's weights and config stay exactly those of
``WanTransformer3DModel`` (its ``patch_embedding`` Conv3d keeps its weights; only its forward adds the table).

Layout of the ``inner_dim`` features of the token at latent frame ``t``, row ``h`` and column ``w`` of the patch
grid: sin/cos of ``t`` (latent frames, at periods from 2 to 64 frames) in the first quarter, then sin/cos of the row
and of the column *in frame-height units* (``(h + 0.5) / rows``; the procedural clips are drawn in those units, so
the same scene gets the same features at any resolution), at 1/4 to 8 cycles per frame height.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

#: File that marks an exported pipeline folder whose transformer was trained with these features.
MARKER_FILE = "absolute_positions.json"


def position_table(inner_dim: int, frames: int, rows: int, cols: int) -> torch.Tensor:
    """Features ``[inner_dim, frames, rows, cols]`` (float32) for a patch grid of ``frames × rows × cols`` tokens."""
    if inner_dim % 8:
        raise ValueError(f"inner_dim={inner_dim} is not allowed; expected a multiple of 8.")
    t_dim = inner_dim // 4
    s_dim = (inner_dim - t_dim) // 2
    t = torch.arange(frames, dtype=torch.float64)
    ys = (torch.arange(rows, dtype=torch.float64) + 0.5) / rows
    xs = (torch.arange(cols, dtype=torch.float64) + 0.5) / rows  # width in height units, like procedural.render

    def waves(positions: torch.Tensor, dim: int, low: float, high: float) -> torch.Tensor:
        # dim/2 angular frequencies, geometric from `low` to `high` cycles per unit: [dim, len(positions)].
        freqs = 2 * math.pi * torch.logspace(math.log10(low), math.log10(high), dim // 2, dtype=torch.float64)
        angles = freqs[:, None] * positions[None, :]
        return torch.cat([angles.sin(), angles.cos()])

    temporal = waves(t, t_dim, 1 / 64, 1 / 2)[:, :, None, None].expand(-1, frames, rows, cols)
    vertical = waves(ys, s_dim, 0.25, 8.0)[:, None, :, None].expand(-1, frames, rows, cols)
    horizontal = waves(xs, inner_dim - t_dim - s_dim, 0.25, 8.0)[:, None, None, :].expand(-1, frames, rows, cols)
    return torch.cat([temporal, vertical, horizontal]).float()


class PositionalPatchEmbedding(nn.Conv3d):
    """Wan's patch-embedding ``Conv3d`` plus :func:`position_table` (same parameters, same state-dict keys)."""

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        """``[B, C, T, H, W]`` latents -> ``[B, inner_dim, T/p_t, H/p_h, W/p_w]`` embedded patches with positions."""
        patches = super().forward(latents)
        _, dim, frames, rows, cols = patches.shape
        table = position_table(dim, frames, rows, cols).to(device=patches.device, dtype=patches.dtype)
        return patches + table


def add_absolute_positions(transformer) -> None:
    """Give ``transformer`` (a ``WanTransformer3DModel``) the absolute position features, in place (idempotent)."""
    embedding = transformer.patch_embedding
    if not isinstance(embedding, nn.Conv3d):
        raise TypeError(f"transformer.patch_embedding is a {type(embedding).__name__}; expected Conv3d.")
    embedding.__class__ = PositionalPatchEmbedding  # same module, same parameters: only forward changes


def write_marker(folder: str | Path) -> None:
    """Mark an exported pipeline folder as needing :func:`add_absolute_positions` after loading."""
    (Path(folder) / MARKER_FILE).write_text(json.dumps({"module": __name__, "function": "add_absolute_positions"}))


def has_marker(folder: str | Path) -> bool:
    """Whether ``folder`` was exported from a run trained with absolute positions."""
    return (Path(folder) / MARKER_FILE).is_file()
