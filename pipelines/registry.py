"""Model-family adapters (one file per family) and the tiny offline pipelines.

:func:`adapter_for` finds the adapter of a transformer; the list below is the support table that
``vidsparse models`` prints.
"""

from __future__ import annotations

import torch

from .base import FamilyAdapter
from .cogvideox import CogVideoXAdapter
from .hunyuan_video import HunyuanVideo15Adapter, HunyuanVideoAdapter
from .ltx import LTXAdapter
from .mochi import MochiAdapter
from .skyreels import SkyReelsV2Adapter
from .wan import WanAdapter

#: Every supported family, in the order ``vidsparse models`` lists them.
ADAPTERS: list[FamilyAdapter] = [
    WanAdapter(),
    SkyReelsV2Adapter(),
    CogVideoXAdapter(),
    HunyuanVideoAdapter(),
    HunyuanVideo15Adapter(),
    LTXAdapter(),
    MochiAdapter(),
]


def supported_model_classes() -> list[str]:
    """Names of all transformer classes vidsparse supports."""
    return [cls for adapter in ADAPTERS for cls in adapter.model_classes]


def adapter_for(transformer: torch.nn.Module) -> FamilyAdapter:
    """The adapter serving ``transformer``; ``TypeError`` naming its class and the supported ones otherwise."""
    if type(transformer).__name__ == "OptimizedModule":  # torch.compile(module) wraps it; module.compile() does not
        raise TypeError(
            f"vidsparse got a torch.compile'd wrapper (OptimizedModule) of "
            f"{type(getattr(transformer, '_orig_mod', transformer)).__name__}: apply vidsparse before compiling, "
            "or compile in place with transformer.compile() (or diffusers' compile_repeated_blocks), which keeps "
            "the model's own class."
        )
    for adapter in ADAPTERS:
        if adapter.matches(transformer):
            return adapter
    raise TypeError(
        f"vidsparse does not support {type(transformer).__name__}; supported transformer classes: "
        f"{', '.join(supported_model_classes())}."
    )
