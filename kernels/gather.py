"""The ``gather`` executor: batched dense SDPA over the gathered key/value blocks of each query block.

The CPU executor for every dtype and every machine, compiler or not (the faster ``cpp`` kernel takes float32 only
and needs a C++ compiler; compiled FlexAttention costs 1.5-2.5x dense SDPA at full density there). It skips work by
handing torch's dense SDPA kernel only the work that is kept:

1. the plan's rows ``(batch, head, query block)`` are grouped into *buckets* of rows that keep the same number of
   key blocks ``n`` (and agree on whether their last key block is the sequence's partial tail block);
2. for each bucket, in chunks that bound memory, the query blocks ``[R, block, D]`` and their kept key/value blocks
   ``[R, n * block, D]`` are gathered with one ``index_select`` each, and one batched SDPA call computes them all;
3. the outputs are scattered back with one ``index_copy_``.

Query blocks whose key list no other block shares (radial's bands, draft's and cached's per-block choices) would
each be a 128-query call, and the CPU SDPA kernel runs those at 0.8-0.9 of its rate on long sequences. So (on the
CPU, ``split``) windows of 8, 4 and 2 such blocks that keep many key blocks in common are first computed as one
long-query call against the key blocks they all keep, and what is left of each block's list as a short call whose
result is merged with the window's by log-sum-exp (:func:`merge_partials`). Measured with ``vidsparse bench
attention`` at 32 760 tokens, density 0.25, block 128, one thread: efficiency (dense / sparse x density) radial
0.70-0.76 -> 0.90-0.93, cached 0.67-0.68 -> 0.92-0.93, draft 0.64-0.74 -> 0.77-0.78 with windows of neighbouring
blocks. Draft's blocks choose their keys by content, so neighbours share a fifth of them while blocks elsewhere in
the head share far more: windows built by matching blocks on shared keys (:func:`_similar_windows`) move the work
draft computes in 128-query calls from 0.74 to 0.33 of its pairs (radial's windows come out the same as the
neighbouring ones).

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

from .registry import Executor

#: Gathered key tokens per SDPA call (over the rows of a chunk; a single group longer than this is one call): bounds
#: the gathered K/V copies to 2 x 2^13 tokens x 64 dims x 4 bytes = 4 MiB in float32, which stay in cache between
#: the gather and the kernel. Measured at 32 760 / 14 040 tokens, density 0.25, one thread, interleaved: draft, radial
#: and cached ran 0-12 % faster than with 2^15 (16 MiB); 2^12 measured within the noise of 2^13.
DEFAULT_CHUNK_TOKENS = 1 << 13
#: Windows of query blocks tried, largest first, for a shared-key call (see :func:`gather_schedule`).
SPLIT_WINDOWS = (8, 4, 2)
#: Share of a window's not yet covered (query block, key block) pairs its shared keys must cover for the split to
#: be used. Low, because what a window leaves goes to the next, smaller window: on radial and draft plans (14k/32k
#: tokens) thresholds 0.15-0.45 measured within noise of each other, 0.6 was slower on radial.
MIN_COMMON_SHARE = 0.3


@dataclass(frozen=True)
class GatherBucket:
    """Groups of query blocks of the same shape: one batched SDPA call (per chunk of groups).

    A *group* is a set of query blocks of one (batch, head) computed as one query sequence against one gathered key
    sequence. It is either a set of blocks that keep exactly the same key blocks (window-like plans share lists
    between all the blocks of a frame; a dense plan is one group), or a window of blocks against the key blocks
    they *all* keep (their shared part), or one block against the rest of its list (its residual part,
    ``merge=True``: merged by log-sum-exp into the shared part's result). A bucket holds the groups with the same
    number of query blocks ``m`` and key blocks ``n`` (and the same tail handling), so they stack into one batch.

    Attributes:
        q_blocks: int64 ``[R, m]``: flat query block indices ``(b * H + h) * Qb + i`` of each group.
        kv_blocks: int64 ``[R, n]``: flat key block indices ``(b * H + h) * Qb + j`` of each group, ascending.
        keys: Key tokens each group attends: ``n * block_size``, less the padding of the partial tail block when
            the groups end with it (ascending order puts it last, so it is cut off instead of masked).
        merge: The groups' query blocks already hold a partial result (output and LSE) to merge with.
    """

    q_blocks: torch.Tensor
    kv_blocks: torch.Tensor
    keys: int
    merge: bool = False


def gather_schedule(plan: BlockPlan, batch: int, heads: int, *, split: bool = True) -> list[GatherBucket]:
    """The buckets of ``plan`` for q of ``batch`` x ``heads`` (the plan's B/H broadcast), cached on the plan.

    Query blocks that keep the same key list form one group. The others would each be a 128-query SDPA call, which
    the CPU kernel runs at 0.8-0.9 of its rate on long sequences (measured at 14k-32k tokens). With
    ``split``, windows of up to :data:`SPLIT_WINDOWS` such blocks (of one batch and head, matched on the key blocks
    they share: :func:`_similar_windows`) are tried: when the key blocks they all keep cover at least
    :data:`MIN_COMMON_SHARE` of their kept pairs, the window is one long-query call against those shared keys, and
    each block's remaining keys a short call merged by LSE (exact: the two key sets are disjoint and cover the
    block's list). Windows of 4 and 2 (inside those of 8) then try the same on what is left.
    A row's first call writes its result and later ones merge into it; the buckets come in that order.

    Computed with host synchronisations (bucket sizes must be known to slice them; the window matching checks once
    per round whether a match is left) once per (plan, batch, heads, split): a static plan pays for this once, a
    dynamic one once per new plan (draft at 32 760 tokens, 2 heads: about 19 ms, 1 % of its sparse call; 7 ms at
    14 040).
    """
    cache = plan.__dict__.setdefault("_gather_schedule_cache", {})
    cache_key = (batch, heads, split)
    if cache_key in cache:
        return cache[cache_key]
    if torch.compiler.is_compiling():
        # Built with host synchronisations (data-dependent sizes), which a compiled graph cannot hold: built
        # eagerly, as a graph break. vidsparse's root hook builds it before the forward for the static plans it
        # prepares (EXECUTOR.prepare), so a compiled processor finds it cached and traces the buckets as inputs.
        return _gather_schedule_eagerly(plan, batch, heads, split=split)
    qb, dev = plan.num_q_blocks, plan.device
    kmax = plan.kv_idx.shape[-1]
    rows = batch * heads * qb
    kv_num = plan.kv_num.expand(batch, heads, qb).reshape(-1).long()
    kv_idx = plan.kv_idx.expand(batch, heads, qb, kmax).reshape(-1, kmax).long()
    valid = torch.arange(kmax, device=dev) < kv_num[:, None]
    # keeps[r, j]: query block row r keeps key block j (an extra column swallows the padding entries).
    keeps = torch.zeros(rows, qb + 1, dtype=torch.bool, device=dev)
    keeps.scatter_(1, kv_idx.masked_fill(~valid, qb), True)
    keeps = keeps[:, :qb]
    head_of_row = torch.arange(rows, device=dev) // qb
    # Rows are identified by (batch*head, key list): identical keys group the query blocks that share a list.
    signature = torch.cat([head_of_row[:, None], kv_idx.masked_fill(~valid, -1)], dim=1)
    _, group_of_row = torch.unique(signature, dim=0, return_inverse=True)
    buckets: list[GatherBucket] = []
    alone = torch.bincount(group_of_row)[group_of_row] == 1
    remaining = keeps.clone()  # key blocks of each row not yet covered by a shared call
    has_partial = torch.zeros(rows, dtype=torch.bool, device=dev)
    candidates = alone.nonzero().squeeze(1)
    if split and candidates.numel() >= 2:
        windows = _similar_windows(keeps, alone, batch * heads, qb)
        for width in SPLIT_WINDOWS:
            # Windows nest (a window of 4 lies inside one of 8), so all members of a window either hold a partial
            # result from a larger window (their call merges) or none do (it writes). Window ids are row indices.
            window = windows[width][candidates]
            count = torch.bincount(window, minlength=rows)
            kept_by = torch.zeros(rows, qb, dtype=torch.int32, device=dev)
            kept_by.index_add_(0, window, remaining[candidates].int())
            common = (kept_by == count[:, None]) & (count[:, None] >= 2)
            left = torch.zeros(rows, dtype=torch.long, device=dev)
            left.index_add_(0, window, remaining[candidates].sum(1))
            shared = common.sum(1)
            accepted = (shared > 0) & (shared * count >= MIN_COMMON_SHARE * left)
            take = accepted[window]
            if not bool(take.any()):
                continue
            members, member_window = candidates[take], window[take]
            for merge in (False, True):
                chosen = has_partial[members] == merge
                if bool(chosen.any()):
                    _, group = torch.unique(member_window[chosen], return_inverse=True)
                    chosen_keys = common[member_window[chosen]]
                    buckets += _bucketize(plan, members[chosen], group, chosen_keys, merge=merge)
            remaining[members] &= ~common[member_window]
            has_partial[members] = True
    # Rows never in a window: groups of identical lists, computed first (they write, like the first windows).
    whole = (~has_partial).nonzero().squeeze(1)
    if whole.numel():
        _, group = torch.unique(group_of_row[whole], return_inverse=True)
        buckets = _bucketize(plan, whole, group, keeps[whole], merge=False) + buckets
    # What the windows left of each windowed row: one short call per row, merged.
    rest = (has_partial & remaining.any(1)).nonzero().squeeze(1)
    if rest.numel():
        buckets += _bucketize(plan, rest, torch.arange(rest.numel(), device=dev), remaining[rest], merge=True)
    cache[cache_key] = buckets
    return buckets


_gather_schedule_eagerly = torch.compiler.disable(gather_schedule)


def _similar_windows(keeps: torch.Tensor, candidate: torch.Tensor, heads: int, qb: int) -> dict[int, torch.Tensor]:
    """Nested windows of query blocks that keep many key blocks in common, for each width of :data:`SPLIT_WINDOWS`.

    Neighbouring blocks are not always the ones that share most: draft's and cached's per-block choices follow the
    content, so two blocks far apart in the sequence may keep nearly the same key blocks while neighbours share a
    fifth. So windows are built bottom-up by matching: first candidate blocks are paired, each with the block of its
    (batch, head) it shares the most key blocks with (rounds of mutual best matches: greedy, exact ties resolved by
    index), then pairs are paired by the key blocks both pairs keep, then quads. A block no partner shares anything
    with stays alone (a window of one, never split).

    Args:
        keeps: bool ``[heads * qb, qb]``: the key blocks each query block row keeps.
        candidate: bool ``[heads * qb]``: rows that may join a window (the others never do).
        heads: ``batch * heads`` of the rows.
        qb: Query blocks per (batch, head).

    Returns:
        ``{width: int64 [heads * qb]}``: each row's window id (a row index of its window's first member) at that
        width; windows of a smaller width lie inside those of a larger one.
    """
    dev = keeps.device
    index = torch.arange(qb, device=dev)
    shared_sets = keeps.view(heads, qb, qb).float()  # key blocks every member of a window keeps, at its leader
    leader = index.expand(heads, qb).clone()  # the window of each row, by its leader (a row of its head)
    size = candidate.view(heads, qb).long()  # members of each leader's window; 0: not a leader / not a candidate
    windows = {}
    for width in sorted(SPLIT_WINDOWS):
        # Matrix products count shared key blocks exactly in float32 (counts << 2^24).
        overlap = torch.bmm(shared_sets, shared_sets.transpose(1, 2))
        open_ = (size > 0) & (size <= width // 2)
        pairable = open_[:, :, None] & open_[:, None, :] & (index[:, None] != index[None, :])
        overlap = overlap.masked_fill(~pairable, -1.0)
        while True:
            best_shared, best = overlap.max(dim=2)
            # i and j are each other's best partner: matching them cannot take a better partner from anyone.
            mutual = (best_shared > 0) & (best.gather(1, best) == index) & (index < best)
            if not bool(mutual.any()):
                break
            head, first = mutual.nonzero(as_tuple=True)
            second = best[head, first]
            shared_sets[head, first] *= shared_sets[head, second]
            size[head, first] += size[head, second]
            size[head, second] = 0
            relabel = index.expand(heads, qb).clone()
            relabel[head, second] = first
            leader = relabel.gather(1, leader)
            for rows in (first, second):  # matched windows leave this width's pool
                overlap[head, rows, :] = -1.0
                overlap[head, :, rows] = -1.0
        windows[width] = (leader + (torch.arange(heads, device=dev) * qb)[:, None]).reshape(-1)
    return windows


def _bucketize(
    plan: BlockPlan,
    rows: torch.Tensor,
    group: torch.Tensor,
    row_keys: torch.Tensor,
    *,
    merge: bool,
) -> list[GatherBucket]:
    """Stack groups into buckets of equal (query blocks, key blocks, tail).

    Args:
        plan: The plan (block size, sequence length, query blocks per head).
        rows: int64 ``[N]`` flat query block rows.
        group: int64 ``[N]``: dense group id ``0 .. G-1`` of each row; rows of a group are in one (batch, head).
        row_keys: bool ``[N, Qb]``: the key blocks each row attends in its group (equal within a group).
        merge: Flag of the buckets made.
    """
    qb, bs = plan.num_q_blocks, plan.block_size
    pad = qb * bs - plan.seq_len
    order = torch.argsort(group, stable=True)  # rows of each group together, ascending within it
    rows, group = rows[order], group[order]
    group_size = torch.bincount(group)
    group_start = torch.cumsum(group_size, 0) - group_size
    keys = row_keys[order][group_start]  # [G, Qb]: one representative row per group
    n = keys.sum(1)
    ends_with_tail = keys[:, qb - 1] & (pad > 0)
    bucket_key = (group_size * (qb + 1) + n) * 2 + ends_with_tail.long()
    group_order = torch.argsort(bucket_key, stable=True)
    codes, counts = torch.unique_consecutive(bucket_key[group_order], return_counts=True)
    # Everything sorted by bucket once, so that each bucket below is a slice: its groups' member rows (m each) and
    # their key block columns (n each, ascending: nonzero walks each row in order).
    size_sorted = group_size[group_order]
    within = torch.arange(int(size_sorted.sum()), device=rows.device)
    within -= torch.repeat_interleave(torch.cumsum(size_sorted, 0) - size_sorted, size_sorted)
    members_sorted = rows[torch.repeat_interleave(group_start[group_order], size_sorted) + within]
    base = rows[group_start] // qb * qb  # offset of each group's (batch, head) slice in the flat block tensors
    kv_sorted = keys[group_order].nonzero()[:, 1] + torch.repeat_interleave(base[group_order], n[group_order])
    buckets, member_at, key_at = [], 0, 0
    for code, count in zip(codes.tolist(), counts.tolist(), strict=True):
        rest, tail = divmod(code, 2)
        m, n_keys = divmod(rest, qb + 1)
        members = members_sorted[member_at : member_at + count * m].view(count, m)
        kv_blocks = kv_sorted[key_at : key_at + count * n_keys].view(count, n_keys)
        member_at += count * m
        key_at += count * n_keys
        if n_keys == 0:
            continue  # query blocks that keep no key block: handled by the caller (zeros, LSE -inf)
        keys_kept = n_keys * bs - (pad if tail else 0)
        buckets.append(GatherBucket(members, kv_blocks, keys_kept, merge))
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
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    return_lse: bool,
    *,
    differentiable: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """SDPA on ``[R, 1, L, D]`` tensors with an optional bool ``mask [R, 1, Lq, Lk]``; LSE ``[R, 1, Lq]`` on request.

    ``differentiable``: gradients must flow into the LSE too (SDPA's flash kernels return it without one), and
    queries that see no key must get zero gradients (SDPA's masked softmax gives NaN there): explicit softmax.
    """
    if differentiable and (return_lse or mask is not None):
        return _explicit_attention(q, k, v, mask, scale)
    if not return_lse:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale), None
    if q.device.type == "cpu" and not differentiable:
        # The CPU flash kernel behind SDPA returns the LSE; it takes an additive mask of q's dtype.
        additive = None if mask is None else torch.zeros(mask.shape, dtype=q.dtype).masked_fill(~mask, -math.inf)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=additive, scale=scale)
    else:
        return _explicit_attention(q, k, v, mask, scale)
    lse = lse.float()
    if mask is not None:  # a query that sees no key at all: LSE -inf, as the reference gives
        lse = lse.masked_fill(~mask.any(-1), -math.inf)
    return out, lse


def _explicit_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention written out in float32: ``(out [R, 1, Lq, D] in q's dtype, lse float32 [R, 1, Lq])``.

    Differentiable in every output; a query that sees no key gets zeros, LSE ``-inf`` and zero gradients (its LSE
    is replaced by 0 before the exponent, so no ``-inf - -inf`` NaN reaches autograd).
    """
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, -math.inf)
    lse = torch.logsumexp(scores, dim=-1)
    finite_lse = torch.where(torch.isfinite(lse), lse, 0.0)
    out = torch.matmul(torch.exp(scores - finite_lse[..., None]), v.float()).to(q.dtype)
    return out, lse


def merge_partials(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over the union of two disjoint key sets from the results over each.

    Args:
        out_a, out_b: ``[..., L, D]`` outputs over key sets A and B.
        lse_a, lse_b: float32 ``[..., L]`` their natural-log LSEs (``-inf``: the query saw no key of that set).

    Returns:
        ``(out [..., L, D] in out_a's dtype, lse float32 [..., L])``: softmax-weighted by each set's share
        ``exp(lse_x - lse)``; a query that saw no key in either set gets zeros and ``-inf``.
    """
    lse = torch.logaddexp(lse_a, lse_b)
    seen = torch.isfinite(lse)
    safe = torch.where(seen, lse, 0.0)
    weight_a = torch.where(seen, torch.exp(lse_a - safe), 0.0)[..., None]
    weight_b = torch.where(seen, torch.exp(lse_b - safe), 0.0)[..., None]
    out = (out_a.float() * weight_a + out_b.float() * weight_b).to(out_a.dtype)
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
    split: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The ``gather`` executor (:class:`~vidsparse.kernels.registry.ExecutorFn`): SDPA over gathered blocks.

    Batched SDPA calls over the gathered key/value blocks of groups of query blocks; any dtype, any device.

    Args (beyond the executors' own):
        chunk_tokens: Gathered key tokens per SDPA call (memory bound: ``2 * chunk_tokens * D`` elements).
        split: Compute windows of query blocks against their shared keys in long calls and merge the
            rest by LSE (:func:`gather_schedule`); default: on the CPU, where short-query SDPA calls are slow.
    """
    b, h, s, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qb, bs = plan.num_q_blocks, plan.block_size
    q_blocks, k_blocks, v_blocks = (_blocked(x, qb, bs) for x in (q, k, v))
    # Gradients flow through plain autograd ops (index_select, SDPA, index_copy). Two fast-path tricks would break
    # them: gathering into reused buffers (``out=`` has no autograd) and the split windows, which merge partial
    # results by their LSE while SDPA's LSE output has no gradient. So with gradients: fresh gathers, no split.
    differentiable = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    split = _default_split(q.device, differentiable) if split is None else split and not differentiable
    schedule = gather_schedule(plan, b, h, split=split)
    need_lse = return_lse or any(bucket.merge for bucket in schedule)
    # Zeros and LSE -inf: what a query block that keeps no key block gets (as the reference gives).
    out = torch.zeros_like(q_blocks)
    lse = torch.full(q_blocks.shape[:2], -math.inf, dtype=torch.float32, device=q.device) if need_lse else None

    # The model's masks, per (batch, head) row and token like the blocked tensors (heads share them).
    keep_blocks = group_blocks = None
    if key_padding_mask is not None:
        keep_blocks = _blocked(key_padding_mask.to(torch.bool)[:, None, :, None].expand(b, h, s, 1), qb, bs)[..., 0]
    if causal_groups is not None:
        groups = causal_groups.expand(b, s)[:, None, :, None].expand(b, h, s, 1)
        group_blocks = _blocked(groups, qb, bs)[..., 0]

    chunk_tokens = chunk_tokens or DEFAULT_CHUNK_TOKENS
    # One pair of gather buffers reused by every chunk: fresh multi-MiB allocations page-fault on every call, and a
    # buffer that stays the same size stays in cache.
    buf_blocks = max(_groups_per_chunk(bucket, bs, chunk_tokens) * bucket.kv_blocks.shape[1] for bucket in schedule)
    k_buf = None if differentiable else k_blocks.new_empty(buf_blocks, bs, d)
    v_buf = None if differentiable else v_blocks.new_empty(buf_blocks, bs, d)
    for bucket in schedule:
        m, n = bucket.q_blocks.shape[1], bucket.kv_blocks.shape[1]
        step = _groups_per_chunk(bucket, bs, chunk_tokens)
        for start in range(0, bucket.q_blocks.shape[0], step):
            rows = bucket.q_blocks[start : start + step].reshape(-1)
            flat_kv = bucket.kv_blocks[start : start + step].reshape(-1)
            r = rows.numel() // m
            qg = q_blocks.index_select(0, rows).view(r, 1, m * bs, d)
            if differentiable:
                kg, vg = k_blocks.index_select(0, flat_kv), v_blocks.index_select(0, flat_kv)
            else:
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
            out_rows, lse_rows = _attend(qg, kg, vg, mask, scale, need_lse, differentiable=differentiable)
            out_rows = out_rows.view(r * m, bs, d)
            if lse_rows is not None:
                lse_rows = lse_rows.reshape(r * m, bs)
            if bucket.merge:
                earlier = out.index_select(0, rows), lse.index_select(0, rows)  # the shared keys' result
                out_rows, lse_rows = merge_partials(*earlier, out_rows, lse_rows)
            out.index_copy_(0, rows, out_rows)
            if lse is not None:
                lse.index_copy_(0, rows, lse_rows)
    out = out.view(b, h, qb * bs, d)[:, :, :s]
    if not return_lse:
        lse = None
    if lse is not None:
        lse = lse.view(b, h, qb * bs)[:, :, :s]
    return out, lse


def _default_split(device: torch.device, differentiable: bool) -> bool:
    """The executor's default ``split``: on the CPU, and never with gradients (see the executor)."""
    return device.type == "cpu" and not differentiable


def prepare_schedule(plan: BlockPlan, batch: int, heads: int, needs_grad: bool) -> None:
    """Build (and cache on ``plan``) the schedule the executor will use for q of ``batch`` x ``heads``."""
    gather_schedule(plan, batch, heads, split=_default_split(plan.device, needs_grad))


EXECUTOR = Executor(
    name="gather",
    run=gather_block_sparse_attention,
    summary="batched SDPA over the gathered key/value blocks: any dtype, no compiler; the CPU fallback",
    devices=("cpu",),
    has_backward=True,
    prepare=prepare_schedule,
)
