"""The root hook and the runtime it feeds: step index per cache context, latent grid, dense/sparse decisions.

diffusers attention processors never see the denoising step or the latent grid. vidsparse gets both from one
stateful :class:`~diffusers.hooks.ModelHook` on each transformer (the *root hook*):

- the pipeline wraps every denoiser call in ``transformer.cache_context("cond" | "uncond" | "cond_uncond")``;
  diffusers hands that context to every ``StateManager`` of a stateful hook, so the step counter here is kept per
  context (split CFG counts cond and uncond separately; batched CFG counts once);
- a transformer called directly, outside a pipeline, gets the context ``"default"`` and counts one step per call;
  call :meth:`SparseRuntime.reset` between such generations;
- the latent grid comes from the forward's ``hidden_states`` and the model's patch size (family adapter);
- at the end of a generation the pipeline calls ``reset_state`` (``maybe_free_model_hooks``): counters restart and
  per-layer method state (cached patterns) is dropped;
- a generation that raised (a step callback, Ctrl-C, out of memory) never reaches that reset, so the runtime also
  detects a new generation by itself, at its first call, and starts afresh (see :meth:`SparseRuntime.begin_call`):
  the pipeline's context says ``step_index=0`` while the context already counted steps (Wan, SkyReels), or the
  pipeline's scheduler holds a new ``timesteps`` tensor (``set_timesteps`` runs at the start of every pipeline
  call), or, for a transformer applied without a pipeline, the timestep went up again;
- a *training call* (the transformer in train mode with gradients enabled; pipelines run under ``torch.no_grad()``,
  so a generation never is one) is not a denoising step: it advances no counter, the step rules (``dense_steps``,
  ``dense_last_steps``) do not apply, the timestep rule (``dense_above_timestep``, on the largest timestep of the
  batch) decides, and every call plans afresh (nothing is reused from an earlier call: each batch is a new sample).

Both transformers of a Wan 2.2 two-expert pipeline share one :class:`SparseRuntime` and one ``StateManager``, so the
step count continues when the pipeline switches experts.

For ``torch.compile``, the hook also decides every sparse module's call before the transformer runs, and builds the
static methods' plans (:class:`LayerCall`, published on each module): under regional compilation (the blocks
compiled, the transformer's forward and this hook eager) a compiled processor reads them instead of deciding and
planning itself, so its graph holds no Python state, no guard on the step or the layer, and no graph break.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from diffusers.hooks.hooks import BaseState, CacheContext, HookRegistry, ModelHook, StateManager

from .config import SparseConfig, resolve_step_count
from .kernels.dispatch import resolve_backend
from .kernels.registry import get_executor
from .layout import VideoLayout
from .methods import PlanContext, build_plan, get_method
from .plan import BlockPlan

if TYPE_CHECKING:
    from vidsparse.pipelines.base import FamilyAdapter

HOOK_NAME = "vidsparse"
DEFAULT_CONTEXT = "default"


class StepState(BaseState):
    """Per-cache-context state: the step counter of that context."""

    def __init__(self) -> None:
        self.step = -1
        self.timestep: float | None = None  # of the last call, to see a new generation start (timestep goes up)

    def reset(self, *args: Any, **kwargs: Any) -> None:
        """Back to "no step yet"."""
        self.step = -1
        self.timestep = None


@dataclass
class CallInfo:
    """What the root hook learned about the transformer call in progress.

    Attributes:
        model_index: Which transformer of the handle (0 = ``transformer``, 1 = ``transformer_2``).
        context: Cache-context name.
        step: Step index in that context (0-based).
        num_steps: Steps of the run, when known.
        timestep: Scheduler timestep of the call (first element), when the forward received one.
        grid: Latent token grid (T', H', W') of the video, or None when the adapter could not tell.
        parallel_config: The transformer's diffusers ``ParallelConfig`` (set by ``enable_parallelism``), or None.
            Processors installed after ``enable_parallelism`` take it from here (diffusers only reaches the
            processors present when it is called).
        training: A training call (see the module docstring): ``step`` is then 0 and means nothing, and
            ``timestep`` is the largest of the batch.
    """

    model_index: int
    context: str
    step: int
    num_steps: int | None
    timestep: float | None
    grid: tuple[int, int, int] | None
    parallel_config: Any = None
    training: bool = False


@dataclass
class CallRecord:
    """One attention call, for :meth:`SparseRuntime.stats`."""

    model_index: int
    layer: int
    step: int
    context: str
    sparse: bool
    reason: str
    density: torch.Tensor | float | None = None
    plan_ms: float = 0.0
    tokens: int = 0
    text_tokens: int = 0


@dataclass(eq=False)
class LayerCall:
    """The root hook's decision for one sparse attention module in the transformer call in progress.

    Prepared by :meth:`SparseRuntime.prepare_layers` before the transformer runs and published on the module as
    ``_vidsparse_call``. Under regional compilation (``compile_repeated_blocks``) the root hook runs outside the
    compiled blocks, so a compiled processor reads its decision and plan from here instead of making them: deciding
    reads the step counter and the layer index, and a Python int read inside a compiled region is a guard on its
    value (a recompilation per step, and per layer: every block shares one compiled code object); planning is Python
    over the layout. Everything a compiled processor reads here is the same for every layer and step of the steady
    path (``sparse``, ``num_video_tokens``, ``layout``, the static ``plan``), so one graph serves them all.

    Eager processors decide and plan as before, record their own statistics and mark the call ``handled``; the root
    hook records, after the forward, the calls nobody handled: those of compiled processors.

    Attributes:
        config: The config it was decided for (a processor with another config ignores it).
        layer: Layer index of the module.
        grid: Latent grid of the call.
        num_video_tokens: Video tokens of the grid.
        sparse: The call runs sparse (the one value the compiled processor branches on).
        reason: Why it runs dense (None when sparse), for the statistics.
        layout: The sparse call's layout when the family's adapter knows the text length before the forward
            (video-only families: none); None otherwise (the processor builds it).
        plan: A static method's plan for ``layout`` on the forward's device; None for dynamic methods (they plan
            from q and k, in the processor) or without a layout.
        plan_ms: Time spent building (or fetching from the geometry cache) ``plan``.
        handled: An eager processor dealt with the call (recorded it, or ran the stock path).
    """

    config: SparseConfig
    layer: int
    grid: tuple[int, int, int]
    num_video_tokens: int
    sparse: bool
    reason: str | None
    layout: VideoLayout | None = None
    plan: BlockPlan | None = None
    plan_ms: float = 0.0
    handled: bool = False


def mark_handled(attn: torch.nn.Module) -> None:
    """Note that an eager processor dealt with ``attn``'s call itself (see :class:`LayerCall`)."""
    call = getattr(attn, "_vidsparse_call", None)
    if call is not None:
        call.handled = True


class SparseRuntime:
    """Shared state of one :func:`vidsparse.apply` handle: config, step state, per-layer stores, call statistics.

    Args:
        config: The method config (None for :func:`vidsparse.attach`, where processors carry their own).
        num_steps_fn: Returns the run's number of steps when the hook context does not say (e.g. from the
            pipeline's scheduler); may return None.
        generation_fn: Returns an object that changes with every generation (the pipeline scheduler's
            ``timesteps`` tensor, replaced by ``set_timesteps`` at the start of each pipeline call), or None when
            there is none; a new one at a call means a new generation began.
    """

    def __init__(
        self,
        config: SparseConfig | None,
        num_steps_fn: Callable[[], int | None] | None = None,
        generation_fn: Callable[[], Any] | None = None,
    ) -> None:
        self.config = config
        self.state_manager = StateManager(StepState)
        self.num_steps_fn = num_steps_fn
        self.generation_fn = generation_fn
        self._generation: weakref.ref | None = None  # the last generation object seen (weak: it may be freed)
        self._own_ctx: CacheContext | None = None  # the default context set by begin_call, until end_call
        self.num_steps_override: int | None = None
        self.current: CallInfo | None = None
        self.records: list[CallRecord] = []
        self.stores: dict[tuple[int, int, str], dict[str, Any]] = {}  # (model, layer, context) -> store
        self.shared_stores: dict[tuple[int, int], dict[str, Any]] = {}  # (model, layer) -> store of all contexts
        self.record_stats = True
        self._prepared: list[tuple[torch.nn.Module, LayerCall]] = []  # this transformer call's (module, decision)

    # ------------------------------------------------------------------------------------------- lifecycle
    def reset(self) -> None:
        """Forget step counters and per-layer method state (cached patterns): a new generation starts."""
        self.state_manager.reset()
        self.stores.clear()
        self.shared_stores.clear()
        self.current = None

    def clear_stats(self) -> None:
        """Drop the recorded per-call statistics."""
        self.records.clear()

    # ------------------------------------------------------------------------------------------ root hook
    def begin_call(
        self,
        model_index: int,
        grid: tuple[int, int, int] | None,
        timestep: Any,
        parallel_config: Any = None,
        training: bool = False,
    ) -> bool:
        """Advance the step of the current context; returns True when the hook set a default context itself.

        A training call (``training=True``) advances nothing and is described by :meth:`training_call_info`.
        """
        if training:
            self.current = self.training_call_info(model_index, grid, timestep, parallel_config)
            return False
        ctx = self.state_manager._context
        # Our own default context still set means the call that set it raised before end_call: it is stale, and
        # this call (no transformer call nests in another) takes it over.
        own_context = ctx is None or ctx is self._own_ctx
        if ctx is None:
            ctx = self._own_ctx = CacheContext(DEFAULT_CONTEXT)
            self.state_manager.set_context(ctx)
        ts = None
        if isinstance(timestep, torch.Tensor) and timestep.numel():
            ts = float(timestep.reshape(-1)[0])
        elif isinstance(timestep, int | float):
            ts = float(timestep)
        state = self.state_manager.get_state()
        if self._new_generation(ctx, state, ts):
            self.reset()
            self.state_manager.set_context(ctx)  # reset() cleared it; this call still runs in it
            state = self.state_manager.get_state()
        state.step += 1
        state.timestep = ts
        num_steps = self.num_steps_override or ctx.num_inference_steps
        if num_steps is None and self.num_steps_fn is not None:
            num_steps = self.num_steps_fn()
        self.current = CallInfo(model_index, ctx.name, state.step, num_steps, ts, grid, parallel_config)
        return own_context

    def _new_generation(self, ctx: CacheContext, state: StepState, timestep: float | None) -> bool:
        """Whether this call starts a new generation while state of an earlier one is still held.

        diffusers resets the hooks only at the end of a pipeline call that returns; one that raised leaves its
        counters behind. Signals, most specific first: the pipeline's own step index (0 while this context already
        counted steps), the scheduler's ``timesteps`` object (new per pipeline call), and without either, a
        timestep above the previous call's in this context (denoising only ever lowers it).
        """
        new = ctx.step_index == 0 and state.step >= 0
        generation = self.generation_fn() if self.generation_fn is not None else None
        if generation is not None:
            seen = self._generation() if self._generation is not None else None
            new = new or seen is not generation
            self._generation = weakref.ref(generation)
        elif ctx.step_index is None and timestep is not None and state.timestep is not None:
            new = new or timestep > state.timestep
        return new

    @staticmethod
    def training_call_info(
        model_index: int, grid: tuple[int, int, int] | None, timestep: Any, parallel_config: Any
    ) -> CallInfo:
        """The :class:`CallInfo` of a training call: no step, no context, the batch's largest timestep.

        A training batch mixes noise levels (one timestep per sample, or per token for Wan 2.2 TI2V); the call runs
        dense when any of them is above ``dense_above_timestep``, so no sample that the rule keeps dense is
        trained sparse.
        """
        ts = None
        if isinstance(timestep, torch.Tensor) and timestep.numel():
            ts = float(timestep.detach().max())
        elif isinstance(timestep, int | float):
            ts = float(timestep)
        return CallInfo(model_index, "training", 0, None, ts, grid, parallel_config, training=True)

    def end_call(self, own_context: bool) -> None:
        """Undo a default context set by :meth:`begin_call` (the step counter itself persists)."""
        if own_context and self.state_manager._context is self._own_ctx:
            self.state_manager.set_context(None)
        if own_context:
            self._own_ctx = None

    # ----------------------------------------------------------------------------------- prepared decisions
    def prepare_layers(
        self,
        layers: list[tuple[torch.nn.Module, SparseConfig | None]],
        *,
        text_len: int | None,
        device: torch.device | None,
        batch: int | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """Decide every sparse module's call (and build static plans) before the transformer runs; see LayerCall.

        Called by the root hook after :meth:`begin_call`. Each module gets ``_vidsparse_call``: its
        :class:`LayerCall`, or None where nothing can be decided yet (no grid, or a processor without a config).

        Args:
            layers: ``(module, config of its processor)`` for every sparse attention module of the transformer.
            text_len: Text tokens in the self-attention sequence when known before the forward (0 for video-only
                families), else None: layouts and plans are then left to the processors.
            device: The forward's device, where static plans are built (None: left to the processors).
            batch, dtype: The attention's batch size and dtype when known: the executor that will run a static
                plan builds what it caches on it for that shape (``Executor.prepare``; ``gather``'s schedule).
        """
        self._prepared = []
        info = self.current
        layouts: dict[int, VideoLayout] = {}  # id(config) -> the call's layout, one object for all its layers
        prepared_executors: set[tuple[int, int | None]] = set()  # (id(config), heads) done in this call
        for module, config in layers:
            call = None
            if info is not None and info.grid is not None and config is not None:
                call = self._prepare_layer(info, module._vidsparse_layer, config, text_len, device, layouts)
                heads = getattr(module, "heads", None)
                if call.plan is not None and batch is not None and (id(config), heads) not in prepared_executors:
                    prepared_executors.add((id(config), heads))
                    self._prepare_executor(config, call.plan, batch, heads, dtype, info.training)
                self._prepared.append((module, call))
            module._vidsparse_call = call

    def _prepare_layer(
        self,
        info: CallInfo,
        layer: int,
        config: SparseConfig,
        text_len: int | None,
        device: torch.device | None,
        layouts: dict[int, VideoLayout],
    ) -> LayerCall:
        grid = info.grid
        n_video = grid[0] * grid[1] * grid[2]
        reason = self.decide(info, config, layer, n_video)
        call = LayerCall(config, layer, grid, n_video, reason is None, reason)
        if reason is not None or text_len is None:
            return call
        call.layout = layouts.setdefault(id(config), VideoLayout(*grid, text_len=text_len))
        if device is not None and get_method(config.method).static:
            # Per layer, as the processor would (a geometry-cache hit after the first): plan_ms keeps its meaning.
            start = time.perf_counter()
            try:
                call.plan = build_plan(config, None, None, call.layout, device=device)
            except Exception:
                # Whatever is wrong with this geometry, the processor raises it where it would without this
                # preparation (or never, when its call turns out dense), so the forward behaves the same.
                call.plan = None
            call.plan_ms = (time.perf_counter() - start) * 1000
        return call

    @staticmethod
    def _prepare_executor(
        config: SparseConfig, plan: BlockPlan, batch: int, heads: int | None, dtype: torch.dtype | None, grad: bool
    ) -> None:
        """Let the executor that will run ``plan`` build what it caches on it (see ``Executor.prepare``)."""
        if not isinstance(heads, int):
            return
        try:
            spec = get_executor(resolve_backend(config.backend, plan.device, dtype, needs_grad=grad))
            if spec.prepare is not None:
                spec.prepare(plan, batch, heads, grad)
        except Exception:
            # Only a head start: whatever fails here fails again, and is raised, where the executor runs.
            return

    def record_prepared(self) -> None:
        """Record the prepared calls that no eager processor handled (compiled processors'), and unpublish them.

        The records are those the eager processors would have made: a dense call with its reason, a sparse call
        with its plan's density and planning time. A compiled processor that fell back to the stock path for a
        reason only it could see (a sequence that does not match the grid, which warns) is recorded as decided.
        """
        info = self.current
        for module, call in self._prepared:
            if getattr(module, "_vidsparse_call", None) is call:
                module._vidsparse_call = None
            if call.handled or info is None or not self.record_stats:
                continue
            if call.sparse and call.plan is None:
                continue  # no plan to describe (its processor would have planned, and recorded, itself)
            if not call.sparse:
                record = CallRecord(
                    info.model_index,
                    call.layer,
                    info.step,
                    info.context,
                    False,
                    call.reason,
                    tokens=call.num_video_tokens,
                )
            else:
                record = CallRecord(
                    info.model_index,
                    call.layer,
                    info.step,
                    info.context,
                    True,
                    "sparse",
                    call.plan.mean_density,
                    call.plan_ms,
                    call.num_video_tokens,
                    call.layout.text_len,
                )
            self.records.append(record)
        self._prepared = []

    # ------------------------------------------------------------------------------------------ decisions
    def call_info(self, attn: torch.nn.Module) -> CallInfo:
        """The info of the call in progress; raises when the root hook is missing."""
        if getattr(attn, "_vidsparse_runtime", None) is not self or self.current is None:
            raise missing_root_hook(attn)
        return self.current

    @staticmethod
    def decide(info: CallInfo, config: SparseConfig, layer: int, num_video_tokens: int) -> str | None:
        """Why a self-attention call of ``layer`` runs dense under ``config`` (``None``: it runs sparse).

        The rules, first match: ``dense_layers``, ``dense_steps``, ``dense_last_steps`` (not for training calls),
        ``dense_above_timestep``, ``min_tokens``. Pure: records nothing.
        """
        if layer < config.dense_layers:
            return "dense_layers"
        ns = info.num_steps
        if not info.training and info.step < resolve_step_count(config.dense_steps, ns):
            return "dense_steps"
        if not info.training and ns is not None and info.step >= ns - resolve_step_count(config.dense_last_steps, ns):
            return "dense_last_steps"
        if (
            config.dense_above_timestep is not None
            and info.timestep is not None
            and info.timestep > config.dense_above_timestep
        ):
            return "dense_above_timestep"
        if num_video_tokens < config.min_tokens:
            return "min_tokens"
        return None

    @torch.compiler.disable
    def dense_reason(self, attn: torch.nn.Module, config: SparseConfig, num_video_tokens: int) -> str | None:
        """Why this self-attention call runs dense (``None``: it runs sparse). Records dense calls."""
        info = self.call_info(attn)
        layer = attn._vidsparse_layer
        reason = self.decide(info, config, layer, num_video_tokens)
        mark_handled(attn)
        if reason is not None and self.record_stats:
            self.records.append(
                CallRecord(info.model_index, layer, info.step, info.context, False, reason, tokens=num_video_tokens)
            )
        return reason

    @torch.compiler.disable
    def plan(
        self,
        attn: torch.nn.Module,
        config: SparseConfig,
        q: torch.Tensor,
        k: torch.Tensor,
        layout: VideoLayout,
        *,
        head_offset: int = 0,
        num_heads: int | None = None,
    ) -> BlockPlan:
        """Plan this call with ``config``'s method (static plans come from the geometry cache); records it.

        Args:
            q, k: ``[B, S, H, D]``: the full sequence; under context parallelism only this rank's heads.
            head_offset: Index of q's first head among the layer's ``num_heads`` heads (context parallelism).
            num_heads: Heads of the layer (default: q's). A plan the method makes for all ``num_heads`` heads is
                cut to q's heads.
        """
        info = self.call_info(attn)
        layer = attn._vidsparse_layer
        local_heads = q.shape[2]
        num_heads = local_heads if num_heads is None else num_heads
        if info.training:  # each training batch is a new sample: nothing carries over from an earlier call
            store, shared = {}, {}
        else:
            store = self.stores.setdefault((info.model_index, layer, info.context), {})
            shared = self.shared_stores.setdefault((info.model_index, layer), {})
        ctx = PlanContext(
            layer=layer,
            step=info.step,
            num_steps=info.num_steps,
            context=info.context,
            store=store,
            model=info.model_index,
            shared=shared,
            head_offset=head_offset,
            num_heads=num_heads,
        )
        prepared = getattr(attn, "_vidsparse_call", None)
        mark_handled(attn)
        if (
            prepared is not None
            and prepared.plan is not None
            and prepared.config is config
            and prepared.layout == layout
            and local_heads == num_heads
            and prepared.plan.device == q.device
        ):
            # The root hook built this static plan before the forward (the geometry cache's plan): its time is
            # what planning cost.
            plan, plan_ms = prepared.plan, prepared.plan_ms
        else:
            start = time.perf_counter()
            plan = build_plan(config, q, k, layout, ctx)
            if local_heads != num_heads and plan.kv_num.shape[1] == num_heads:
                plan = plan.select_heads(head_offset, head_offset + local_heads)
            plan_ms = (time.perf_counter() - start) * 1000
        if self.record_stats:
            self.records.append(
                CallRecord(
                    info.model_index,
                    layer,
                    info.step,
                    info.context,
                    True,
                    "sparse",
                    plan.mean_density,
                    plan_ms,
                    layout.num_video_tokens,
                    layout.text_len,
                )
            )
        return plan

    # ------------------------------------------------------------------------------------------- reports
    def stats(self) -> list[dict[str, Any]]:
        """One dict per recorded self-attention call.

        Keys: model, layer, step, context, sparse, reason, density, plan_ms, tokens (video), text_tokens (text in the
        same sequence, joint attention; recorded for sparse calls).
        """
        rows = []
        for r in self.records:
            density = r.density
            if isinstance(density, torch.Tensor):
                density = float(density)
            rows.append(
                {
                    "model": r.model_index,
                    "layer": r.layer,
                    "step": r.step,
                    "context": r.context,
                    "sparse": r.sparse,
                    "reason": r.reason,
                    "density": density if r.sparse else 1.0,
                    "plan_ms": r.plan_ms,
                    "tokens": r.tokens,
                    "text_tokens": r.text_tokens,
                }
            )
        return rows

    def summary(self) -> dict[str, Any]:
        """Aggregate of :meth:`stats`: call counts, mean density of sparse calls, mean density over all calls."""
        rows = self.stats()
        sparse = [r for r in rows if r["sparse"]]
        return {
            "calls": len(rows),
            "sparse_calls": len(sparse),
            "sparse_density": (sum(r["density"] for r in sparse) / len(sparse)) if sparse else None,
            "overall_density": (sum(r["density"] for r in rows) / len(rows)) if rows else None,
            "plan_ms": sum(r["plan_ms"] for r in sparse),
        }


class VidSparseRootHook(ModelHook):
    """The stateful root hook on a transformer: counts steps per cache context and publishes grid and timestep.

    The ``state_manager`` attribute is the runtime's (shared by all transformers of a handle): diffusers'
    ``cache_context`` finds it by type among the hook's attributes and sets the context on it.
    """

    _is_stateful = True

    def __init__(self, runtime: SparseRuntime, adapter: FamilyAdapter, model_index: int) -> None:
        super().__init__()
        self.runtime = runtime
        self.state_manager = runtime.state_manager
        self.adapter = adapter
        self.model_index = model_index
        self._own_context = False  # pre_forward set the context itself (transformer calls never nest)
        self._modules: list[torch.nn.Module] | None = None  # the sparse attention modules, found at the first call

    @torch.compiler.disable
    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple[Any, ...], dict]:
        """Count the step and publish grid, timestep and parallel config before the transformer runs.

        The grid is read from the transformer's own input, which context parallelism has not split yet: diffusers'
        split hooks shard the sequence at inner modules (Wan: ``rope`` and ``blocks.0``).
        """
        grid = self.adapter.grid_from_forward(module, args, kwargs)
        timestep = kwargs.get("timestep", None)
        parallel_config = getattr(module, "_parallel_config", None)
        training = module.training and torch.is_grad_enabled()  # pipelines run under no_grad: never training
        self._own_context = self.runtime.begin_call(self.model_index, grid, timestep, parallel_config, training)
        hidden_states = self.adapter.hidden_states_from_forward(module, args, kwargs)
        known = isinstance(hidden_states, torch.Tensor)
        self.runtime.prepare_layers(
            [(m, self._config_of(m)) for m in self._sparse_modules(module)],
            text_len=self.adapter.text_len_from_forward(module, args, kwargs),
            device=hidden_states.device if known else None,
            batch=hidden_states.shape[0] if known else None,
            dtype=getattr(module, "dtype", None),  # a diffusers model's parameters' dtype: the attention's
        )
        return args, kwargs

    def _sparse_modules(self, module: torch.nn.Module) -> list[torch.nn.Module]:
        """The transformer's attention modules tagged with this hook's runtime (found once)."""
        if self._modules is None:
            self._modules = [
                m
                for _, m, _ in self.adapter.attention_modules(module)
                if getattr(m, "_vidsparse_runtime", None) is self.runtime
            ]
        return self._modules

    def _config_of(self, attn: torch.nn.Module) -> SparseConfig | None:
        """The config of the vidsparse processor on ``attn`` (read per call: ``attach`` users may swap them)."""
        config = getattr(self.adapter.get_processor(attn), "config", None)
        return config if isinstance(config, SparseConfig) else None

    @torch.compiler.disable
    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        """Record the calls of compiled processors; clear a default context set in :meth:`pre_forward`."""
        self.runtime.record_prepared()
        self.runtime.end_call(self._own_context)
        self._own_context = False
        return output

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        """End of a generation (diffusers calls this from ``maybe_free_model_hooks``)."""
        self.runtime.reset()
        return module


def missing_root_hook(attn: torch.nn.Module) -> RuntimeError:
    """The one error of a sparse processor called without the root hook (and runtime) of :func:`vidsparse.apply`."""
    return RuntimeError(
        f"This vidsparse processor runs without its root hook on a {type(attn).__name__}. Install it with "
        "`vidsparse.apply(pipe, method)` (or `vidsparse.attach(pipe)` after `set_attn_processor`), and only "
        "on the family's sparse modules (`vidsparse models`): e.g. HunyuanVideo's token refiner is not one, "
        "so pass `set_attn_processor` a dict for transformer_blocks/single_transformer_blocks there."
    )


def install_root_hook(transformer: torch.nn.Module, hook: VidSparseRootHook) -> None:
    """Register ``hook`` under :data:`HOOK_NAME` (an existing one is an error: one handle per transformer)."""
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    if registry.get_hook(HOOK_NAME) is not None:
        raise RuntimeError(
            f"vidsparse is already applied to this {type(transformer).__name__}; call `handle.remove()` (or "
            "`vidsparse.remove(pipe)`) before applying again."
        )
    registry.register_hook(hook, HOOK_NAME)


def remove_root_hook(transformer: torch.nn.Module) -> None:
    """Remove the root hook from ``transformer`` (no-op when absent)."""
    registry = getattr(transformer, "_diffusers_hook", None)
    if registry is not None and registry.get_hook(HOOK_NAME) is not None:
        registry.remove_hook(HOOK_NAME, recurse=False)
