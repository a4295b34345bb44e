"""Method specs for sweeps: ``--methods`` × ``--densities`` -> the list of configs to run, and their labels.

A method spec is the command line's ``"name"`` or ``"name:key=value,..."``
(:func:`vidsparse.methods.parse_method_spec`).
A sweep expands each spec over ``--densities`` when the method has a density target; methods without one (``window``
follows from its window, ``dense`` is always 1) run once with their own options, and the expansion says so in a note
that the reports print. :func:`canonical_spec` writes a config back as the shortest spec that parses to it (only the
options that differ from the method's defaults), which is the label reports show and part of a run's identity.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from vidsparse.config import SparseConfig
from vidsparse.methods import get_method, make_config, method_names, parse_method_spec, split_method_spec

#: Methods a sweep runs when ``--methods`` is not given: the first two of these that are registered.
DEFAULT_METHOD_PREFERENCE: tuple[str, ...] = ("radial", "draft", "moba", "cached", "window", "dense")
DEFAULT_METHOD_COUNT = 2


def default_methods(count: int = DEFAULT_METHOD_COUNT) -> list[str]:
    """The first ``count`` registered methods of :data:`DEFAULT_METHOD_PREFERENCE` (the sweep's default)."""
    registered = set(method_names())
    return [name for name in DEFAULT_METHOD_PREFERENCE if name in registered][:count]


def targets_density(method: str) -> bool:
    """Whether ``method`` plans to a ``density`` target (so a sweep over densities makes sense for it).

    Every config has the shared ``density`` field, but some methods ignore it (``window``, ``dense``); each method
    says which in its :class:`~vidsparse.methods.MethodSpec`.
    """
    return get_method(method).targets_density


def _format_value(value: Any) -> str:
    """One option value as :func:`~vidsparse.methods.parse_method_spec` reads it back."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple | list):
        return "/".join(_format_value(v) for v in value)
    if isinstance(value, float):
        return repr(value)  # "2.0", never "2": an integral float must parse back as a float
    return str(value)


def canonical_spec(config: SparseConfig) -> str:
    """The shortest spec that parses back to ``config``: ``"name"`` plus the options that differ from the defaults.

    Example: ``canonical_spec(parse_method_spec("window:window=0,block_size=64"))`` -> ``"window:window=0"``.
    """
    defaults = make_config(config.method)
    changed = [
        f"{field.name}={_format_value(getattr(config, field.name))}"
        for field in dataclasses.fields(config)
        if getattr(config, field.name) != getattr(defaults, field.name)
    ]
    return config.method + (":" + ",".join(changed) if changed else "")


@dataclass(frozen=True)
class MethodRun:
    """One method configuration of a sweep.

    Attributes:
        config: The validated config.
        spec: Its canonical spec (the label reports show).
        note: Why a density was not applied, when ``--densities`` was given but the method has no density target
            (or the spec fixed one); None otherwise.
    """

    config: SparseConfig
    spec: str
    note: str | None = None


def _check_densities(densities: Sequence[float]) -> None:
    for value in densities:
        ok = isinstance(value, int | float) and math.isfinite(value) and 0.0 < value <= 1.0
        if not ok:
            raise ValueError(f"--densities {value!r} is invalid: expected numbers in (0, 1].")


def _option_names(spec: str) -> set[str]:
    """The option names written in a spec (``"radial:density=0.2,dense-steps=1"`` -> density, dense_steps)."""
    options = spec.partition(":")[2].split(",")
    return {item.partition("=")[0].strip().replace("-", "_") for item in options if item.strip()}


def expand_methods(specs: Sequence[str], densities: Sequence[float] | None = None) -> list[MethodRun]:
    """Expand method specs over densities into the list of configurations to run (duplicates dropped, order kept).

    Args:
        specs: ``"name"`` / ``"name:key=value,..."`` strings.
        densities: Targets in (0, 1]; each spec of a method with a density target and without an explicit
            ``density=`` becomes one run per density. Other specs run once, with a note saying why.

    Raises:
        ValueError: an unknown method, a bad option or a density outside (0, 1] (named in the message).
    """
    densities = list(densities or [])
    _check_densities(densities)
    runs: list[MethodRun] = []
    for text in specs:
        split_method_spec(text)  # empty items and the like, reported on the spec as written (before a density)
        explicit = "density" in _option_names(text)
        if not densities or explicit:
            base = parse_method_spec(text)
            note = f"{text!r} sets its own density; --densities not applied" if densities else None
            runs.append(MethodRun(base, canonical_spec(base), note))
            continue
        # A spec may be valid only once a density is given (e.g. "moba:selection=topk"): parse it without one
        # where possible, to tell methods without a density target apart.
        try:
            base = parse_method_spec(text)
        except ValueError:
            base = None
        if base is not None and not targets_density(base.method):
            note = f"method {base.method!r} has no density target; runs once with its own options"
            runs.append(MethodRun(base, canonical_spec(base), note))
            continue
        for density in densities:
            try:
                config = parse_method_spec(f"{text}{',' if ':' in text else ':'}density={float(density)!r}")
            except ValueError as err:  # e.g. a selection mode whose density follows from another option
                if base is None:
                    raise
                runs.append(MethodRun(base, canonical_spec(base), f"density not applied to {text!r}: {err}"))
                break
            runs.append(MethodRun(config, canonical_spec(config)))
    unique: dict[SparseConfig, MethodRun] = {}
    for run in runs:
        unique.setdefault(run.config, run)
    return list(unique.values())
