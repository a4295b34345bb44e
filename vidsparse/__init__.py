"""vidsparse: block-sparse attention for diffusers video pipelines, and the harness that measures what it costs.

The whole public surface:

- :func:`apply` / :func:`remove`: install sparse attention on a pipeline or transformer, and restore it.
- :func:`plan` / :func:`attention`: the same methods on raw tensors, for research and tests.
- :class:`VideoLayout`, :class:`BlockPlan`: the geometry of a sequence and the one mask format.
- Configs: one frozen dataclass per method (see :mod:`vidsparse.methods`).
"""

from __future__ import annotations

from typing import Any

import torch

from .config import SparseConfig
from .integration import SparseHandle, apply, attach, make_processor, remove
from .layout import VideoLayout
from .methods import PlanContext, build_plan, make_config, method_names
from .plan import BlockPlan

__version__ = "0.1.0"

__all__ = [
    "BlockPlan",
    "SparseHandle",
    "apply",
    "attach",
    "make_processor",
    "remove",
    "PlanContext",
    "SparseConfig",
    "VideoLayout",
    "attention",
    "method_names",
    "make_config",
    "plan",
]


def plan(
    method_or_config: str | SparseConfig,
    q: torch.Tensor | None,
    k: torch.Tensor | None,
    layout: VideoLayout,
    *,
    ctx: PlanContext | None = None,
    **overrides: Any,
) -> BlockPlan:
    """Plan sparse attention for one sequence.

    Args:
        method_or_config: A method name (``"radial"``, ...) or a config instance.
        q, k: ``[B, S, H, D]`` (diffusers layout), S = ``layout.seq_len``; may be ``None`` for static methods.
        layout: Geometry of the sequence in latent tokens, e.g. ``VideoLayout(frames=9, height=30, width=52)``.
        ctx: Layer/step information for methods that depend on it (default: layer 0, step 0).
        **overrides: Config fields, e.g. ``density=0.25``.

    Returns:
        The :class:`BlockPlan` (validated invariants: own block kept, text dense).
    """
    config = make_config(method_or_config, **overrides)
    return build_plan(config, q, k, layout, ctx)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: BlockPlan,
    *,
    backend: str = "auto",
    scale: float | None = None,
    return_lse: bool = False,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Run attention under ``plan``: q/k/v ``[B, S, H, D]`` -> out ``[B, S, H, D]`` (and LSE ``[B, H, S]``).

    See :func:`vidsparse.kernels.block_sparse_attention` for the arguments.
    """
    from .kernels import block_sparse_attention

    return block_sparse_attention(
        q, k, v, plan, backend=backend, scale=scale, return_lse=return_lse, key_padding_mask=key_padding_mask
    )
