"""VideoLayout: where the video grid and the text tokens sit in one attention sequence.

Video tokens are frame-major in every diffusers video transformer: token ``n`` of the video part is at
``(t, h, w)`` with ``n = (t * H + h) * W + w`` on the latent token grid (after patchify). Text tokens, in joint
models, sit before the video (CogVideoX) or after it (HunyuanVideo, Mochi).

Plans (see :mod:`vidsparse.plan`) are always expressed in *plan order*: the video tokens first, in the order a
method chooses (raster, or a tile permutation that makes each block spatially compact), then the text tokens. The
permutation from the original sequence into plan order is built here, once, for every method.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import torch

from .config import check_choice, check_int


@dataclass(frozen=True)
class VideoLayout:
    """Geometry of one attention sequence, in latent tokens.

    Args:
        frames: Latent frames T' (after temporal patchify).
        height: Token rows H' per frame.
        width: Token columns W' per frame.
        text_len: Text tokens in the same sequence (joint attention), 0 for video-only self-attention.
        text_position: ``"after"`` (video first, e.g. HunyuanVideo) or ``"before"`` (text first, e.g. CogVideoX).
    """

    frames: int
    height: int
    width: int
    text_len: int = 0
    text_position: Literal["after", "before"] = "after"

    def __post_init__(self) -> None:
        check_int("frames", self.frames, minimum=1)
        check_int("height", self.height, minimum=1)
        check_int("width", self.width, minimum=1)
        check_int("text_len", self.text_len, minimum=0)
        check_choice("text_position", self.text_position, ("after", "before"))

    @property
    def tokens_per_frame(self) -> int:
        """H' * W'."""
        return self.height * self.width

    @property
    def num_video_tokens(self) -> int:
        """T' * H' * W'."""
        return self.frames * self.height * self.width

    @property
    def seq_len(self) -> int:
        """Length of the whole attention sequence: video plus text."""
        return self.num_video_tokens + self.text_len

    @property
    def video_start(self) -> int:
        """Index of the first video token in the original sequence."""
        return self.text_len if self.text_position == "before" else 0

    @property
    def grid(self) -> tuple[int, int, int]:
        """(T', H', W')."""
        return (self.frames, self.height, self.width)

    def token_coords(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The (t, h, w) coordinates of the video tokens in raster order: int64 ``[T'*H'*W', 3]``."""
        t, h, w = torch.meshgrid(
            torch.arange(self.frames, device=device),
            torch.arange(self.height, device=device),
            torch.arange(self.width, device=device),
            indexing="ij",
        )
        return torch.stack([t.reshape(-1), h.reshape(-1), w.reshape(-1)], dim=1)

    def tile_order(self, tile: tuple[int, int, int]) -> torch.Tensor:
        """A permutation of the video tokens that makes every ``tile`` (t, h, w) cuboid contiguous.

        Tokens are ordered by tile (tile-t, tile-h, tile-w, raster), then inside a tile in raster order. Grids that
        the tile does not divide get smaller (ragged) tiles at the far edges; nothing is padded.

        Returns:
            int64 ``[T'*H'*W']``: position ``p`` of the tiled order holds raster video token ``order[p]``.
        """
        return _tile_order(self.frames, self.height, self.width, *tile).clone()

    def plan_permutation(self, video_order: torch.Tensor | None = None) -> torch.Tensor | None:
        """Permutation from the original sequence into plan order (video first in ``video_order``, then text).

        Args:
            video_order: int64 ``[T'*H'*W']``, the order of the video tokens (indices into the raster video part);
                ``None`` keeps raster order.

        Returns:
            int64 ``[seq_len]`` with ``plan_position -> original_position``, or ``None`` when plan order is the
            original order (video-only or text-after with raster video).
        """
        offset = self.video_start
        if video_order is None:
            if offset == 0:
                return None
            video = torch.arange(self.num_video_tokens) + offset
        else:
            if video_order.shape != (self.num_video_tokens,):
                raise ValueError(
                    f"video_order has shape {tuple(video_order.shape)}; expected ({self.num_video_tokens},)."
                )
            video = video_order.to(torch.int64).cpu() + offset
        if self.text_position == "before":
            text = torch.arange(self.text_len)
        else:
            text = torch.arange(self.num_video_tokens, self.seq_len)
        return torch.cat([video, text])

    def describe(self) -> str:
        """Short human-readable summary, e.g. ``9x30x52 video (14040 tokens) + 0 text``."""
        return (
            f"{self.frames}x{self.height}x{self.width} video ({self.num_video_tokens} tokens) + "
            f"{self.text_len} text ({self.text_position})"
        )


@lru_cache(maxsize=64)
def _tile_order(frames: int, height: int, width: int, tt: int, th: int, tw: int) -> torch.Tensor:
    """Cached worker of :meth:`VideoLayout.tile_order` (the permutation depends only on geometry)."""
    for name, value in (("tile t", tt), ("tile h", th), ("tile w", tw)):
        check_int(name, value, minimum=1)
    t, h, w = torch.meshgrid(torch.arange(frames), torch.arange(height), torch.arange(width), indexing="ij")
    # Sort key: tile index (row-major over tiles) then the raster index inside the tile. Ragged edge tiles simply
    # hold fewer tokens.
    n_th, n_tw = -(-height // th), -(-width // tw)
    tile_id = ((t // tt) * n_th + (h // th)) * n_tw + (w // tw)
    inner = ((t % tt) * th + (h % th)) * tw + (w % tw)
    key = tile_id.reshape(-1) * (tt * th * tw) + inner.reshape(-1)
    return torch.argsort(key, stable=True)
