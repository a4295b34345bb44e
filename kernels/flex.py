"""The ``flex`` executor: torch FlexAttention over the plan's BlockMask, compiled once per shape.

FlexAttention is only fast when compiled (eagerly it materialises the full score matrix). The compiled function is
created once per process with ``dynamic=False``; plans are passed as data (a ``BlockMask`` whose index tensors have
a fixed width per geometry, see :meth:`BlockPlan.to_block_mask`), so a new plan of the same shape reuses the
compiled kernel. On CPU torch compiles FlexAttention for inference only and cannot return the LSE there; the LSE is
then computed by the reference executor, with a warning.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable

import torch

from vidsparse.plan import BlockPlan

_compiled: Callable | None = None
_warned_cpu_lse = False

#: Distinct shapes (B, H, S, D, dtype, block size, mask kind) one process may compile FlexAttention for. torch's
#: default recompile limit is 8, after which dynamo silently runs ``flex_attention`` *eagerly* — and eager
#: FlexAttention ignores the BlockMask's block lists (it computes dense attention): a silent wrong result. So every
#: call raises the limit for this function only and turns hitting it into an error instead of a fallback.
MAX_COMPILED_SHAPES = 256


def _compile_guard():
    """Dynamo settings for one compiled FlexAttention call (scoped to the call, not global)."""
    return torch._dynamo.config.patch(
        recompile_limit=MAX_COMPILED_SHAPES,
        accumulated_recompile_limit=max(MAX_COMPILED_SHAPES, torch._dynamo.config.accumulated_recompile_limit),
        fail_on_recompile_limit_hit=True,
    )


def compiled_flex_attention() -> Callable:
    """The process-wide ``torch.compile(flex_attention, dynamic=False)``."""
    global _compiled
    if _compiled is None:
        from torch.nn.attention.flex_attention import flex_attention

        _compiled = torch.compile(flex_attention, dynamic=False)
    return _compiled


def _padding_mask_mod(key_padding_mask: torch.Tensor) -> Callable:
    """A FlexAttention mask_mod that hides padded keys (``key_padding_mask`` bool ``[B, S]`` in plan order)."""

    def padded_keys(b, h, q_idx, kv_idx):
        return key_padding_mask[b, kv_idx]

    return padded_keys


def flex_block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: BlockPlan,
    *,
    scale: float | None = None,
    return_lse: bool = False,
    key_padding_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Block-sparse attention with FlexAttention.

    Args:
        q, k, v: ``[B, H, S, D]`` in *plan order*.
        plan: The plan, on the same device as ``q``.
        scale: Softmax scale; default ``1/sqrt(D)``.
        return_lse: Also return the natural-log LSE ``[B, H, S]`` (float32, plan order).
        key_padding_mask: Optional bool ``[B, S]`` in plan order; True keys may be attended.

    Returns:
        ``(out [B, H, S, D], lse or None)``.
    """
    from torch.nn.attention.flex_attention import AuxRequest, BlockMask

    d = q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    block_mask = plan.to_block_mask()
    if key_padding_mask is not None:
        # Padded keys need a mask_mod, which FlexAttention only evaluates in *partial* blocks: move every kept
        # block from the full list to the partial list.
        block_mask = BlockMask.from_kv_blocks(
            block_mask.full_kv_num_blocks,
            block_mask.full_kv_indices,
            BLOCK_SIZE=plan.block_size,
            mask_mod=_padding_mask_mod(key_padding_mask.to(torch.bool)),
            seq_lengths=(plan.seq_len, plan.seq_len),
        )
    flex = compiled_flex_attention()
    on_cpu = q.device.type == "cpu"
    if on_cpu and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        raise RuntimeError(
            "backend='flex' on CPU is inference-only (torch compiles FlexAttention without backward on CPU); "
            "run under torch.no_grad() or use backend='reference'."
        )
    if return_lse and not on_cpu:
        with _compile_guard():
            out, aux = flex(q, k, v, block_mask=block_mask, scale=scale, return_aux=AuxRequest(lse=True))
        return out, aux.lse.float()
    with torch.no_grad() if on_cpu else contextlib.nullcontext(), _compile_guard():
        out = flex(q, k, v, block_mask=block_mask, scale=scale)
    lse = None
    if return_lse:
        global _warned_cpu_lse
        if not _warned_cpu_lse:
            warnings.warn(
                "FlexAttention cannot return the LSE on CPU (a torch limitation); computing it with the reference "
                "executor (dense cost).",
                stacklevel=3,
            )
            _warned_cpu_lse = True
        from .reference import reference_attention

        plain = BlockPlan(plan.kv_num, plan.kv_idx, plan.block_size, plan.seq_len, None, plan.video_range)
        _, lse = reference_attention(q, k, v, plain, scale=scale, return_lse=True, key_padding_mask=key_padding_mask)
    return out, lse
