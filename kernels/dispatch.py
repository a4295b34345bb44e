"""Executors: run attention under a :class:`~vidsparse.plan.BlockPlan`.

One entry point, :func:`block_sparse_attention`, takes q/k/v in diffusers' ``(B, S, H, D)`` layout and original token
order, and dispatches to an executor:

- ``reference``: dense SDPA with the plan's boolean mask: the specification, O(S²), for tests.
- ``cpp``: a block-sparse flash-attention kernel for the CPU, compiled from C++ on first use
  (:mod:`vidsparse.kernels.cpp`): the fast path on CPU, float32.
- ``gather``: batched dense SDPA over the gathered key/value blocks of each group of query blocks
  (:mod:`vidsparse.kernels.gather`): any dtype, no compiler needed; the CPU fallback (faster than compiled
  FlexAttention there).
- ``flex``: compiled FlexAttention over the plan's BlockMask: portable to CPU and GPU.
- ``triton``: the block-sparse flash-attention kernel of :mod:`vidsparse.kernels.block_sparse_attn`: the fast path
  on CUDA.
- ``auto``: triton on CUDA; on CPU cpp for float32 (gather for other dtypes, or where the kernel cannot be built:
  one warning); flex elsewhere.

Executors other than ``reference`` work in *plan order*: the permutation is applied here, once, for all of them.
"""

from __future__ import annotations

import functools
import warnings

import torch

from vidsparse.config import SUPPORTED_BACKENDS, check_choice
from vidsparse.plan import BlockPlan

from .cpp import cpp_block_sparse_attention, cpp_kernel_available
from .flex import flex_block_sparse_attention
from .gather import gather_block_sparse_attention
from .masks import restrict_to_causal_groups
from .reference import reference_attention

__all__ = ["block_sparse_attention", "cpp_kernel_available", "resolve_backend", "triton_available"]


@functools.cache
def triton_available() -> bool:
    """True when Triton and its block-sparse kernel import (the kernel itself needs CUDA unless interpreted)."""
    try:
        from . import block_sparse_attn  # noqa: F401
    except Exception:  # any import problem means "not available": auto falls back with a warning
        return False
    return True


_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """Turn ``"auto"`` into a concrete executor for ``device`` (and ``dtype``, when known); check an explicit choice.

    On CPU ``auto`` is ``cpp`` for float32 (or an unknown dtype) where its kernel builds, else ``gather``; the first
    ``auto`` call on CPU may compile the kernel (about 30 s, once per machine).
    """
    check_choice("backend", backend, SUPPORTED_BACKENDS)
    if backend == "auto":
        if device.type == "cuda" and triton_available():
            return "triton"
        if device.type == "cuda":
            _warn_once("auto-cuda", "vidsparse: Triton kernel unavailable on CUDA; backend='auto' uses FlexAttention.")
            return "flex"
        if device.type != "cpu":
            return "flex"
        if dtype not in (None, torch.float32):
            return "gather"  # the C++ kernel is float32 only
        if cpp_kernel_available():
            return "cpp"
        _warn_once(
            "auto-cpu",
            "vidsparse: the cpp CPU kernel could not be built here (see vidsparse.kernels.cpp.load_cpp_kernel()); "
            "backend='auto' uses the slower gather executor.",
        )
        return "gather"
    if backend == "triton" and not triton_available():
        raise RuntimeError("backend='triton' requested but the Triton kernel could not be imported.")
    return backend


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: BlockPlan,
    *,
    backend: str = "auto",
    scale: float | None = None,
    return_lse: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    causal_groups: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q`` over ``k``/``v`` restricted to the blocks of ``plan``.

    Args:
        q, k, v: ``[B, S, H, D]`` (diffusers layout), original token order, same dtype.
        plan: Block plan for sequence length ``S``; its B and H dimensions broadcast (1 or equal to q's).
        backend: ``"auto"``, ``"cpp"``, ``"gather"``, ``"flex"``, ``"triton"`` or ``"reference"``.
        scale: Softmax scale, default ``1/sqrt(D)``.
        return_lse: Also return the natural-log log-sum-exp per query, float32 ``[B, H, S]`` (original order).
        key_padding_mask: Optional bool ``[B, S]``; False marks keys nobody may attend (padded text). It is ANDed
            with the plan, never replaces it.
        causal_groups: Optional integer ``[B or 1, S]``: query ``i`` may attend key ``j`` only when
            ``causal_groups[j] <= causal_groups[i]``, ANDed with the plan (block-causal masks such as SkyReels-V2's
            diffusion forcing; see :mod:`vidsparse.kernels.masks`). Block pairs it hides completely are dropped
            from the plan, so they cost nothing.

    Returns:
        ``out [B, S, H, D]``, or ``(out, lse)`` when ``return_lse``.
    """
    if q.dim() != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"q, k, v must be [B, S, H, D] with matching shapes; got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}."
        )
    b, s, h, _ = q.shape
    if s != plan.seq_len:
        raise ValueError(f"plan is for seq_len={plan.seq_len} but q has {s} tokens.")
    pb, ph = plan.kv_num.shape[:2]
    if pb not in (1, b) or ph not in (1, h):
        raise ValueError(f"plan batch/heads ({pb}, {ph}) do not broadcast to q's ({b}, {h}).")
    if key_padding_mask is not None and tuple(key_padding_mask.shape) != (b, s):
        raise ValueError(f"key_padding_mask must be [B, S] = ({b}, {s}); got {tuple(key_padding_mask.shape)}.")
    if causal_groups is not None:
        if causal_groups.dim() != 2 or causal_groups.shape[0] not in (1, b) or causal_groups.shape[1] != s:
            raise ValueError(f"causal_groups must be [B or 1, S] = ({b} or 1, {s}); got {tuple(causal_groups.shape)}.")
        if causal_groups.dtype.is_floating_point or causal_groups.dtype == torch.bool:
            raise ValueError(f"causal_groups must hold integers; got {causal_groups.dtype}.")
        causal_groups = causal_groups.to(device=q.device, dtype=torch.int32)
    name = resolve_backend(backend, q.device, q.dtype)
    plan = plan.to(q.device)
    if causal_groups is not None:
        groups_in_plan_order = causal_groups if plan.perm is None else causal_groups.index_select(1, plan.perm)
        plan = restrict_to_causal_groups(plan, groups_in_plan_order)

    if name == "reference":
        out, lse = reference_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            plan,
            scale=scale,
            return_lse=return_lse,
            key_padding_mask=key_padding_mask,
            causal_groups=causal_groups,
        )
        out = out.transpose(1, 2)
        return (out, lse) if return_lse else out

    # Plan order: gather once here for every fast executor, scatter back below.
    if plan.perm is not None:
        q, k, v = (x.index_select(1, plan.perm) for x in (q, k, v))
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.index_select(1, plan.perm)
        if causal_groups is not None:
            causal_groups = groups_in_plan_order
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))
    if name in ("cpp", "gather", "flex"):  # the CPU executors share one signature
        executor = {
            "cpp": cpp_block_sparse_attention,
            "gather": gather_block_sparse_attention,
            "flex": flex_block_sparse_attention,
        }[name]
        out, lse = executor(
            qh,
            kh,
            vh,
            plan,
            scale=scale,
            return_lse=return_lse,
            key_padding_mask=key_padding_mask,
            causal_groups=causal_groups,
        )
    else:
        from .block_sparse_attn import block_sparse_attn

        out, lse = block_sparse_attn(
            qh,  # strided views: the kernel reads strides (only the last dim must be dense), no copies
            kh,
            vh,
            plan.kv_num,
            plan.kv_idx,
            block_size=plan.block_size,
            scale=scale,
            key_padding_mask=key_padding_mask,
            causal_groups=causal_groups,
        )
    out = out.transpose(1, 2)
    if plan.perm is not None:
        inv = plan.inv_perm
        out = out.index_select(1, inv)
        if lse is not None:
            lse = lse.index_select(2, inv)
    return (out, lse) if return_lse else out
