"""The model's own masks, ANDed with a plan: key padding and block-causal groups, at block level.

Executors receive two kinds of model masks next to the plan (both in *plan order* here):

- ``key_padding_mask`` bool ``[B, S]``: False marks keys nobody may attend (padded text);
- ``causal_groups`` int ``[B or 1, S]``: query ``i`` may attend key ``j`` only when
  ``causal_groups[j] <= causal_groups[i]``. Frame-block-causal masks (SkyReels-V2 diffusion forcing, where a frame
  sees its own block of frames and the earlier ones) are of this form with ``group = latent frame // frames per
  block``; token-causal masks are ``group = position``. The representation is one integer per token, so it follows
  the tokens through a plan's permutation and costs O(S) memory where the model's boolean mask costs O(S²).

The executors apply both per token; this module does the block-level part that makes them cheap: dropping block
pairs that the groups mask completely (so they are not computed at all), and telling which kept pairs are fully
visible (FlexAttention can then skip its ``mask_mod`` there).
"""

from __future__ import annotations

import torch

from vidsparse.plan import BlockPlan, num_blocks, trim_to_longest_row

__all__ = ["block_min_max", "fully_visible_pairs", "restrict_to_causal_groups"]


def block_min_max(values: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block minimum and maximum of ``values`` ``[B, S]`` (the partial last block ignores its missing tail).

    Returns:
        ``(min, max)``, each ``[B, ceil(S / block_size)]`` in ``values``' dtype.
    """
    b, s = values.shape
    nb = num_blocks(s, block_size)
    pad = nb * block_size - s
    if pad:
        # Repeat the last real value: it changes neither the minimum nor the maximum of the tail block.
        values = torch.cat([values, values[:, -1:].expand(b, pad)], dim=1)
    blocks = values.view(b, nb, block_size)
    return blocks.amin(-1), blocks.amax(-1)


def restrict_to_causal_groups(plan: BlockPlan, causal_groups: torch.Tensor) -> BlockPlan:
    """The plan ANDed with a block-causal mask at block level: pairs whose every key is hidden are dropped.

    A pair (query block i, key block j) survives when some key of j may be seen by some query of i, i.e. when
    ``min(groups of j) <= max(groups of i)``. Every query block keeps its own block (a token always sees itself),
    so the plan's invariants hold.

    Args:
        plan: The method's plan.
        causal_groups: int ``[B or 1, S]`` in plan order.

    Returns:
        A plan with batch dimension ``max(plan B, groups B)``, same permutation, video range and meta.
    """
    # On the index lists, not through a dense [B, H, Qb, Kb] mask: this runs on every call of a causal model.
    gmin, gmax = block_min_max(causal_groups, plan.block_size)  # [Bg, Qb]
    b = max(plan.kv_num.shape[0], gmin.shape[0])
    _, h, qb = plan.kv_num.shape
    kmax = plan.kv_idx.shape[-1]
    kv_idx = plan.kv_idx.expand(b, h, qb, kmax)
    kv_num = plan.kv_num.expand(b, h, qb)
    gmin, gmax = gmin.expand(b, qb), gmax.expand(b, qb)
    batch = torch.arange(b, device=kv_idx.device)[:, None, None, None]
    reachable = gmin[batch, kv_idx.long()] <= gmax[:, None, :, None]  # [B, H, Qb, Kmax]
    keep = reachable & (torch.arange(kmax, device=kv_idx.device) < kv_num[..., None])
    # A stable sort of ~keep moves the kept entries first, still ascending; the rest is padding (valid indices).
    order = torch.sort((~keep).to(torch.uint8), dim=-1, stable=True).indices
    new_num = keep.sum(-1, dtype=torch.int32)
    new_idx = trim_to_longest_row(new_num, kv_idx.gather(-1, order))
    return BlockPlan(new_num, new_idx, plan.block_size, plan.seq_len, plan.perm, plan.video_range, dict(plan.meta))


def fully_visible_pairs(
    plan: BlockPlan, key_padding_mask: torch.Tensor | None, causal_groups: torch.Tensor | None
) -> torch.Tensor:
    """Bool ``[B, 1, Qb, Kb]``: block pairs in which no (query, key) pair is hidden by the model's masks.

    Args:
        plan: The plan (its block size and length).
        key_padding_mask: bool ``[B, S]`` in plan order, or None.
        causal_groups: int ``[B or 1, S]`` in plan order, or None.
    """
    qb = plan.num_q_blocks
    visible = torch.ones(1, 1, qb, qb, dtype=torch.bool, device=plan.device)
    if key_padding_mask is not None:
        all_valid, _ = block_min_max(key_padding_mask.to(torch.uint8), plan.block_size)
        visible = visible & all_valid.bool()[:, None, None, :]
    if causal_groups is not None:
        gmin, gmax = block_min_max(causal_groups, plan.block_size)
        visible = visible & (gmax[:, None, None, :] <= gmin[:, None, :, None])
    return visible
