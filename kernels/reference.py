"""The ``reference`` executor: dense SDPA with the plan's token-level boolean mask.

This is the specification every other executor is tested against. It works in the *original* token order (the
plan's mask is permuted back), so comparing an executor that runs in plan order against it also checks the
permutation. Memory and time are O(S²): tests and small sequences only.
"""

from __future__ import annotations

import math

import torch

from vidsparse.plan import BlockPlan


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
    """Masked dense attention.

    Args:
        q, k, v: ``[B, H, S, D]`` in the original token order.
        plan: The block plan (its mask is expanded to tokens and un-permuted).
        scale: Softmax scale; default ``1/sqrt(D)``.
        return_lse: Also return the natural-log log-sum-exp of each query row.
        key_padding_mask: Optional bool ``[B, S]``, True for keys that may be attended (ANDed with the plan).
        causal_groups: Optional int ``[B or 1, S]``: query ``i`` may attend key ``j`` only when
            ``causal_groups[j] <= causal_groups[i]`` (block-causal masks; ANDed with the plan).

    Returns:
        ``(out [B, H, S, D], lse float32 [B, H, S] or None)``.
    """
    b, h, s, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    mask = plan.to(q.device).to_dense_mask(original_order=True)
    if key_padding_mask is not None:
        mask = mask & key_padding_mask[:, None, None, :].to(torch.bool)
    if causal_groups is not None:
        mask = mask & (causal_groups[:, None, None, :] <= causal_groups[:, None, :, None])
    mask = mask.expand(b, h, s, s)
    # Computed in float32 with an explicit softmax: it is the oracle, precision matters more than speed.
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None])
    probs = torch.nan_to_num(probs, nan=0.0)  # fully masked rows (only possible with key padding) give 0
    out = torch.matmul(probs, v.float()).to(q.dtype)
    return out, (lse if return_lse else None)
