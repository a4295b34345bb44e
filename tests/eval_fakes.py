"""Test-only methods for the eval harness: one with a density target, one that always fails, one that interrupts.

:func:`register` adds them to the method registry for the duration of a ``MonkeyPatch`` (each method lives in a
throw-away module, as the registry maps a name to a module defining ``METHOD``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import vidsparse.methods as registry
from vidsparse.config import SparseConfig
from vidsparse.plan import finalize_plan, num_blocks

#: While True, the ``interrupt`` method raises KeyboardInterrupt on its next plan (and disarms itself).
ARMED = {"interrupt": False}


@dataclass(frozen=True)
class BandConfig(SparseConfig):
    """A test method that keeps a band around the diagonal.

    Args:
        density: Fraction of video block pairs kept per query block (nearest blocks first).
    """

    method: ClassVar[str] = "band"
    density: float | None = 0.5


def band_plan(q, k, layout, config, ctx):
    """Each query block keeps its ``ceil(density * Vb)`` nearest key blocks."""
    vb = num_blocks(layout.num_video_tokens, config.block_size)
    keep = max(1, math.ceil(config.density * vb))
    idx = torch.arange(vb, dtype=torch.float32)
    distance = (idx[:, None] - idx[None, :]).abs() + idx[None, :] * 1e-3  # ties: lower index first
    chosen = distance.topk(keep, dim=1, largest=False).indices
    mask = torch.zeros(vb, vb, dtype=torch.bool).scatter_(1, chosen, True)
    return finalize_plan(mask[None, None], layout, config.block_size)


@dataclass(frozen=True)
class BoomConfig(SparseConfig):
    """A test method whose planning always fails."""

    method: ClassVar[str] = "boom"


def boom_plan(q, k, layout, config, ctx):
    """Raise, as a broken method would."""
    raise RuntimeError("boom: this test method always fails")


@dataclass(frozen=True)
class InterruptConfig(SparseConfig):
    """A test method that simulates Ctrl-C once (while armed), then plans dense."""

    method: ClassVar[str] = "interrupt"


def interrupt_plan(q, k, layout, config, ctx):
    """KeyboardInterrupt while armed (disarming), else the full plan."""
    if ARMED["interrupt"]:
        ARMED["interrupt"] = False
        raise KeyboardInterrupt
    vb = num_blocks(layout.num_video_tokens, config.block_size)
    return finalize_plan(torch.ones(1, 1, vb, vb, dtype=torch.bool), layout, config.block_size)


FAKES = {
    "band": registry.MethodSpec(
        "band", BandConfig, band_plan, static=False, summary="test: diagonal band", targets_density=True
    ),
    "boom": registry.MethodSpec("boom", BoomConfig, boom_plan, static=False, summary="test: always fails"),
    "interrupt": registry.MethodSpec("interrupt", InterruptConfig, interrupt_plan, static=False, summary="test"),
}


def register(mp: pytest.MonkeyPatch) -> None:
    """Register the fake methods (undone when ``mp`` is undone)."""
    # A copy of the run-time registry for the test: undoing ``mp`` puts the original (without the fakes) back.
    mp.setattr(registry, "_REGISTERED", dict(registry._REGISTERED))
    for spec in FAKES.values():
        registry.register_method(spec)
