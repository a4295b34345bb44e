"""The ``gather`` executor: batched dense SDPA over the gathered key/value blocks of each query block.

Where no block-sparse kernel is fast (the CPU: compiled FlexAttention there costs 1.5-2.5x dense SDPA at full
density), the fastest exact way to skip work is to hand the dense SDPA kernel only the work that is kept:

1. the plan's rows ``(batch, head, query block)`` are grouped into *buckets* of rows that keep the same number of
   key blocks ``n`` (and agree on whether their last key block is the sequence's partial tail block);
2. for each bucket, in chunks that bound memory, the query blocks ``[R, block, D]`` and their kept key/value blocks
   ``[R, n * block, D]`` are gathered with one ``index_select`` each, and one batched SDPA call computes them all;
3. the outputs are scattered back with one ``index_copy_``.

The bucketing (which rows go where) depends only on the plan, so it is computed once per plan and batch/head shape
and cached on the plan: a static plan (radial, window) pays for it once, a dynamic one once per new plan. Rows
sorted ascending put the partial tail block last, so its padding keys are cut off the gathered sequence instead of
masked: no mask, the fast SDPA path. The model's own masks (padded text keys, block-causal groups) are applied per
token with an SDPA mask, only when given.

Exact: every kept query-key pair is computed once with the same softmax as dense SDPA; tested against
``reference`` like every executor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vidsparse.plan import BlockPlan

#: Gathered key tokens per SDPA call (over the rows of a chunk): bounds the memory of the gathered K/V copies
#: (2 x 2^16 tokens x 64 dims x 4 bytes = 32 MiB in float32) while keeping each call large enough to be efficient.
DEFAULT_CHUNK_TOKENS = 1 << 15


@dataclass(frozen=True)
class GatherBucket:
    """Groups of query blocks of the same shape: one batched SDPA call (per chunk of groups).

    A *group* is a set of query blocks of one (batch, head) that keep exactly the same key blocks: they are
    computed as one query sequence against one gathered key sequence (window-like plans share lists between all the
    blocks of a frame; a dense plan is one group). A bucket holds the groups with the same number of query blocks
    ``m`` and key blocks ``n`` (and the same tail handling), so they stack into one batch.

    Attributes:
        q_blocks: int64 ``[R, m]``: flat query block indices ``(b * H + h) * Qb + i`` of each group.
        kv_blocks: int64 ``[R, n]``: flat key block indices ``(b * H + h) * Qb + j`` of each group, ascending.
        keys: Key tokens each group attends: ``n * block_size``, less the padding of the partial tail block when
            the groups end with it (ascending order puts it last, so it is cut off instead of masked).
    """

    q_blocks: torch.Tensor
    kv_blocks: torch.Tensor
    keys: int


def gather_schedule(plan: BlockPlan, batch: int, heads: int) -> list[GatherBucket]:
    """The buckets of ``plan`` for q of ``batch`` x ``heads`` (the plan's B/H broadcast), cached on the plan.

    Computed with a few host synchronisations per (plan, batch, heads): bucket sizes must be known to slice them.
    A static plan pays for this once; a dynamic one once per new plan.
    """
    cache = plan.__dict__.setdefault("_gather_schedule_cache", {})
    key = (batch, heads)
    if key in cache:
        return cache[key]
    qb, bs = plan.num_q_blocks, plan.block_size
    pad = qb * bs - plan.seq_len
    kmax = plan.kv_idx.shape[-1]
    bh = batch * heads
    kv_num = plan.kv_num.expand(batch, heads, qb).reshape(-1).long()
    kv_idx = plan.kv_idx.expand(batch, heads, qb, kmax).reshape(-1, kmax).long()
    valid = torch.arange(kmax, device=plan.device) < kv_num[:, None]
    # Rows are identified by (batch*head, key list): identical keys group the query blocks that share a list.
    head_of_row = torch.arange(bh, device=plan.device).repeat_interleave(qb)
    signature = torch.cat([head_of_row[:, None], kv_idx.masked_fill(~valid, -1)], dim=1)
    _, group_of_row = torch.unique(signature, dim=0, return_inverse=True)
    rows_by_group = torch.argsort(group_of_row, stable=True)
    group_size = torch.bincount(group_of_row)
    first_row = rows_by_group[torch.cumsum(group_size, 0) - group_size]  # one representative row per group
    n = kv_num[first_row]
    ends_with_tail = (kv_idx[first_row, :].gather(1, (n - 1)[:, None]).squeeze(1) == qb - 1) & (pad > 0)
    # Bucket key (m, n, tail) in one integer; groups sorted by it, query blocks of each group in ascending order.
    bucket_key = (group_size * (qb + 1) + n) * 2 + ends_with_tail.long()
    group_order = torch.argsort(bucket_key, stable=True)
    group_start = torch.cumsum(group_size, 0) - group_size
    keys, counts = torch.unique_consecutive(bucket_key[group_order], return_counts=True)
    buckets = []
    start = 0
    for bucket, count in zip(keys.tolist(), counts.tolist(), strict=True):
        groups = group_order[start : start + count]
        start += count
        rest, tail = divmod(bucket, 2)
        m, n_keys = divmod(rest, qb + 1)
        members = rows_by_group[group_start[groups, None] + torch.arange(m, device=plan.device)]
        reps = first_row[groups]
        base = (reps // qb * qb)[:, None]  # offset of the group's (batch, head) slice in the flat block tensors
        kv_blocks = kv_idx[reps, :n_keys] + base
        buckets.append(GatherBucket(members.contiguous(), kv_blocks.contiguous(), n_keys * bs - (pad if tail else 0)))
    cache[key] = buckets
    return buckets


def _groups_per_chunk(bucket: GatherBucket, block_size: int, chunk_tokens: int) -> int:
    """Groups of ``bucket`` per SDPA call: as many as fit ``chunk_tokens`` gathered keys, at least one."""
    n = bucket.kv_blocks.shape[1]
    return min(bucket.kv_blocks.shape[0], max(1, chunk_tokens // (n * block_size)))


def _blocked(x: torch.Tensor, num_blocks: int, block_size: int) -> torch.Tensor:
    """``[B, H, S, ...]`` -> ``[B * H * Qb, block, ...]``, zero-padding the partial tail block."""
    b, h, s = x.shape[:3]
    pad = num_blocks * block_size - s
    if pad:
        x = torch.cat([x, x.new_zeros(b, h, pad, *x.shape[3:])], dim=2)
    return x.reshape(b * h * num_blocks, block_size, *x.shape[3:])


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float, return_lse: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """SDPA on ``[R, 1, L, D]`` tensors with an optional bool ``mask [R, 1, Lq, Lk]``; LSE ``[R, 1, Lq]`` on request."""
    if not return_lse:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale), None
    if q.device.type == "cpu":
        # The CPU flash kernel behind SDPA returns the LSE; it takes an additive mask of q's dtype.
        additive = None if mask is None else torch.zeros(mask.shape, dtype=q.dtype).masked_fill(~mask, -math.inf)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=additive, scale=scale)
    else:
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
        if mask is not None:
            scores = scores.masked_fill(~mask, -math.inf)
        lse = torch.logsumexp(scores, dim=-1)
        out = torch.matmul(torch.nan_to_num(torch.exp(scores - lse[..., None])), v.float()).to(q.dtype)
    lse = lse.float()
    if mask is not None:  # a query that sees no key at all: LSE -inf, as the reference gives
        lse = lse.masked_fill(~mask.any(-1), -math.inf)
    return out, lse


def gather_block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: BlockPlan,
    *,
    scale: float | None = None,
    return_lse: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    causal_groups: torch.Tensor | None = None,
    chunk_tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Block-sparse attention as batched SDPA calls over gathered key/value blocks.

    Args:
        q, k, v: ``[B, H, S, D]`` in *plan order*.
        plan: The plan, on the same device as ``q`` (its B and H broadcast).
        scale: Softmax scale; default ``1/sqrt(D)``.
        return_lse: Also return the natural-log LSE ``[B, H, S]`` (float32, plan order).
        key_padding_mask: Optional bool ``[B, S]`` in plan order; True keys may be attended.
        causal_groups: Optional int ``[B or 1, S]`` in plan order: a query sees a key only when the key's group is
            not greater than its own.
        chunk_tokens: Gathered key tokens per SDPA call (memory bound: ``2 * chunk_tokens * D`` elements).

    Returns:
        ``(out [B, H, S, D], lse or None)``.
    """
    b, h, s, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qb, bs = plan.num_q_blocks, plan.block_size
    q_blocks, k_blocks, v_blocks = (_blocked(x, qb, bs) for x in (q, k, v))
    out = torch.empty_like(q_blocks)
    lse = torch.empty(q_blocks.shape[:2], dtype=torch.float32, device=q.device) if return_lse else None

    # The model's masks, per (batch, head) row and token like the blocked tensors (heads share them).
    keep_blocks = group_blocks = None
    if key_padding_mask is not None:
        keep_blocks = _blocked(key_padding_mask.to(torch.bool)[:, None, :, None].expand(b, h, s, 1), qb, bs)[..., 0]
    if causal_groups is not None:
        groups = causal_groups.expand(b, s)[:, None, :, None].expand(b, h, s, 1)
        group_blocks = _blocked(groups, qb, bs)[..., 0]

    chunk_tokens = chunk_tokens or DEFAULT_CHUNK_TOKENS
    schedule = gather_schedule(plan, b, h)
    # One pair of gather buffers reused by every chunk: fresh multi-MiB allocations page-fault on every call, and a
    # buffer that stays the same size stays in cache.
    buf_blocks = max(_groups_per_chunk(bucket, bs, chunk_tokens) * bucket.kv_blocks.shape[1] for bucket in schedule)
    k_buf = k_blocks.new_empty(buf_blocks, bs, d)
    v_buf = v_blocks.new_empty(buf_blocks, bs, d)
    for bucket in schedule:
        m, n = bucket.q_blocks.shape[1], bucket.kv_blocks.shape[1]
        step = _groups_per_chunk(bucket, bs, chunk_tokens)
        for start in range(0, bucket.q_blocks.shape[0], step):
            rows = bucket.q_blocks[start : start + step].reshape(-1)
            flat_kv = bucket.kv_blocks[start : start + step].reshape(-1)
            r = rows.numel() // m
            qg = q_blocks.index_select(0, rows).view(r, 1, m * bs, d)
            kg = torch.index_select(k_blocks, 0, flat_kv, out=k_buf[: r * n])
            vg = torch.index_select(v_blocks, 0, flat_kv, out=v_buf[: r * n])
            kg = kg.view(r, 1, n * bs, d)[:, :, : bucket.keys]
            vg = vg.view(r, 1, n * bs, d)[:, :, : bucket.keys]
            mask = None
            if keep_blocks is not None:
                mask = keep_blocks.index_select(0, flat_kv).view(r, 1, 1, n * bs)[..., : bucket.keys]
            if group_blocks is not None:
                key_groups = group_blocks.index_select(0, flat_kv).view(r, 1, 1, n * bs)[..., : bucket.keys]
                query_groups = group_blocks.index_select(0, rows).view(r, 1, m * bs, 1)
                visible = key_groups <= query_groups
                mask = visible if mask is None else mask & visible
            if mask is not None:
                mask = mask.expand(r, 1, m * bs, bucket.keys)
            out_rows, lse_rows = _attend(qg, kg, vg, mask, scale, return_lse)
            out.index_copy_(0, rows, out_rows.view(r * m, bs, d))
            if lse is not None:
                lse.index_copy_(0, rows, lse_rows.reshape(r * m, bs))
    out = out.view(b, h, qb * bs, d)[:, :, :s]
    if lse is not None:
        lse = lse.view(b, h, qb * bs)[:, :, :s]
    return out, lse
