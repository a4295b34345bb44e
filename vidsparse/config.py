"""Configs: one frozen dataclass per method, all sharing the fields of :class:`SparseConfig`.

Every config validates itself in ``__post_init__`` and raises a ``ValueError`` that names the field, the value it got
and what is allowed. Method-specific configs live next to their method (``vidsparse/methods/<name>.py``) and subclass
:class:`SparseConfig`; this module holds the shared fields and the validation helpers they use.

Vocabulary: **density** is the fraction of (query block, key block) pairs that are computed, over the video→video
part of the attention matrix. It is the only word used in APIs and configs; reports may show sparsity = 1 − density
next to it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

#: Block sizes the executors support (FlexAttention and the Triton kernel tile by these).
SUPPORTED_BLOCK_SIZES: tuple[int, ...] = (64, 128)


def check_fraction(name: str, value: float | None, *, allow_none: bool = False, low_open: bool = True) -> None:
    """Raise ``ValueError`` unless ``value`` lies in (0, 1] (or [0, 1] when ``low_open`` is False)."""
    if value is None and allow_none:
        return
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (0.0 < value <= 1.0) if low_open else (0.0 <= value <= 1.0)
    if not ok:
        interval = "(0, 1]" if low_open else "[0, 1]"
        raise ValueError(f"{name}={value!r} is invalid: expected a number in {interval}.")


def check_int(name: str, value: Any, *, minimum: int = 0, maximum: int | None = None) -> None:
    """Raise ``ValueError`` unless ``value`` is an int in [minimum, maximum]."""
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= minimum
    if ok and maximum is not None:
        ok = value <= maximum
    if not ok:
        upper = "" if maximum is None else f" and <= {maximum}"
        raise ValueError(f"{name}={value!r} is invalid: expected an integer >= {minimum}{upper}.")


def check_choice(name: str, value: Any, allowed: tuple[Any, ...]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is invalid: expected one of {', '.join(map(repr, allowed))}.")


def check_step_count(name: str, value: Any) -> None:
    """A step count is an int >= 0 (absolute steps) or a float in [0, 1) (a fraction of the run's steps)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name}={value!r} is invalid: expected an int >= 0 (steps) or a float in [0, 1) (fraction).")
    if isinstance(value, int) and value < 0:
        raise ValueError(f"{name}={value!r} is invalid: expected an int >= 0 (steps) or a float in [0, 1) (fraction).")
    if isinstance(value, float) and not (0.0 <= value < 1.0):
        raise ValueError(
            f"{name}={value!r} is invalid: a float is a fraction of the run's steps and must lie in [0, 1); "
            "pass an int for an absolute number of steps."
        )


def resolve_step_count(value: int | float, num_steps: int | None) -> int:
    """Turn a step count (int steps, or float fraction of ``num_steps``) into a number of steps.

    A fraction needs the run's step count; when it is unknown (a transformer called directly, outside a pipeline)
    the fraction resolves to 0 steps, and :func:`vidsparse.apply` documents how to pass ``num_steps``.
    """
    if isinstance(value, int):
        return value
    if num_steps is None:
        return 0
    return int(round(value * num_steps))


@dataclass(frozen=True)
class SparseConfig:
    """Fields shared by every method.

    Args:
        density: Target fraction of video→video (query block, key block) pairs to compute, in (0, 1]. ``None`` for
            methods whose density follows from other parameters.
        block_size: Tokens per block of the plan: 64 or 128.
        dense_steps: Denoising steps run dense before sparsity starts: an int (steps) or a float in [0, 1)
            (fraction of the run's steps, e.g. 0.24 = 12 of 50).
        dense_last_steps: Steps at the end run dense, same convention as ``dense_steps``.
        dense_layers: The first N transformer blocks always run dense.
        dense_above_timestep: Also run dense while the scheduler timestep is above this value (the rule of
            DraftAttention / Sparse-VideoGen, e.g. 925 of 1000); ``None`` disables it.
        min_tokens: Self-attention over fewer video tokens than this runs dense (sparsity does not pay there).
        backend: Executor: ``"auto"`` (triton on CUDA; on CPU cpp for float32, gather otherwise) or a registered
            executor's name (:func:`vidsparse.kernels.registry.backend_names`).
    """

    method: ClassVar[str] = ""

    density: float | None = None
    block_size: int = 64
    dense_steps: int | float = 0
    dense_last_steps: int | float = 0
    dense_layers: int = 0
    dense_above_timestep: float | None = None
    min_tokens: int = 0
    backend: str = "auto"

    def __post_init__(self) -> None:
        check_fraction("density", self.density, allow_none=True)
        check_choice("block_size", self.block_size, SUPPORTED_BLOCK_SIZES)
        check_step_count("dense_steps", self.dense_steps)
        check_step_count("dense_last_steps", self.dense_last_steps)
        check_int("dense_layers", self.dense_layers)
        if self.dense_above_timestep is not None and not (
            isinstance(self.dense_above_timestep, int | float)
            and not isinstance(self.dense_above_timestep, bool)
            and math.isfinite(self.dense_above_timestep)
        ):
            raise ValueError(
                f"dense_above_timestep={self.dense_above_timestep!r} is invalid: expected a number or None."
            )
        check_int("min_tokens", self.min_tokens)
        # The executor registry is names only until an executor is asked for: importing it builds no kernel. It is
        # imported here, not at the top: this module loads before vidsparse maps its ``kernels`` folder.
        from vidsparse.kernels.registry import backend_names

        check_choice("backend", self.backend, backend_names())

    def replace(self, **overrides: Any) -> SparseConfig:
        """Return a copy with ``overrides`` applied (validated); unknown names raise ``TypeError`` naming them."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(
                f"{type(self).__name__} has no option {', '.join(map(repr, unknown))}; "
                f"options are: {', '.join(sorted(names))}."
            )
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict of the config, with the method name under ``"method"``."""
        return {"method": self.method, **dataclasses.asdict(self)}
