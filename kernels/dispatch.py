"""Executors: run attention under a :class:`~vidsparse.plan.BlockPlan`.

One entry point, :func:`block_sparse_attention`, takes q/k/v in diffusers' ``(B, S, H, D)`` layout and original token
order, checks them, and dispatches to an executor of the registry (:mod:`vidsparse.kernels.registry`, in ``auto``'s
order of preference):

- ``triton``: the block-sparse flash-attention kernel of :mod:`vidsparse.kernels.block_sparse_attn`: the fast path
  on CUDA.
- ``cpp``: a block-sparse flash-attention kernel for the CPU, compiled from C++ on first use
  (:mod:`vidsparse.kernels.cpp`): the fast path on CPU, float32.
- ``gather``: batched dense SDPA over the gathered key/value blocks of each group of query blocks
  (:mod:`vidsparse.kernels.gather`): any dtype, no compiler needed; the CPU fallback (faster than compiled
  FlexAttention there).
- ``flex``: compiled FlexAttention over the plan's BlockMask: portable to CPU and GPU.
- ``reference``: dense SDPA with the plan's boolean mask: the specification, O(S²), for tests.
- ``auto``: the first of these that fits the device and dtype and is available here, and that has a backward when
  gradients are needed (:func:`resolve_backend`).

Executors registered with ``plan_order`` (all but ``reference``) work in *plan order*: the permutation is applied
here, once, for all of them.
"""

from __future__ import annotations

import warnings

import torch

from vidsparse.plan import BlockPlan

from .cpp import cpp_kernel_available
from .masks import restrict_to_causal_groups
from .registry import AUTO, Executor, backend_names, executors, get_executor
from .triton_executor import triton_available

__all__ = ["block_sparse_attention", "cpp_kernel_available", "resolve_backend", "triton_available"]


_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)


def resolve_backend(
    backend: str, device: torch.device, dtype: torch.dtype | None = None, *, needs_grad: bool = False
) -> str:
    """Turn ``"auto"`` into a concrete executor for ``device`` (and ``dtype``, when known); check an explicit choice.

    ``auto`` is the first registered executor (:func:`~vidsparse.kernels.registry.executors`, in order) that is
    made for the device type and computes the dtype, and that is available here: triton on CUDA; on CPU cpp for
    float32 (or an unknown dtype), gather for other dtypes; flex elsewhere. With ``needs_grad`` only executors whose
    backward runs on the device count (:meth:`~vidsparse.kernels.registry.Executor.backward_on`), so a training
    step never lands on a forward-only one. Skipping an executor that would fit but is unavailable (no compiler for
    cpp, no Triton on CUDA) warns once. The first ``auto`` call on CPU may compile the cpp kernel (about 30 s, once
    per :func:`~vidsparse.kernels.cpp.build_key`).

    Raises:
        ValueError: ``backend`` is not a registered name or ``"auto"``; or ``needs_grad`` and the named executor
            has no backward on ``device`` (the message names those that do).
    """
    if backend == AUTO:
        return _auto(device, dtype, needs_grad).name
    spec = get_executor(backend)  # an explicit executor that cannot run here raises its own reason when run
    if needs_grad and not spec.backward_on(device.type):
        with_backward = [e.name for e in executors() if e.runs_on(device.type) and e.backward_on(device.type)]
        raise ValueError(
            f"backend={backend!r} has no backward on {device.type}, and gradients are needed here (inputs that "
            f"require grad, grad mode on); use backend='auto' or one of {', '.join(map(repr, with_backward))}, or "
            "run under torch.no_grad()."
        )
    return spec.name


@torch.compiler.assume_constant_result
def _resolve_when_traced(backend: str, device: torch.device, dtype: torch.dtype, needs_grad: bool) -> str:
    """:func:`resolve_backend` for a compiled region: run once, in Python, while the region is traced.

    Its result is a constant of the graph. Traced, the resolution would break the graph in every call: ``auto`` asks
    each executor whether it is available, and the ``cpp`` kernel's check (a cached build lookup that hashes its
    source) is Python that Dynamo cannot trace. An executor's availability does not change within a process.
    """
    return resolve_backend(backend, device, dtype, needs_grad=needs_grad)


def _auto(device: torch.device, dtype: torch.dtype | None, needs_grad: bool = False) -> Executor:
    """The executor ``auto`` picks (see :func:`resolve_backend`)."""
    skipped = []
    for spec in executors():
        if not (spec.runs_on(device.type) and spec.computes(dtype)):
            continue
        if needs_grad and not spec.backward_on(device.type):
            continue
        if spec.available():
            for name, reason in skipped:
                _warn_once(f"auto-{name}-{device.type}", f"vidsparse: {reason}; backend='auto' uses {spec.name}.")
            return spec
        skipped.append((spec.name, spec.unavailable or f"the {spec.name} executor is not available here"))
    raise RuntimeError(
        f"backend='auto' found no executor for device={device.type}, dtype={dtype}"
        f"{' with a backward' if needs_grad else ''}; registered: "
        f"{', '.join(backend_names()[1:])}."
    )


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
        backend: ``"auto"`` or a registered executor's name (:func:`~vidsparse.kernels.registry.backend_names`).
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
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    resolve = _resolve_when_traced if torch.compiler.is_compiling() else resolve_backend
    spec = get_executor(resolve(backend, q.device, q.dtype, needs_grad=needs_grad))
    plan = plan.to(q.device)
    if causal_groups is not None:
        groups_in_plan_order = causal_groups if plan.perm is None else causal_groups.index_select(1, plan.perm)
        plan = restrict_to_causal_groups(plan, groups_in_plan_order)

    kwargs = {"scale": scale, "return_lse": return_lse}
    if not spec.plan_order:
        out, lse = spec.run(
            *(x.transpose(1, 2) for x in (q, k, v)),
            plan,
            **kwargs,
            key_padding_mask=key_padding_mask,
            causal_groups=causal_groups,
        )
        out = out.transpose(1, 2)
        return (out, lse) if return_lse else out

    # Plan order: gather once here for every plan-order executor, scatter back below.
    if plan.perm is not None:
        q, k, v = (x.index_select(1, plan.perm) for x in (q, k, v))
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.index_select(1, plan.perm)
        if causal_groups is not None:
            causal_groups = groups_in_plan_order
    out, lse = spec.run(
        *(x.transpose(1, 2) for x in (q, k, v)),
        plan,
        **kwargs,
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
