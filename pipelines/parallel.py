"""Context parallelism: vidsparse's sparse attention inside diffusers' Ulysses attention.

``transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=N))`` splits the video sequence over
N ranks at the transformer's first block (Wan: ``rope`` and ``blocks.0``), so each attention processor sees
``S / N`` tokens of every head. diffusers' templated Ulysses attention then exchanges q/k/v all-to-all and calls a
*forward op* on **all S tokens of H / N heads**, then exchanges the output back. vidsparse plugs its planner and
executor in as that forward op (:func:`ulysses_attention`): a rank plans on the full sequence of its own heads, so
per-head plans are the same as in one process, and the latent grid still comes from the root hook, which sees the
transformer's unsplit input. Dense calls (warm-up steps and layers, cross-attention) stay on the stock dispatch,
which handles context parallelism by itself.

Ring attention (``ring_degree > 1``) is refused with an error: each rank would hold only a shard of the keys, and a
block plan over the whole sequence would have to be cut per (query shard, key shard) pair and the partial results
merged by their log-sum-exp; the CPU executor (compiled FlexAttention) cannot return the log-sum-exp. Use Ulysses.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from diffusers.models.attention_dispatch import _templated_context_parallel_attention

#: ``attend(q, k, v, key_padding_mask, head_offset, num_heads) -> out``: attention of one rank's heads over the
#: full sequence, q/k/v/out ``[B, S, H_local, D]``, key_padding_mask bool ``[B, S]`` or None.
AttendFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, int, int], torch.Tensor]


def context_parallel_config(parallel_config: Any) -> Any:
    """The ``ContextParallelConfig`` inside a diffusers ``ParallelConfig`` (None when there is none)."""
    return getattr(parallel_config, "context_parallel_config", None)


def check_context_parallel(cp_config: Any) -> None:
    """Raise ``ValueError`` for context-parallel settings vidsparse cannot run sparse (ring attention)."""
    ring_degree = getattr(cp_config, "ring_degree", 1) or 1
    if ring_degree > 1:
        raise ValueError(
            f"vidsparse does not support ring attention: ContextParallelConfig(ring_degree={ring_degree}, "
            f"ulysses_degree={cp_config.ulysses_degree}). Under ring attention a rank holds only a shard of the "
            "keys, so a block-sparse plan over the whole sequence cannot run on it. Use Ulysses instead: "
            f"ContextParallelConfig(ulysses_degree={ring_degree * (cp_config.ulysses_degree or 1)}) (each rank then "
            "attends over all tokens with a subset of the heads), or remove vidsparse (handle.remove()) to run ring "
            "attention dense."
        )


def local_sequence_length(total: int, cp_config: Any) -> int | None:
    """How many of ``total`` tokens this rank holds after diffusers' context-parallel split (None: not splittable).

    Plain Ulysses splits into equal chunks (``total`` must divide); ``ulysses_anything`` uses ``tensor_split``
    (the first ``total mod N`` ranks get one token more).
    """
    world = cp_config.ulysses_degree
    rank = cp_config._flattened_mesh.get_local_rank()
    if cp_config.ulysses_anything:
        base, extra = divmod(total, world)
        return base + (1 if rank < extra else 0)
    return total // world if total % world == 0 else None


def _inference_only_backward(ctx: Any, grad_out: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    raise NotImplementedError(
        "vidsparse's sparse attention under context parallelism is inference-only: no backward pass. Run the "
        "forward under torch.no_grad() (pipelines do), or remove vidsparse (handle.remove()) to train."
    )


def ulysses_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attend: AttendFn,
    parallel_config: Any,
    *,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run ``attend`` on the full sequence and this rank's heads, through diffusers' Ulysses all-to-all.

    Args:
        query, key, value: This rank's sequence shard of every head: ``[B, S_local, H, D]``.
        attend: The attention of one rank (see :data:`AttendFn`); it receives ``[B, S, H_local, D]`` and the index
            of its first head among the ``H`` heads (rank r holds heads ``r·ceil(H/N) ...``, the last rank fewer
            when ``ulysses_anything`` pads the heads).
        parallel_config: The diffusers ``ParallelConfig`` (Ulysses only: see :func:`check_context_parallel`).
        key_padding_mask: Optional bool ``[B, S_local]`` of this rank's keys (False = padded); it is gathered to the
            full sequence alongside the keys.

    Returns:
        ``[B, S_local, H, D]``: this rank's shard of the output, every head.
    """
    cp_config = context_parallel_config(parallel_config)
    check_context_parallel(cp_config)
    num_heads = query.shape[2]
    head_offset = cp_config._ulysses_local_rank * math.ceil(num_heads / cp_config.ulysses_degree)

    def forward_op(
        ctx: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        attn_mask: torch.Tensor | None,
        dropout_p: float,
        is_causal: bool,
        scale: float | None,
        enable_gqa: bool,
        return_lse: bool,
        _save_ctx: bool = True,
        _parallel_config: Any = None,
    ) -> torch.Tensor:
        # diffusers calls this with every argument of the dispatch; vidsparse only ever passes the defaults.
        if return_lse:
            raise ValueError("vidsparse's Ulysses forward op does not return the log-sum-exp (ring is refused).")
        # attn_mask: the key padding mask, gathered by diffusers to the full sequence ([B, S]).
        return attend(q, k, v, attn_mask, head_offset, num_heads)

    return _templated_context_parallel_attention(
        query,
        key,
        value,
        key_padding_mask,
        forward_op=forward_op,
        backward_op=_inference_only_backward,
        _parallel_config=parallel_config,
    )
