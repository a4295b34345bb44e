"""``dense``: the full-density plan, run through the block-sparse executor.

Useful as the control in every comparison: it exercises the whole sparse path (hook, processor, planning, executor)
while computing exactly what the stock processor computes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from vidsparse.config import SparseConfig
from vidsparse.layout import VideoLayout
from vidsparse.plan import BlockPlan, finalize_plan, num_blocks

from . import MethodSpec, PlanContext


@dataclass(frozen=True)
class DenseConfig(SparseConfig):
    """Config of the ``dense`` method: only the shared fields; density is always 1."""

    method: ClassVar[str] = "dense"


def plan(
    q: torch.Tensor | None, k: torch.Tensor | None, layout: VideoLayout, config: DenseConfig, ctx: PlanContext
) -> BlockPlan:
    """Every video block attends every video block (text dense as always)."""
    vb = num_blocks(layout.num_video_tokens, config.block_size)
    mask = torch.ones(1, 1, vb, vb, dtype=torch.bool)
    return finalize_plan(mask, layout, config.block_size, meta={"method": "dense"})


METHOD = MethodSpec("dense", DenseConfig, plan, static=True, summary="full attention through the sparse path")
