"""Triton kernels behind :mod:`vidsparse.kernels.planning` (call them through its dispatcher).

Both are single-pass, memory-bound kernels: one program per output row, reading its input once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vidsparse.plan import num_blocks

__all__ = ["block_mask_to_lut_triton", "block_means_triton"]


@triton.jit
def _block_means_kernel(
    X,
    Out,
    seq_len,
    head_dim,
    group,
    stride_xr,
    stride_xs,
    stride_xd,
    stride_or,
    stride_og,
    CHUNK: tl.constexpr,
    D_POW2: tl.constexpr,
):
    """Program (g, r): Out[r, g, :] = mean of X[r, g*group : min((g+1)*group, S), :] in float32."""
    g = tl.program_id(0)
    r = tl.program_id(1).to(tl.int64)
    offs_d = tl.arange(0, D_POW2)  # D rounded up to a power of two for tl.arange; the extra columns are masked
    in_d = offs_d < head_dim
    start = g * group
    end = tl.minimum(start + group, seq_len)  # the last group may be partial
    base = X + r * stride_xr
    # Accumulate a CHUNK x D tile and reduce once at the end: one cross-thread reduction instead of one per chunk.
    acc = tl.zeros([CHUNK, D_POW2], dtype=tl.float32)
    for c in range(start, end, CHUNK):
        rows = c + tl.arange(0, CHUNK)
        m = (rows < end)[:, None] & in_d[None, :]
        tile = tl.load(base + rows[:, None] * stride_xs + offs_d[None, :] * stride_xd, mask=m, other=0.0)
        acc += tile.to(tl.float32)
    mean = tl.sum(acc, 0) / (end - start).to(tl.float32)
    tl.store(Out + r * stride_or + g * stride_og + offs_d, mean, mask=in_d)


def block_means_triton(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Triton version of :func:`vidsparse.kernels.planning.block_means` (same arguments, same result)."""
    *lead, s, d = x.shape
    x3 = x.reshape(-1, s, d)
    nb = num_blocks(s, block_size)
    out = torch.empty((x3.shape[0], nb, d), dtype=torch.float32, device=x.device)
    d_pow2 = triton.next_power_of_2(d)
    # About 4K elements per chunk: enough loads in flight on a GPU, few iterations under the interpreter.
    chunk = max(1, min(triton.next_power_of_2(block_size), 4096 // d_pow2))
    _block_means_kernel[(nb, x3.shape[0])](
        x3, out, s, d, block_size, *x3.stride(), out.stride(0), out.stride(1), CHUNK=chunk, D_POW2=d_pow2
    )
    return out.reshape(*lead, nb, d)


@triton.jit
def _mask_to_lut_kernel(Mask, KvNum, KvIdx, num_cols, CHUNK: tl.constexpr):
    """Program r: compact row r of the block mask into its index list.

    Two passes over the row: the first counts the kept columns (dropped columns are listed after them), the second
    writes every column to its slot, found with a prefix sum (kept: rank among kept; dropped: kept + rank among
    dropped). Rows are ascending by construction, the same order as a stable sort of ``~mask``.
    """
    r = tl.program_id(0).to(tl.int64)
    row = Mask + r * num_cols
    kept_total = tl.zeros([], dtype=tl.int32)
    for c in range(0, num_cols, CHUNK):
        cols = c + tl.arange(0, CHUNK)
        kept_total += tl.sum(tl.load(row + cols, mask=cols < num_cols, other=0).to(tl.int32), 0)
    tl.store(KvNum + r, kept_total)

    out_row = KvIdx + r * num_cols
    kept_before = tl.zeros([], dtype=tl.int32)
    dropped_before = tl.zeros([], dtype=tl.int32)
    for c in range(0, num_cols, CHUNK):
        cols = c + tl.arange(0, CHUNK)
        in_row = cols < num_cols
        kept = tl.load(row + cols, mask=in_row, other=0).to(tl.int32)
        dropped = (1 - kept) * in_row.to(tl.int32)
        kept_slot = kept_before + tl.cumsum(kept, 0) - 1
        dropped_slot = kept_total + dropped_before + tl.cumsum(dropped, 0) - 1
        slot = tl.where(kept != 0, kept_slot, dropped_slot)
        tl.store(out_row + slot, cols, mask=in_row)
        kept_before += tl.sum(kept, 0)
        dropped_before += tl.sum(dropped, 0)


def block_mask_to_lut_triton(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of :func:`vidsparse.kernels.planning.block_mask_to_lut` (same arguments, same result)."""
    b, h, qb, kb = mask.shape
    # Bytes, not torch.bool: the kernel reads plain uint8 (same storage, no copy).
    rows = mask.reshape(-1, kb).contiguous().view(torch.uint8)
    kv_num = torch.empty((b, h, qb), dtype=torch.int32, device=mask.device)
    kv_idx = torch.empty((b, h, qb, kb), dtype=torch.int32, device=mask.device)
    chunk = min(triton.next_power_of_2(kb), 1024)
    _mask_to_lut_kernel[(rows.shape[0],)](rows, kv_num, kv_idx, kb, CHUNK=chunk)
    return kv_num, kv_idx
