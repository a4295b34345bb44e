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

from vidsparse.plan import BlockPlan, block_mask_to_indices

from .masks import fully_visible_pairs
from .registry import Executor

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


def _model_mask_mod(key_padding_mask: torch.Tensor | None, causal_groups: torch.Tensor | None) -> Callable:
    """A FlexAttention mask_mod for the model's masks (both in plan order; either may be None).

    ``key_padding_mask`` bool ``[B, S]`` hides padded keys; ``causal_groups`` int ``[B, S]`` lets a query see a key
    only when the key's group is not later than its own.
    """

    def model_mask(b, h, q_idx, kv_idx):
        keep = torch.ones_like(q_idx, dtype=torch.bool) if key_padding_mask is None else key_padding_mask[b, kv_idx]
        if causal_groups is not None:
            keep = keep & (causal_groups[b, kv_idx] <= causal_groups[b, q_idx])
        return keep

    return model_mask


def _masked_block_mask(
    plan: BlockPlan, batch: int, key_padding_mask: torch.Tensor | None, causal_groups: torch.Tensor | None
):
    """The plan's BlockMask with the model's masks ANDed.

    Kept pairs the masks may hide become *partial* blocks (mask_mod evaluated); fully visible ones stay *full* (no
    mask_mod: the fast path).
    """
    from torch.nn.attention.flex_attention import BlockMask

    kept = plan.block_mask()
    visible = fully_visible_pairs(plan, key_padding_mask, causal_groups)
    full, partial = kept & visible, kept & ~visible  # [B or 1, H or 1, Qb, Kb]: FlexAttention broadcasts them
    kv_num, kv_idx = block_mask_to_indices(partial)
    full_num, full_idx = block_mask_to_indices(full)
    # The mask_mod indexes the masks with the query's batch index: give them the full batch.
    if key_padding_mask is not None:
        key_padding_mask = key_padding_mask.to(torch.bool).expand(batch, -1).contiguous()
    if causal_groups is not None:
        causal_groups = causal_groups.expand(batch, -1).contiguous()
    return BlockMask.from_kv_blocks(
        kv_num,
        kv_idx,
        full_num,
        full_idx,
        BLOCK_SIZE=plan.block_size,
        mask_mod=_model_mask_mod(key_padding_mask, causal_groups),
        seq_lengths=(plan.seq_len, plan.seq_len),
    )


# Inside a caller's compiled region this runs as a graph break, on purpose: traced into the caller's graph,
# FlexAttention is compiled by the caller's backend, and any backend but inductor (eager, aot_eager) runs it eagerly,
# where it ignores the block lists (a silent dense result); the recompile guard's config patch cannot be traced
# either. Run eagerly, it calls its own compiled FlexAttention, as without an outer compile.
@torch.compiler.disable
def flex_block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: BlockPlan,
    *,
    scale: float | None = None,
    return_lse: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    causal_groups: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The ``flex`` executor (:class:`~vidsparse.kernels.registry.ExecutorFn`): compiled FlexAttention.

    Runs on CPU and GPU; gradients on CUDA only (torch compiles FlexAttention for inference only on the CPU).
    """
    from torch.nn.attention.flex_attention import AuxRequest

    d = q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    if key_padding_mask is None and causal_groups is None:
        block_mask = plan.to_block_mask()
    else:
        # The model's masks need a mask_mod, which FlexAttention only evaluates in *partial* blocks.
        block_mask = _masked_block_mask(plan, q.shape[0], key_padding_mask, causal_groups)
    flex = compiled_flex_attention()
    on_cpu = q.device.type == "cpu"
    # Gradients on CPU never get here: the registry entry says the backward runs on CUDA only, and the dispatcher
    # refuses (torch compiles FlexAttention without a backward on CPU).
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
        _, lse = reference_attention(
            q,
            k,
            v,
            plain,
            scale=scale,
            return_lse=True,
            key_padding_mask=key_padding_mask,
            causal_groups=causal_groups,
        )
    return out, lse


EXECUTOR = Executor(
    name="flex",
    run=flex_block_sparse_attention,
    summary="compiled FlexAttention over the plan's BlockMask: portable to CPU and GPU",
    has_backward=True,
    backward_devices=("cuda",),
)
