"""Planning hot spots, in Triton with torch fallbacks, behind one dispatcher.

Dynamic methods do a little dense work per call before the sparse attention: MoBA and the cached searches score key
blocks by their *mean key*, draft pools q and k into regions, and every method turns a boolean block mask into the
BlockPlan index list. At 75k tokens these are memory-bound passes over q/k (tens of MB) and over a
``[B, H, Qb, Kb]`` mask (tens of millions of entries), small next to the attention but not free.

- :func:`block_means` / :func:`block_sums`: float32 mean / sum of each group of ``block_size`` consecutive tokens
  (the last group may be partial: averaged over its real tokens). With the tokens in plan order this is also
  draft's region pooling: each pooled region is one contiguous group.
- :func:`block_mask_to_lut`: ``(kv_num, kv_idx)`` from a bool block mask, identical to
  :func:`vidsparse.plan.block_mask_to_indices` (kept columns ascending first, then the dropped ones ascending).
- :func:`key_to_query_index`: the plan transposed (for each key block, the query blocks that keep it), which the
  kernels' backwards (``cpp``, ``triton``) walk in their dK/dV pass; computed once per plan and cached on it.

``backend="auto"`` uses the Triton kernels for CUDA tensors and torch otherwise (on CPU the interpreter would be far
slower than torch); ``"torch"`` and ``"triton"`` force one. Both versions are tested against each other, the Triton
one under ``TRITON_INTERPRET=1`` on CPU.
"""

from __future__ import annotations

import torch

from vidsparse.config import check_choice, check_int
from vidsparse.plan import BlockPlan, block_mask_to_indices, num_blocks

__all__ = ["PLANNING_BACKENDS", "block_mask_to_lut", "block_means", "block_sums", "key_to_query_index"]

#: Values of ``backend=`` accepted by the planning helpers.
PLANNING_BACKENDS: tuple[str, ...] = ("auto", "torch", "triton")


def _use_triton(backend: str, x: torch.Tensor) -> bool:
    """Resolve ``backend`` for tensor ``x``: Triton for CUDA tensors (when it imports), torch otherwise."""
    check_choice("backend", backend, PLANNING_BACKENDS)
    if backend == "torch":
        return False
    from .dispatch import triton_available

    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' requested but Triton could not be imported.")
        from .block_sparse_attn import is_interpreted

        if x.device.type != "cuda" and not is_interpreted():
            raise RuntimeError(
                f"backend='triton' needs CUDA tensors (got device={x.device}) or TRITON_INTERPRET=1 before Triton is "
                "imported; use backend='torch'."
            )
        return True
    return x.device.type == "cuda" and triton_available()


# ---------------------------------------------------------------------------------------------------- block means
def block_means(x: torch.Tensor, block_size: int, *, backend: str = "auto") -> torch.Tensor:
    """Mean of each group of ``block_size`` consecutive tokens, in float32.

    Args:
        x: ``[..., S, D]`` (e.g. keys ``[B, H, S, D]`` in plan order), any float dtype.
        block_size: Tokens per group (the plan block size, or a pooled region's size in plan order), >= 1.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.

    Returns:
        float32 ``[..., ceil(S / block_size), D]``; the last group is averaged over its ``S mod block_size`` tokens
        when S is not a multiple of ``block_size``.
    """
    check_int("block_size", block_size, minimum=1)
    if x.dim() < 2:
        raise ValueError(f"x must be [..., S, D]; got shape {tuple(x.shape)}.")
    if not x.is_floating_point():
        raise ValueError(f"x must be a float tensor; got {x.dtype}.")
    if _use_triton(backend, x) and x.numel() > 0:
        from .planning_triton import block_means_triton

        return block_means_triton(x, block_size)
    return _block_means_torch(x, block_size)


def block_sums(x: torch.Tensor, block_size: int, *, dim: int = -2) -> torch.Tensor:
    """Float32 sum of each group of ``block_size`` consecutive entries of ``x`` along ``dim``.

    Args:
        x: Any float tensor, e.g. keys ``[B, H, S, D]`` (``dim=-2``) or ``[B, S, H, D]`` (``dim=1``).
        block_size: Entries per group, >= 1; the last group holds the ``S mod block_size`` rest when not 0.
        dim: The token dimension.

    Returns:
        float32, ``x``'s shape with ``dim`` of size ``ceil(S / block_size)``. bf16/fp16 inputs accumulate in
        float32 without a float32 copy of the whole tensor (``sum(dtype=...)``), and the tail is summed apart
        instead of padding ``x``.
    """
    dim = dim % x.dim()
    s = x.shape[dim]
    full = s // block_size
    sums = x.narrow(dim, 0, full * block_size).unflatten(dim, (full, block_size)).sum(dim + 1, dtype=torch.float32)
    if s % block_size:
        tail = x.narrow(dim, full * block_size, s - full * block_size).sum(dim, keepdim=True, dtype=torch.float32)
        sums = torch.cat([sums, tail], dim=dim)
    return sums


def _block_means_torch(x: torch.Tensor, block_size: int) -> torch.Tensor:
    s = x.shape[-2]
    starts = torch.arange(num_blocks(s, block_size), device=x.device) * block_size
    counts = (s - starts).clamp(max=block_size).to(torch.float32)
    return block_sums(x, block_size) / counts[:, None]


# ------------------------------------------------------------------------------------------------- LUT from mask
def block_mask_to_lut(mask: torch.Tensor, *, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """The BlockPlan index list of a boolean block mask.

    Args:
        mask: bool ``[B, H, Qb, Kb]``: ``mask[..., i, j]`` keeps key block ``j`` for query block ``i``.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.

    Returns:
        ``(kv_num int32 [B, H, Qb], kv_idx int32 [B, H, Qb, Kb])``: per row the kept columns ascending, then the
        dropped ones ascending (the same tensors as :func:`vidsparse.plan.block_mask_to_indices`).
    """
    if mask.dim() != 4 or mask.dtype != torch.bool:
        raise ValueError(f"mask must be bool [B, H, Qb, Kb]; got {mask.dtype} {tuple(mask.shape)}.")
    if _use_triton(backend, mask) and mask.numel() > 0:
        from .planning_triton import block_mask_to_lut_triton

        return block_mask_to_lut_triton(mask)
    return block_mask_to_indices(mask)


# ------------------------------------------------------------------------------------------- the plan transposed
#: The attribute a plan caches its transposed index under (in ``plan.__dict__``: the dataclass is frozen).
_TRANSPOSED_CACHE = "_key_to_query"


def key_to_query_index(plan: BlockPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """The plan transposed: ``(q_num int32 [B, H, Kb], q_idx int32 [B, H, Kb, Qmax])`` (the plan's own B, H).

    ``q_idx[b, h, j, :q_num[b, h, j]]`` lists, ascending, the query blocks that keep key block ``j``: the loop of the
    backward's dK/dV pass (one program per key block, so no two programs write the same dK/dV rows: no atomics).
    Both the ``cpp`` and the ``triton`` backward read it. Computed once per plan and cached on it, outside
    ``torch.compile``; a compiled graph traces the computation instead (a few small tensor ops per call) and keeps
    ``Qmax = Qb``, since trimming the width to the longest list needs a host sync.
    """
    compiling = torch.compiler.is_compiling()
    if not compiling and _TRANSPOSED_CACHE in plan.__dict__:
        return plan.__dict__[_TRANSPOSED_CACHE]
    q_num, q_idx = block_mask_to_indices(plan.block_mask().transpose(-1, -2))
    if not compiling:
        q_idx = q_idx[..., : max(int(q_num.max()), 1)].contiguous()  # the lists' width, not Kb
        plan.__dict__[_TRANSPOSED_CACHE] = (q_num, q_idx)
    return q_num, q_idx
