"""``window``: each frame attends the frames within ±``window`` of it.

The simplest static video pattern; it exists to exercise the whole sparse path with a mask whose effect is easy to
reason about. A block is kept when the frame spans of the query block and the key block come within ``window``
frames of each other, so a block that straddles two frames keeps what either frame needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from vidsparse.config import SparseConfig, check_int
from vidsparse.layout import VideoLayout
from vidsparse.plan import BlockPlan, finalize_plan, num_blocks

from . import MethodSpec, PlanContext


@dataclass(frozen=True)
class WindowConfig(SparseConfig):
    """Config of the ``window`` method.

    Args:
        window: Temporal half-width in latent frames (0 = each frame attends only itself).
    """

    method: ClassVar[str] = "window"
    window: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("window", self.window)


def frame_spans(layout: VideoLayout, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """First and last latent frame touched by each video block (raster order): two int64 ``[Vb]`` tensors."""
    nv = layout.num_video_tokens
    starts = torch.arange(num_blocks(nv, block_size)) * block_size
    ends = torch.clamp(starts + block_size, max=nv) - 1
    return starts // layout.tokens_per_frame, ends // layout.tokens_per_frame


def plan(
    q: torch.Tensor | None, k: torch.Tensor | None, layout: VideoLayout, config: WindowConfig, ctx: PlanContext
) -> BlockPlan:
    """Keep block pairs whose frame spans are within ``config.window`` frames."""
    first, last = frame_spans(layout, config.block_size)
    # Distance between the frame intervals [first_i, last_i] and [first_j, last_j] (0 when they overlap).
    gap = torch.clamp(torch.maximum(first[:, None] - last[None, :], first[None, :] - last[:, None]), min=0)
    mask = (gap <= config.window)[None, None]
    return finalize_plan(mask, layout, config.block_size, meta={"method": "window", "window": config.window})


METHOD = MethodSpec("window", WindowConfig, plan, static=True, summary="each frame attends frames within ±window")
