"""The ``reference`` executor: dense SDPA with the plan's token-level boolean mask.

This is the specification every other executor is tested against. It works in the *original* token order (the
plan's mask is permuted back), so comparing an executor that runs in plan order against it also checks the
permutation. Memory and time are O(S²): tests and small sequences only.
"""

from __future__ import annotations

import math

import torch

from vidsparse.plan import BlockPlan

from .registry import Executor


def reference_attention(
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
    """The ``reference`` executor (:class:`~vidsparse.kernels.registry.ExecutorFn`): masked dense attention.

    It takes the *original* token order (``plan_order=False``): the plan's mask is expanded to tokens and un-permuted.
    """
    b, h, s, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    mask = plan.to_dense_mask(original_order=True)  # the dispatcher moved the plan to q.device
    if key_padding_mask is not None:
        mask = mask & key_padding_mask[:, None, None, :].to(torch.bool)
    if causal_groups is not None:
        mask = mask & (causal_groups[:, None, None, :] <= causal_groups[:, None, :, None])
    mask = mask.expand(b, h, s, s)
    # Computed in float32 (float64 for float64 inputs, so that gradcheck can check it) with an explicit softmax: it is
    # the oracle, precision matters more than speed.
    compute = torch.promote_types(q.dtype, torch.float32)
    scores = torch.matmul(q.to(compute), k.to(compute).transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    # A query that sees no key (an empty plan row, or all its keys padded) gets zeros and zero gradients: its LSE is
    # -inf, replaced by 0 here so that exp(-inf - 0) = 0 instead of exp(-inf - -inf) = NaN reaching autograd.
    probs = torch.exp(scores - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
    out = torch.matmul(probs, v.to(compute)).to(q.dtype)
    return out, (lse if return_lse else None)


EXECUTOR = Executor(
    name="reference",
    run=reference_attention,
    summary="dense SDPA with the plan's boolean mask: the specification, O(S^2), for tests",
    has_backward=True,
    plan_order=False,
)
