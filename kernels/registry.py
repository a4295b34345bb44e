"""The executor registry: each executor is one file of this package that defines ``EXECUTOR`` (an :class:`Executor`).

An executor runs attention under a :class:`~vidsparse.plan.BlockPlan`. Every executor is called the same way,
:class:`ExecutorFn` (documented once, here), and says what it supports in its :class:`Executor` entry: the devices
``auto`` may pick it for, its dtypes, whether it has a backward, and whether it is available on this machine.
Everything that lists or chooses executors reads this registry: the configs' allowed ``backend`` values
(:func:`backend_names`), ``backend="auto"`` (:func:`vidsparse.kernels.dispatch.resolve_backend`), the CLI's
``--backend`` help and choices, and the tests' executor matrix.

Adding an executor: write ``kernels/<name>.py`` with the function and its ``EXECUTOR = Executor(...)`` entry, and add
one line to :data:`_EXECUTOR_MODULES`. This module imports nothing of the executors until one is asked for, so the
names are known without building any kernel (the configs validate ``backend`` with them).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch

    from vidsparse.plan import BlockPlan

__all__ = [
    "AUTO",
    "Executor",
    "ExecutorFn",
    "backend_names",
    "executor_names",
    "executors",
    "get_executor",
]

#: Executor name -> module that defines ``EXECUTOR``. One line per executor file. The order is ``auto``'s
#: preference: the first executor that fits the device and dtype (and has a backward when gradients are needed) and
#: is available here is chosen. ``reference`` is last: dense cost, only where nothing else fits.
_EXECUTOR_MODULES: dict[str, str] = {
    "triton": "vidsparse.kernels.triton_executor",
    "cpp": "vidsparse.kernels.cpp",
    "gather": "vidsparse.kernels.gather",
    "flex": "vidsparse.kernels.flex",
    "reference": "vidsparse.kernels.reference",
}
#: The name that asks the dispatcher to choose (:func:`vidsparse.kernels.dispatch.resolve_backend`).
AUTO = "auto"


class ExecutorFn(Protocol):
    """The one signature of every executor's function."""

    def __call__(
        self,
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
        """Attention of ``q`` over ``k``/``v`` restricted to the blocks of ``plan``.

        The dispatcher (:func:`vidsparse.kernels.dispatch.block_sparse_attention`) has checked the shapes, moved the
        plan to q's device and ANDed the causal groups into it at block level. Every token-indexed input is in
        *plan order* (the plan's permutation applied once by the dispatcher), except for executors registered with
        ``plan_order=False`` (``reference``), which get the original token order and apply the permutation
        themselves.

        Args:
            q, k, v: ``[B, H, S, D]``, one dtype, on one device.
            plan: The plan for ``S`` tokens, on q's device (its B and H broadcast to q's).
            scale: Softmax scale; default ``1/sqrt(D)``.
            return_lse: Also return the natural-log log-sum-exp of each query row.
            key_padding_mask: Optional bool ``[B, S]``; True keys may be attended (ANDed with the plan).
            causal_groups: Optional int ``[B or 1, S]``: a query sees a key only when the key's group is not greater
                than its own (block-causal masks, ANDed with the plan).

        Returns:
            ``(out [B, H, S, D] in q's dtype, lse [B, H, S] or None)``; the LSE is float32 (``reference`` keeps
            float64 for float64 inputs). A query that sees no key gets zeros and LSE ``-inf``.
        """
        ...


def _always() -> bool:
    return True


@dataclass(frozen=True)
class Executor:
    """A registered executor.

    Attributes:
        name: Its ``backend=`` name.
        run: The function (:class:`ExecutorFn`).
        summary: One line for the docs and ``--help``.
        devices: Device types (``"cpu"``, ``"cuda"``, ...) ``auto`` may pick it for; ``None``: any device. An
            explicit ``backend=`` is not limited by this (the function checks its own inputs: ``triton`` runs on CPU
            tensors under Triton's interpreter, for tests).
        dtypes: Input dtypes it computes; ``None``: any floating dtype.
        has_backward: Gradients flow through it to q, k and v (tested against ``reference``'s autograd,
            ``tests/test_gradients.py``). Without one, the dispatcher refuses inputs that require grad.
        backward_devices: Device types its backward runs on, when narrower than ``devices`` (``flex``: torch compiles
            FlexAttention's backward on CUDA only); ``None``: wherever it runs.
        available: Whether it can run on this machine (a kernel that must build or import); may be slow the first
            time (the cpp kernel compiles once).
        unavailable: What to tell the user when ``auto`` skips it because :attr:`available` is False.
        plan_order: It takes token-indexed inputs in plan order (the dispatcher permutes); False: original order.
        prepare: Optional ``prepare(plan, batch, heads, needs_grad)``: build what :attr:`run` caches on a plan for
            q of ``batch`` x ``heads`` (``gather``'s schedule), ahead of the call. vidsparse's root hook calls it
            for the static plans it builds before the transformer runs, so that a compiled region finds the cache
            filled instead of building it (host synchronisations: graph breaks).
    """

    name: str
    run: ExecutorFn
    summary: str
    devices: tuple[str, ...] | None = None
    dtypes: tuple[torch.dtype, ...] | None = None
    has_backward: bool = False
    backward_devices: tuple[str, ...] | None = None
    available: Callable[[], bool] = _always
    unavailable: str = ""
    plan_order: bool = True
    prepare: Callable[[BlockPlan, int, int, bool], None] | None = None

    def runs_on(self, device_type: str) -> bool:
        """True when ``auto`` may pick it for a device of this type."""
        return self.devices is None or device_type in self.devices

    def computes(self, dtype: torch.dtype | None) -> bool:
        """True for a dtype it computes (an unknown dtype, ``None``, is taken to fit)."""
        return dtype is None or self.dtypes is None or dtype in self.dtypes

    def backward_on(self, device_type: str) -> bool:
        """True when gradients flow through it on a device of this type."""
        return self.has_backward and (self.backward_devices is None or device_type in self.backward_devices)


def executor_names() -> tuple[str, ...]:
    """Names of the registered executors, in ``auto``'s order of preference (no executor is imported)."""
    return tuple(_EXECUTOR_MODULES)


def backend_names() -> tuple[str, ...]:
    """The values ``backend=`` accepts: ``"auto"`` and every executor's name."""
    return (AUTO, *_EXECUTOR_MODULES)


#: Module name -> its ``EXECUTOR``, once imported. A compiled region traces a dict lookup where it could not trace
#: ``importlib.import_module`` (a graph break in every executor call). Keyed by module, not by executor name, so a
#: name that :data:`_EXECUTOR_MODULES` maps elsewhere (tests do) finds its own module.
_LOADED: dict[str, Executor] = {}


def get_executor(name: str) -> Executor:
    """The registered :class:`Executor` called ``name``; ``ValueError`` naming the known ones otherwise."""
    module = _EXECUTOR_MODULES.get(name) if isinstance(name, str) else None
    if module is None:
        raise ValueError(f"backend={name!r} is invalid: expected one of {', '.join(map(repr, backend_names()))}.")
    spec = _LOADED.get(module)
    if spec is None:
        spec = _LOADED[module] = importlib.import_module(module).EXECUTOR
    return spec


def executors() -> list[Executor]:
    """Every registered executor, in ``auto``'s order of preference (imports their modules, builds nothing)."""
    return [get_executor(name) for name in _EXECUTOR_MODULES]
