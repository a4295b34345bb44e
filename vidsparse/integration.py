"""Installing vidsparse on a pipeline or transformer, and taking it off again.

:func:`apply` = root hook on every transformer of the pipeline + a sparse processor on every video self-attention
module; :func:`attach` = root hook only (for processors installed by the user with ``set_attn_processor``);
:meth:`SparseHandle.remove` restores exactly what was there before (the very same processor objects).
"""

from __future__ import annotations

import hashlib
import json
import weakref
from collections.abc import Iterator
from typing import Any

import torch

from .config import SparseConfig
from .hooks import SparseRuntime, VidSparseRootHook, install_root_hook, remove_root_hook
from .methods import ModelInfo, get_method, make_config

#: Pipeline attributes that hold denoising transformers (Wan 2.2 A14B has two experts).
TRANSFORMER_ATTRIBUTES: tuple[str, ...] = ("transformer", "transformer_2")
#: What a sparse processor needs to know of the module it runs on, set on each attention module by the handle and
#: removed with it. It lives on the module because diffusers calls ``processor(attn, ...)`` with the module only and
#: one processor instance may serve many modules (``set_attn_processor(proc)``); the runtime the tag points to is
#: the handle's, so no state outlives ``handle.remove()``.
_TAGS = ("_vidsparse_runtime", "_vidsparse_layer", "_vidsparse_model", "_vidsparse_call")


def transformers_of(pipe_or_transformer: Any) -> list[torch.nn.Module]:
    """The denoising transformers of a pipeline (``transformer``, ``transformer_2``), or ``[transformer]``."""
    if isinstance(pipe_or_transformer, torch.nn.Module):
        return [pipe_or_transformer]
    found = [getattr(pipe_or_transformer, name, None) for name in TRANSFORMER_ATTRIBUTES]
    found = [t for t in found if isinstance(t, torch.nn.Module)]
    if not found:
        raise TypeError(
            f"pipe_or_transformer must be a diffusers pipeline with a `transformer` or a transformer model; got "
            f"{type(pipe_or_transformer).__name__} (it has no `transformer` / `transformer_2` module)."
        )
    return found


def model_fingerprint(transformer: torch.nn.Module) -> str:
    """A short hash of a transformer's config (class and architecture, not weights): 16 hex digits."""
    config = getattr(transformer, "config", None)
    items = {k: v for k, v in dict(config or {}).items() if not str(k).startswith("_")}
    text = json.dumps({"class": type(transformer).__name__, "config": items}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def describe_models(transformers: list[torch.nn.Module]) -> list[ModelInfo]:
    """One :class:`~vidsparse.methods.ModelInfo` per transformer: what methods may know of a model.

    The seam between models and methods: methods see tensors, layouts and these facts, never a module.
    """
    from vidsparse.pipelines.registry import adapter_for

    return [
        ModelInfo(type(t).__name__, model_fingerprint(t), len(adapter_for(t).attention_modules(t)))
        for t in transformers
    ]


def _num_steps_from(pipe: Any):
    """A callable returning the pipeline's current number of denoising steps (from its scheduler), if any."""
    if isinstance(pipe, torch.nn.Module) or getattr(pipe, "scheduler", None) is None:
        return None
    ref = weakref.ref(pipe)

    def num_steps() -> int | None:
        p = ref()
        timesteps = getattr(getattr(p, "scheduler", None), "timesteps", None)
        return len(timesteps) if timesteps is not None else None

    return num_steps


def _generation_from(pipe: Any):
    """A callable returning the pipeline scheduler's ``timesteps`` tensor, which each pipeline call replaces.

    ``set_timesteps`` runs at the start of every diffusers pipeline call, so a new object means a new generation,
    even when the previous one raised before diffusers' end-of-call reset (see :mod:`vidsparse.hooks`).
    """
    if isinstance(pipe, torch.nn.Module) or getattr(pipe, "scheduler", None) is None:
        return None
    ref = weakref.ref(pipe)

    def generation() -> Any:
        timesteps = getattr(getattr(ref(), "scheduler", None), "timesteps", None)
        return timesteps if isinstance(timesteps, torch.Tensor) else None

    return generation


class SparseHandle:
    """What :func:`apply` / :func:`attach` return: statistics, reset, and :meth:`remove`.

    Usable as a context manager: ``with vidsparse.apply(pipe, "radial"): pipe(...)`` removes itself on exit.
    """

    def __init__(self, runtime: SparseRuntime, transformers: list[torch.nn.Module]) -> None:
        self.runtime = runtime
        self.transformers = transformers
        self._modules: list[torch.nn.Module] = []
        self._originals: list[tuple[Any, torch.nn.Module, Any]] = []  # (adapter, module, original processor)
        self.active = True

    @property
    def config(self) -> SparseConfig | None:
        """The method config (None for :func:`attach` handles)."""
        return self.runtime.config

    def stats(self) -> list[dict[str, Any]]:
        """One row per video self-attention call since the last :meth:`clear_stats`.

        Keys: model, layer, step, context, sparse (bool), reason, measured density (1.0 for dense calls), plan_ms,
        tokens (video), text_tokens (text tokens in the same attention sequence, for sparse calls).
        """
        return self.runtime.stats()

    def summary(self) -> dict[str, Any]:
        """Call counts and mean measured densities (see :meth:`SparseRuntime.summary`)."""
        return self.runtime.summary()

    def clear_stats(self) -> None:
        """Forget recorded calls (e.g. between a warm-up and a measured run)."""
        self.runtime.clear_stats()

    def reset(self) -> None:
        """Restart step counters and drop per-layer state.

        Pipelines do this by themselves after each call; do it between generations when calling the transformer
        directly.
        """
        self.runtime.reset()

    def set_num_steps(self, num_steps: int | None) -> None:
        """Declare the run's step count (for fractional ``dense_steps`` when the transformer is called directly)."""
        self.runtime.num_steps_override = num_steps

    def remove(self) -> None:
        """Restore the original processors (the same objects) and remove the root hooks and module tags."""
        if not self.active:
            return
        for adapter, module, original in self._originals:
            _carry_diffusers_settings(adapter.get_processor(module), original)
            adapter.set_processor(module, original)
        for module in self._modules:
            for tag in _TAGS:
                if hasattr(module, tag):
                    delattr(module, tag)
        for transformer in self.transformers:
            remove_root_hook(transformer)
            if getattr(transformer, "_vidsparse_handle", None) is self:
                del transformer._vidsparse_handle
        self.runtime.reset()
        self.active = False

    def __enter__(self) -> SparseHandle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def __repr__(self) -> str:
        method = self.config.method if self.config else "attach"
        return f"SparseHandle(method={method!r}, transformers={len(self.transformers)}, active={self.active})"


#: Processor attributes diffusers writes on every processor that declares them (``set_attention_backend``,
#: ``enable_parallelism``): they belong to the module's slot and move with it when processors are swapped.
DIFFUSERS_PROCESSOR_SETTINGS = ("_attention_backend", "_parallel_config")


def _carry_diffusers_settings(current: Any, original: Any) -> None:
    """Give ``original`` the diffusers settings made while ``current`` (ours) was installed.

    E.g. ``enable_parallelism`` after :func:`apply`: the restored stock processor must run as diffusers configured
    the model, or it would attend over its local sequence shard only.
    """
    for name in DIFFUSERS_PROCESSOR_SETTINGS:
        value = getattr(current, name, None)
        if value is not None and hasattr(original, name):
            setattr(original, name, value)


def _install(pipe_or_transformer: Any, config: SparseConfig | None, num_steps: int | None) -> SparseHandle:
    from vidsparse.pipelines.parallel import check_context_parallel, context_parallel_config
    from vidsparse.pipelines.registry import adapter_for

    transformers = transformers_of(pipe_or_transformer)
    adapters = [adapter_for(t) for t in transformers]  # fails before anything is touched
    check_model = get_method(config.method).check_model if config is not None else None
    if check_model is not None:
        check_model(config, describe_models(transformers))  # e.g. a calibration file for another model: refused
    for t in transformers:
        cp_config = context_parallel_config(getattr(t, "_parallel_config", None))
        if cp_config is not None:
            check_context_parallel(cp_config)  # ring attention: refused before anything is touched
    for t in transformers:
        if getattr(t, "_vidsparse_handle", None) is not None:
            raise RuntimeError(
                f"vidsparse is already applied to this {type(t).__name__}; call `handle.remove()` (or "
                "`vidsparse.remove(pipe)`) before applying again."
            )
    runtime = SparseRuntime(config, _num_steps_from(pipe_or_transformer), _generation_from(pipe_or_transformer))
    runtime.num_steps_override = num_steps
    handle = SparseHandle(runtime, transformers)
    for index, (transformer, adapter) in enumerate(zip(transformers, adapters)):
        install_root_hook(transformer, VidSparseRootHook(runtime, adapter, index))
        transformer._vidsparse_handle = handle
        for _, module, layer in adapter.attention_modules(transformer):
            module._vidsparse_runtime = runtime
            module._vidsparse_layer = layer
            module._vidsparse_model = index
            handle._modules.append(module)
            if config is not None:
                original = adapter.get_processor(module)
                handle._originals.append((adapter, module, original))
                adapter.set_processor(module, adapter.make_processor(config, original))
    return handle


def apply(
    pipe_or_transformer: Any,
    method_or_config: str | SparseConfig = "radial",
    *,
    num_steps: int | None = None,
    **overrides: Any,
) -> SparseHandle:
    """Make a diffusers video pipeline (or a transformer) use block-sparse self-attention.

    Installs a root hook on every transformer (``transformer``, and ``transformer_2`` for Wan 2.2 A14B) and a
    sparse processor on every video self-attention module; cross-attention and the dense warm-up stay with the
    stock processor.

    Args:
        pipe_or_transformer: A pipeline with a ``transformer`` (e.g. ``WanPipeline``) or a transformer model.
        method_or_config: A method name (see :func:`vidsparse.method_names`) or a config instance.
        num_steps: The run's step count, only needed for fractional ``dense_steps`` when a transformer is called
            directly (pipelines report it themselves).
        **overrides: Config fields, e.g. ``density=0.3, dense_steps=2``.

    Returns:
        A :class:`SparseHandle`: ``.stats()``, ``.summary()``, ``.remove()``.

    Raises:
        TypeError: not a pipeline/transformer, or an unsupported model class (the message lists supported ones),
            or an unknown config option.
        ValueError: an unknown method or an invalid option value (named in the message).
    """
    config = make_config(method_or_config, **overrides)
    return _install(pipe_or_transformer, config, num_steps)


def attach(pipe_or_transformer: Any, *, num_steps: int | None = None) -> SparseHandle:
    """Install only the root hook, for vidsparse processors set by hand with ``set_attn_processor``.

    Example::

        proc = vidsparse.make_processor(pipe.transformer, "radial", density=0.3)
        pipe.transformer.set_attn_processor(proc)   # every attention module; cross-attention stays dense
        handle = vidsparse.attach(pipe)
    """
    return _install(pipe_or_transformer, None, num_steps)


def make_processor(transformer: torch.nn.Module, method_or_config: str | SparseConfig, **overrides: Any) -> Any:
    """A vidsparse processor for ``transformer``'s family (to pass to ``set_attn_processor``)."""
    from vidsparse.pipelines.registry import adapter_for

    adapter = adapter_for(transformer)
    return adapter.make_processor(make_config(method_or_config, **overrides), None)


def remove(pipe_or_transformer: Any) -> None:
    """Undo :func:`apply` / :func:`attach` on a pipeline or transformer (no-op when nothing is applied)."""
    for handle in _handles(pipe_or_transformer):
        handle.remove()


def _handles(pipe_or_transformer: Any) -> Iterator[SparseHandle]:
    seen: set[int] = set()
    for t in transformers_of(pipe_or_transformer):
        handle = getattr(t, "_vidsparse_handle", None)
        if handle is not None and id(handle) not in seen:
            seen.add(id(handle))
            yield handle
