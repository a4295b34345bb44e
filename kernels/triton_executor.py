"""The ``triton`` executor's entry: the block-sparse flash-attention kernel of ``kernels/block_sparse_attn.py``.

The kernel module imports Triton at its top, so this entry is a file of its own: the registry can list the executor
(and ``auto`` can skip it, with a warning) on machines where Triton does not import, without importing it there.
"""

from __future__ import annotations

import functools

import torch

from vidsparse.plan import BlockPlan

from .planning import key_to_query_index
from .registry import Executor


@functools.cache
def triton_available() -> bool:
    """True when Triton and its block-sparse kernel import (the kernel itself needs CUDA unless interpreted)."""
    try:
        from . import block_sparse_attn  # noqa: F401
    except Exception:  # any import problem means "not available": auto falls back with a warning
        return False
    return True


def triton_block_sparse_attention(
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
    """The ``triton`` executor (:class:`~vidsparse.kernels.registry.ExecutorFn`) over the Triton kernels.

    float16/bfloat16/float32, head dims up to 256 (16/32/64/128 unpadded), CUDA tensors (CPU tensors under
    ``TRITON_INTERPRET=1``). Differentiable: ``loss.backward()`` runs the Triton backward, which walks the plan
    transposed; that index is built (once per plan, cached on it) only when q, k or v require grad.
    """
    if not triton_available():
        raise RuntimeError("backend='triton' requested but the Triton kernel could not be imported.")
    from .block_sparse_attn import block_sparse_attn

    transposed = {}
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        # Inference never needs it: a new plan per call (dynamic methods) would pay for it at every call.
        transposed["q_num"], transposed["q_idx"] = key_to_query_index(plan)

    out, lse = block_sparse_attn(
        q,  # strided views: the kernel reads strides (only the last dim must be dense), no copies
        k,
        v,
        plan.kv_num,
        plan.kv_idx,
        block_size=plan.block_size,
        scale=scale,
        key_padding_mask=key_padding_mask,
        causal_groups=causal_groups,
        **transposed,
    )
    return out, (lse if return_lse else None)


EXECUTOR = Executor(
    name="triton",
    run=triton_block_sparse_attention,
    summary="block-sparse flash-attention kernel in Triton, with its backward: the fast path on CUDA",
    devices=("cuda",),
    dtypes=(torch.float16, torch.bfloat16, torch.float32),
    has_backward=True,
    available=triton_available,
    unavailable="the Triton kernel could not be imported",
)
