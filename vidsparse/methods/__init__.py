"""The method registry: each method is one file here, exposing a config class and a ``plan`` function.

A method turns q/k (or only the geometry, for static methods) into a :class:`~vidsparse.plan.BlockPlan`:

    plan(q, k, layout, config, ctx) -> BlockPlan

with ``q``/``k`` in diffusers' ``[B, S, H, D]`` layout and original token order (text included), ``layout`` the
:class:`~vidsparse.layout.VideoLayout` of the sequence, ``config`` the method's frozen config and ``ctx`` a
:class:`PlanContext` (layer, step, per-layer store). Static methods ignore q/k and are cached by geometry here.
"""

from __future__ import annotations

import importlib
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from vidsparse.config import SparseConfig
from vidsparse.layout import VideoLayout
from vidsparse.plan import BlockPlan

#: Method name -> module that defines ``METHOD`` (a :class:`MethodSpec`). One line per method file.
_METHOD_MODULES: dict[str, str] = {
    "dense": "vidsparse.methods.dense",
    "window": "vidsparse.methods.window",
    "moba": "vidsparse.methods.moba",
    "radial": "vidsparse.methods.radial",
    "draft": "vidsparse.methods.draft",
    "cached": "vidsparse.methods.cached",
}
#: Reference "methods" that plan from the exact attention (they cost more than dense attention): reachable by name,
#: but not among :func:`method_names`, so sweeps and benchmarks over every method leave them out.
_REFERENCE_MODULES: dict[str, str] = {
    "oracle": "vidsparse.methods.oracle",
}


@dataclass
class PlanContext:
    """Where in the generation a plan is requested.

    Attributes:
        layer: Transformer block index of the attention module.
        step: Denoising step index in the current cache context (0-based).
        num_steps: Steps of the run when known.
        context: Cache-context name (``"cond"``, ``"uncond"``, ``"cond_uncond"`` or ``"default"``).
        store: Mutable storage of this (model, layer, cache context), for methods that reuse work across steps;
            reset per generation.
        model: Index of the transformer in the handle (0 = ``transformer``, 1 = ``transformer_2`` of Wan 2.2).
        shared: Mutable storage of this (model, layer) shared by all cache contexts (cond, uncond, ...), for state
            that one branch computes and the others reuse; reset per generation like ``store``.
        head_offset: Index, among the layer's heads, of the first head of the q/k being planned. Non-zero under
            context parallelism (Ulysses), where each rank plans a contiguous range of heads; methods with
            per-head state that is indexed by head (calibration files) read heads ``head_offset ...
            head_offset + q.shape[2] - 1``, or return a plan of all ``num_heads`` heads (the runtime cuts it).
        num_heads: Heads of the layer (None: q's heads, i.e. no context parallelism).
    """

    layer: int = 0
    step: int = 0
    num_steps: int | None = None
    context: str = "default"
    store: dict[str, Any] = field(default_factory=dict)
    model: int = 0
    shared: dict[str, Any] = field(default_factory=dict)
    head_offset: int = 0
    num_heads: int | None = None


@dataclass(frozen=True)
class ModelInfo:
    """What a method may know of one transformer of the pipeline: facts, never the module itself.

    Methods see tensors and layouts only; the integration layer (:func:`vidsparse.integration.describe_models`)
    turns each transformer into one of these for the methods that check a file made for a model (calibration).

    Attributes:
        class_name: The transformer's class, e.g. ``"WanTransformer3DModel"``.
        fingerprint: 16 hex digits hashing its config (class and architecture, not weights).
        num_layers: Attention modules of it that vidsparse makes sparse (its adapter's count).
    """

    class_name: str
    fingerprint: str
    num_layers: int


PlanFn = Callable[[torch.Tensor | None, torch.Tensor | None, VideoLayout, Any, PlanContext], BlockPlan]


@dataclass(frozen=True)
class MethodSpec:
    """A registered method.

    Attributes:
        name: Public name (``vidsparse.apply(pipe, name)``).
        config_cls: Its frozen config dataclass.
        plan: The planning function.
        static: True when the plan depends only on (layout, config): it is then built once per geometry.
        summary: One line for ``vidsparse models`` and the README.
        targets_density: True when the method can plan to its config's ``density`` target (so sweeps over
            densities make sense for it); False for methods whose density follows from other options (``window``).
        density_options: The options that put the method in that mode when its defaults do not: MoBA's default
            threshold selection follows ``tau`` and refuses ``density``, so its entry is ``{"selection": "topk"}``.
            Sweeps and the tiny-pipeline tests apply them with every density they set.
        check_model: Optional ``check_model(config, models)`` (``models``: a :class:`ModelInfo` per transformer),
            called by :func:`vidsparse.apply` before anything is installed: a method whose config refers to a
            model (a calibration file) raises a clear ``ValueError`` there instead of failing mid-generation.
    """

    name: str
    config_cls: type[SparseConfig]
    plan: PlanFn
    static: bool
    summary: str
    targets_density: bool = False
    check_model: Callable[[Any, list[ModelInfo]], None] | None = None
    density_options: Mapping[str, Any] = field(default_factory=dict)


#: Methods registered at run time with :func:`register_method` (name -> spec), e.g. a user's own method.
_REGISTERED: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec, *, replace: bool = False) -> MethodSpec:
    """Make ``spec`` a method: ``vidsparse.apply(pipe, spec.name)``, specs strings and sweeps find it by name.

    The built-in methods register by one line in ``_METHOD_MODULES`` (imported on first use); this is the way for
    code outside the package (a user's method, a test's). ``replace=False`` refuses a name already taken.
    Returns ``spec``, so it can be used as ``METHOD = register_method(MethodSpec(...))``.
    """
    if not isinstance(spec, MethodSpec):
        raise TypeError(f"register_method expects a MethodSpec; got {type(spec).__name__}.")
    taken = spec.name in _METHOD_MODULES or spec.name in _REFERENCE_MODULES or spec.name in _REGISTERED
    if taken and not replace:
        raise ValueError(f"method name {spec.name!r} is already registered; pass replace=True to replace it.")
    _REGISTERED[spec.name] = spec
    return spec


def unregister_method(name: str) -> None:
    """Remove a method added with :func:`register_method` (built-in methods cannot be removed)."""
    if name not in _REGISTERED:
        raise ValueError(f"method {name!r} was not added with register_method; registered: {sorted(_REGISTERED)}.")
    del _REGISTERED[name]


def method_names() -> list[str]:
    """Names of all registered methods (built-in first, then those added with :func:`register_method`)."""
    return [*_METHOD_MODULES, *(n for n in _REGISTERED if n not in _METHOD_MODULES)]


def reference_method_names() -> list[str]:
    """Names of the reference methods (``oracle``): usable like methods, left out of :func:`method_names`."""
    return list(_REFERENCE_MODULES)


def get_method(name: str) -> MethodSpec:
    """The :class:`MethodSpec` for ``name`` (a method or a reference); ``ValueError`` naming the known ones else."""
    if isinstance(name, str) and name in _REGISTERED:
        return _REGISTERED[name]
    module = (_METHOD_MODULES.get(name) or _REFERENCE_MODULES.get(name)) if isinstance(name, str) else None
    if module is None:
        known = ", ".join([*method_names(), *_REFERENCE_MODULES])
        raise ValueError(f"method={name!r} is unknown; available methods: {known}.")
    return importlib.import_module(module).METHOD


def make_config(method_or_config: str | SparseConfig, **overrides: Any) -> SparseConfig:
    """Build a validated config from a method name (plus option overrides) or copy a config with overrides."""
    if isinstance(method_or_config, SparseConfig):
        return method_or_config.replace(**overrides) if overrides else method_or_config
    if isinstance(method_or_config, str):
        spec = get_method(method_or_config)
        cfg = spec.config_cls()
        return cfg.replace(**overrides) if overrides else cfg
    raise TypeError(
        f"method_or_config must be a method name ({', '.join(method_names())}) or a config instance; "
        f"got {type(method_or_config).__name__}."
    )


def parse_option_value(text: str) -> Any:
    """Parse one option value of a method spec: bool, None, int, float, a tuple (``a/b/c``) or a string."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    if "/" in text:
        return tuple(parse_option_value(part) for part in text.split("/"))
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


#: One option of a method and where it came from: (name, value, source), e.g. ``("density", 0.3, "--density 0.3")``.
MethodOption = tuple[str, Any, str]


def split_method_spec(spec: str, *, where: str | None = None) -> tuple[str, list[MethodOption]]:
    """Split ``"name"`` / ``"name:opt=value,opt=value"`` into the name and its options, each with its source.

    Refuses what would otherwise pass silently: an empty option list (``"radial:"``), empty items
    (``"radial:a=1,,b=2"``, a trailing comma), an item without ``=`` or without a value. ``where`` names the spec in
    messages (default: the spec itself, quoted), e.g. ``"--method 'radial:density=0.3'"``.
    """
    where = where or f"method spec {spec!r}"
    name, colon, rest = spec.partition(":")
    name = name.strip()
    if colon and not rest.strip():
        raise ValueError(f"{where}: nothing follows ':'; write {name!r} alone, or {name + ':key=value'!r}.")
    options: list[MethodOption] = []
    if not colon:
        return name, options
    for part in rest.split(","):
        item = part.strip()
        if not item:
            raise ValueError(f"{where} has an empty option (two commas in a row, or a comma at an end): remove it.")
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"method option {item!r} in {where} is invalid: expected name=value.")
        if not value.strip():
            raise ValueError(f"method option {item!r} in {where} has no value: expected name=value.")
        options.append((key.strip().replace("-", "_"), parse_option_value(value.strip()), f"{item!r} in {where}"))
    return name, options


def config_from_options(name: str, options: list[MethodOption]) -> SparseConfig:
    """A validated config of method ``name`` from options gathered from several sources (spec, flags, ...).

    An option given twice (by one source or two) is refused with both sources named, instead of one silently
    winning; so is a ``density`` for a method without a density target (:attr:`MethodSpec.targets_density`:
    ``window``, ``dense``), which would ignore it.
    """
    spec = get_method(name)
    overrides: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for key, value, source in options:
        if key in sources:
            raise ValueError(f"option {key!r} is given twice: {sources[key]} and {source}; give it once.")
        overrides[key], sources[key] = value, source
    if overrides.get("density") is not None and not spec.targets_density:
        raise ValueError(
            f"{sources['density']}: method {name!r} has no density target (its density follows from its other "
            "options), so density would be ignored; drop it. Methods with one: "
            + ", ".join(n for n in [*method_names(), *_REFERENCE_MODULES] if get_method(n).targets_density)
            + "."
        )
    try:
        return make_config(name, **overrides)
    except TypeError as err:  # unknown option names: a usage error on the command line
        raise ValueError(str(err)) from err


def parse_method_spec(spec: str, *, where: str | None = None) -> SparseConfig:
    """Parse ``"name"`` or ``"name:opt=value,opt=value"`` (the CLI's method syntax) into a validated config.

    Example: ``parse_method_spec("radial:density=0.25,faithful=true")``. Tuples are written with ``/``
    (``tile=4/4/4``). Empty items, repeated options and a density for a method without a density target are
    refused (see :func:`split_method_spec`, :func:`config_from_options`); ``where`` names the spec in messages.
    """
    name, options = split_method_spec(spec, where=where)
    return config_from_options(name, options)


#: A bounded memo of a pure function, (config, layout, device) -> static plan, shared by every handle in the process:
#: no handle's state lives here (a static plan depends on nothing else), so two pipelines of one geometry share plans.
_STATIC_CACHE: OrderedDict[tuple, BlockPlan] = OrderedDict()
_STATIC_CACHE_SIZE = 32


def build_plan(
    config: SparseConfig,
    q: torch.Tensor | None,
    k: torch.Tensor | None,
    layout: VideoLayout,
    ctx: PlanContext | None = None,
    *,
    device: torch.device | str | None = None,
) -> BlockPlan:
    """Plan with ``config``'s method; static plans come from a bounded cache keyed by geometry and config.

    A new resolution in the same process gets a new plan (keys include the layout), unlike upstream Radial's
    single global mask.

    Planning is not differentiable (block selection is a top-k / threshold over pooled scores): it runs under
    ``torch.no_grad()`` on detached q/k, so in training no autograd graph is built for it and no gradient flows
    through the choice of blocks; gradients flow through the attention the executor computes with the plan.
    """
    with torch.no_grad():
        return _build_plan(config, _detached(q), _detached(k), layout, ctx, device=device)


def _detached(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x.detach()


def _build_plan(
    config: SparseConfig,
    q: torch.Tensor | None,
    k: torch.Tensor | None,
    layout: VideoLayout,
    ctx: PlanContext | None,
    *,
    device: torch.device | str | None,
) -> BlockPlan:
    spec = get_method(config.method)
    ctx = ctx or PlanContext()
    if q is not None and q.shape[1] != layout.seq_len:
        raise ValueError(f"q has {q.shape[1]} tokens but the layout {layout.describe()} has {layout.seq_len}.")
    if not spec.static:
        if q is None or k is None:
            raise ValueError(f"method {spec.name!r} is dynamic: it needs q and k to plan.")
        return spec.plan(q, k, layout, config, ctx)
    dev = torch.device(device if device is not None else (q.device if q is not None else "cpu"))
    key = (config, layout, str(dev))
    plan = _STATIC_CACHE.get(key)
    if plan is None:
        plan = spec.plan(None, None, layout, config, ctx).to(dev)
        _STATIC_CACHE[key] = plan
        while len(_STATIC_CACHE) > _STATIC_CACHE_SIZE:
            _STATIC_CACHE.popitem(last=False)
    else:
        _STATIC_CACHE.move_to_end(key)
    return plan
