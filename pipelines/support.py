"""Running methods on the tiny pipelines: the support check behind the test suite and ``vidsparse models``.

One place decides how a tiny pipeline is called (:func:`generation_kwargs`: the family's extra arguments, inputs such
as an I2V image, guidance), which options a method gets on tiny geometries (:func:`tiny_method_config`), and what
"this method runs on this family" means (:func:`check_support`): a full tiny generation through the sparse path, a
finite result, sparse self-attention calls, and a measured density near the method's target (within what the
geometry allows, :func:`reachable_density`). The test suite asserts
exactly these results, and ``vidsparse models --markdown`` prints them as the README's support matrix.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from vidsparse.config import SparseConfig
from vidsparse.layout import VideoLayout
from vidsparse.methods import get_method, make_config, method_names
from vidsparse.plan import finalize_plan, num_blocks

from .offline.tiny import TinySpec, build, get_spec
from .offline.tiny import tiny_names as all_tiny_names

#: Method options for tiny geometries (a few hundred video tokens: 5-8 blocks of 64), keyed by method name. Methods
#: not listed get only the shared defaults of :func:`tiny_method_config`.
TINY_METHOD_OPTIONS: dict[str, dict[str, Any]] = {
    "window": {"window": 0},
}

#: Target density given to methods that have one, on the tiny pipelines.
TINY_DENSITY = 0.5

#: How far the measured mean density of sparse calls may lie outside the range a method can reach on the tiny
#: geometries (:func:`reachable_density`), where a plan has only 16-64 video block pairs (one pair is 1.5-6 %).
DENSITY_TOLERANCE = 0.1

#: Wider tolerances where a method's unit is coarser than a plan block on tiny grids, keyed by method name. MoBA
#: routes whole chunks (2-5 per tiny grid) and keeps every plan block a selected chunk touches, a superset of its
#: selection (see :mod:`vidsparse.methods.moba`); on 5x8x11 grids that adds 0.1-0.15 to top-k's density.
METHOD_DENSITY_TOLERANCE: dict[str, float] = {"moba": 0.2}


def has_density_target(config: SparseConfig) -> bool:
    """True when the method plans toward ``config.density`` (its spec says so and the config sets one)."""
    return get_method(config.method).targets_density and config.density is not None


@functools.cache
def density_floor(num_video_tokens: int, text_tokens: int, block_size: int) -> float:
    """The density of a plan that keeps nothing a method could drop.

    That is the diagonal, and in joint attention the rows and columns of the block shared by the last video tokens
    and the first text tokens (text is always dense). On real sizes this is a few percent; on tiny joint geometries
    (7 video blocks) it is 0.3-0.6, which is why a method's target is judged against :func:`reachable_density`.
    """
    layout = VideoLayout(1, 1, num_video_tokens, text_len=text_tokens)
    vb = num_blocks(num_video_tokens, block_size)
    return finalize_plan(torch.zeros(1, 1, vb, vb, dtype=torch.bool), layout, block_size).density()


def reachable_density(target: float, floor: float) -> tuple[float, float]:
    """The densities a method aiming at ``target`` can produce above a forced ``floor``.

    From ``max(target, floor)`` (the method counts the forced pairs in its budget) to ``floor + target * (1 - floor)``
    (it spends its budget on the free pairs only).
    """
    return max(target, floor), floor + target * (1.0 - floor)


def tiny_method_config(method: str, **overrides: Any) -> SparseConfig:
    """The config ``method`` runs with on the tiny pipelines.

    Sparse from the first step and layer (``dense_steps = dense_last_steps = dense_layers = 0``, no timestep or
    token-count warm-up), ``density = 0.5`` when the method has a density target, then :data:`TINY_METHOD_OPTIONS`
    and ``overrides``.
    """
    spec = get_method(method)
    fields = {f.name for f in dataclasses.fields(spec.config_cls)}
    options: dict[str, Any] = {
        "dense_steps": 0,
        "dense_last_steps": 0,
        "dense_layers": 0,
        "dense_above_timestep": None,
        "min_tokens": 0,
    }
    if spec.targets_density:
        options.update(spec.density_options, density=TINY_DENSITY)  # e.g. MoBA's top-k selection
    options.update(TINY_METHOD_OPTIONS.get(method, {}))
    options.update(overrides)
    return make_config(method, **{k: v for k, v in options.items() if k in fields or k in overrides})


def generation_kwargs(
    pipe: Any,
    spec: TinySpec,
    *,
    steps: int | None = None,
    seed: int = 0,
    prompt: str | list[str] | None = None,
    negative_prompt: str | list[str] | None = "",
    frames: int | None = None,
    height: int | None = None,
    width: int | None = None,
    guidance_scale: float | None = None,
    output_type: str = "latent",
    **extra: Any,
) -> dict[str, Any]:
    """Keyword arguments for ``pipe(**kwargs)``: the spec's defaults, its extra arguments and inputs, the caller's.

    Arguments the pipeline does not take are dropped (e.g. ``guidance_scale`` for HunyuanVideo 1.5, whose guidance
    lives in its ``guider``: it is set there instead). ``extra`` is passed as given (and wins over the spec).
    """
    height = height or spec.height
    width = width or spec.width
    kwargs: dict[str, Any] = dict(spec.call_kwargs)
    if spec.inputs is not None:
        kwargs.update(spec.inputs(height, width))
    kwargs.update(
        prompt=prompt or spec.prompt,
        negative_prompt=negative_prompt,
        num_frames=frames or spec.frames,
        height=height,
        width=width,
        num_inference_steps=steps or spec.steps,
        guidance_scale=spec.guidance_scale if guidance_scale is None else guidance_scale,
        generator=torch.Generator().manual_seed(seed),
        output_type=output_type,
    )
    params = inspect.signature(pipe.__call__).parameters
    if "guidance_scale" not in params and getattr(pipe, "guider", None) is not None:
        pipe.guider.guidance_scale = kwargs["guidance_scale"]
    kwargs = {k: v for k, v in kwargs.items() if k in params}
    kwargs.update(extra)
    return kwargs


def generate(pipe: Any, spec: TinySpec, **kwargs: Any) -> torch.Tensor:
    """Run ``pipe`` with :func:`generation_kwargs` and return the frames (latents by default)."""
    out = pipe(**generation_kwargs(pipe, spec, **kwargs))
    return out.frames if hasattr(out, "frames") else out[0]


@dataclass
class SupportResult:
    """One (tiny pipeline, method) check.

    Attributes:
        tiny: Tiny pipeline name; family: its adapter's family; method: method name.
        ok: The generation finished, the output is finite, self-attention ran sparse, the density is on target.
        sparse_calls, calls: Self-attention calls through the sparse path / all self-attention calls.
        density: Mean measured density of the sparse calls.
        target: The method's density target, when it has one.
        contexts: Cache-context names seen (``cond``/``uncond``: split CFG; ``cond_uncond``: batched).
        seconds: Wall time of the generation.
        error: Why ``ok`` is False.
    """

    tiny: str
    family: str
    method: str
    ok: bool = False
    sparse_calls: int = 0
    calls: int = 0
    density: float | None = None
    target: float | None = None
    contexts: list[str] = field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly."""
        return dataclasses.asdict(self)


def check_support(
    pipe: Any, spec: TinySpec, config: SparseConfig, *, steps: int = 2, **generation: Any
) -> tuple[SupportResult, torch.Tensor | None, list[dict[str, Any]]]:
    """Run one tiny generation with ``config`` applied and judge it (see :class:`SupportResult`).

    The handle is removed afterwards, whatever happens.

    Returns:
        ``(result, output, stats)``: the judgement, the generated frames (None on error) and the handle's per-call
        statistics (:meth:`vidsparse.SparseHandle.stats`).
    """
    import vidsparse

    result = SupportResult(spec.name, spec.family, config.method)
    target = config.density if has_density_target(config) else None
    result.target = target
    out, rows = None, []
    start = time.perf_counter()
    try:
        with vidsparse.apply(pipe, config) as handle:
            out = generate(pipe, spec, steps=steps, **generation)
            summary = handle.summary()
            rows = handle.stats()
    except Exception as err:  # reported in the matrix, re-raised by the tests through `ok`
        result.error = f"{type(err).__name__}: {err}"
        return result, None, rows
    result.seconds = time.perf_counter() - start
    result.sparse_calls, result.calls = summary["sparse_calls"], summary["calls"]
    result.density = summary["sparse_density"]
    result.contexts = sorted({r["context"] for r in rows})
    problems = []
    if not bool(torch.isfinite(out).all()):
        problems.append("non-finite output")
    if result.sparse_calls == 0:
        problems.append("no self-attention call ran sparse")
    elif target is not None:
        sparse = [r for r in rows if r["sparse"]]
        floor = sum(density_floor(r["tokens"], r["text_tokens"], config.block_size) for r in sparse) / len(sparse)
        low, high = reachable_density(target, floor)
        tolerance = METHOD_DENSITY_TOLERANCE.get(config.method, DENSITY_TOLERANCE)
        if not low - tolerance <= result.density <= high + tolerance:
            problems.append(
                f"measured density {result.density:.3f} is outside [{low:.3f}, {high:.3f}] +- {tolerance} "
                f"(target {target}, forced floor {floor:.3f})"
            )
    result.ok = not problems
    result.error = "; ".join(problems) or None
    return result, out, rows


def support_matrix(
    tiny_names: list[str] | None = None,
    methods: list[str] | None = None,
    *,
    steps: int = 2,
    seed: int = 0,
    **config_overrides: Any,
) -> list[SupportResult]:
    """:func:`check_support` for every (tiny pipeline, method): one tiny generation each.

    Args:
        tiny_names: Tiny pipelines (default: all of them, :func:`~vidsparse.pipelines.offline.tiny.tiny_names`).
        methods: Method names (default: all registered).
        steps: Denoising steps per generation.
        seed: Weights and noise seed.
        **config_overrides: Options for every method's config (e.g. ``backend="reference"``).
    """
    results = []
    for name in tiny_names or all_tiny_names():
        spec = get_spec(name)
        pipe = build(name, seed=seed)
        pipe.set_progress_bar_config(disable=True)
        for method in methods or method_names():
            config = tiny_method_config(method, **config_overrides)
            result, _, _ = check_support(pipe, spec, config, steps=steps, seed=seed)
            results.append(result)
    return results


def matrix_markdown(results: list[SupportResult]) -> str:
    """The support matrix as a markdown table: one row per tiny pipeline, one column per method.

    A cell is ``✓ 0.52`` (supported; measured density of the sparse calls) or ``✗`` with the reason in a footnote. A
    column of a method with a density target shows it in the header (``moba (target 0.5)``).
    """
    methods = list(dict.fromkeys(r.method for r in results))
    headers = []
    for method in methods:
        targets = {r.target for r in results if r.method == method}
        (target,) = targets if len(targets) == 1 else (None,)
        headers.append(method if target is None else f"{method} (target {target:g})")
    rows: dict[tuple[str, str], dict[str, SupportResult]] = {}
    for r in results:
        rows.setdefault((r.family, r.tiny), {})[r.method] = r
    notes: list[str] = []
    lines = [
        "| family | tiny pipeline | " + " | ".join(headers) + " |",
        "|---|---|" + "---|" * len(methods),
    ]
    for (family, tiny), cells in rows.items():
        shown = []
        for method in methods:
            r = cells.get(method)
            if r is None:
                shown.append("")
            elif r.ok:
                density = "" if r.density is None or math.isnan(r.density) else f" {r.density:.2f}"
                shown.append(f"✓{density}")
            else:
                notes.append(f"{tiny} / {method}: {r.error}")
                shown.append(f"✗[{len(notes)}]")
        lines.append(f"| {family} | tiny-{tiny} | " + " | ".join(shown) + " |")
    lines += [f"\n[{i}] {note}" for i, note in enumerate(notes, 1)]
    return "\n".join(lines)
