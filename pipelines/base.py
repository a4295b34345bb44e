"""What every model family shares: the adapter interface and the sparse half of every processor.

A family adapter (one file per family: ``pipelines/wan.py``, ``pipelines/cogvideox.py``, ...) declares which
transformer classes it serves, where their video self-attention modules sit, where text sits in the attention
sequence and which processor class replaces the stock one. Everything those declarations imply is implemented once,
here:

- :class:`FamilyAdapter` finds the attention modules (from :attr:`FamilyAdapter.attention_paths`), reads the latent
  grid from the transformer's forward arguments (5-D ``hidden_states`` divided by the model's patch size), installs
  processors (``set_processor``, or plain assignment for modules without it, such as Mochi's);
- :class:`SparseProcessorMixin` is the family-independent half of every processor: the stock dense path
  (:meth:`~SparseProcessorMixin.stock_call`), the dense-or-sparse decision (:meth:`~SparseProcessorMixin.sparse_layout`)
  and the planned block-sparse attention with the model's own masks ANDed
  (:meth:`~SparseProcessorMixin.sparse_attention`);
- mask helpers turn each family's attention mask into the executors' two mask forms: a key padding mask
  (:func:`sequence_validity`, :func:`text_key_padding`) and block-causal groups (:func:`causal_groups_from_mask`).

Family files then hold only what differs: their projections, norms and RoPE (which necessarily mirror the stock
processor of that family) and the adapter's declarations.
"""

from __future__ import annotations

import functools
import inspect
import warnings
import weakref
from typing import Any, ClassVar

import torch

from vidsparse.config import SparseConfig
from vidsparse.hooks import LayerCall, SparseRuntime, mark_handled, missing_root_hook
from vidsparse.kernels.dispatch import block_sparse_attention
from vidsparse.layout import VideoLayout
from vidsparse.plan import BlockPlan

from .parallel import check_context_parallel, context_parallel_config, local_sequence_length, ulysses_attention

#: Where text sits in a family's self-attention sequence.
TEXT_POSITIONS: tuple[str, ...] = ("none", "before", "after")


class FamilyAdapter:
    """How vidsparse plugs into one family of diffusers video transformers.

    Subclasses set the class attributes; the methods below derive everything from them, and a family overrides a
    method only where its model differs (LTX reads its grid from forward keyword arguments, for instance).

    Attributes:
        name: Family name (``"wan"``, ``"cogvideox"``, ...).
        model_classes: Names of the diffusers transformer classes served (matched exactly: diffusers reuses
            processor names across unrelated models, so matching is by model class, never by processor class).
        text_position: Where text sits in the self-attention sequence: ``"none"`` (video only), ``"before"``,
            ``"after"``.
        description: One line for ``vidsparse models``.
        attention_paths: ``(block list attribute, attention attribute)`` pairs naming the video self-attention
            modules, e.g. ``(("blocks", "attn1"),)``; layer indices run through the lists in this order.
        processor_cls: The sparse processor class (``processor_cls(config, original)``).
        frames_dim: Dimension of the frames in the 5-D ``hidden_states``: 2 for ``[B, C, F, H, W]``, 1 for
            ``[B, F, C, H, W]`` (CogVideoX).
        cfg_contexts: The cache-context names the family's pipelines use, for documentation and tests:
            ``("cond", "uncond")`` for split classifier-free guidance, ``("cond_uncond",)`` for batched.
    """

    name: ClassVar[str] = ""
    model_classes: ClassVar[tuple[str, ...]] = ()
    text_position: ClassVar[str] = "none"
    description: ClassVar[str] = ""
    attention_paths: ClassVar[tuple[tuple[str, str], ...]] = ()
    processor_cls: ClassVar[type | None] = None
    frames_dim: ClassVar[int] = 2
    cfg_contexts: ClassVar[tuple[str, ...]] = ("cond", "uncond")

    def matches(self, transformer: torch.nn.Module) -> bool:
        """True when ``transformer`` is one of :attr:`model_classes`."""
        return type(transformer).__name__ in self.model_classes

    def attention_modules(self, transformer: torch.nn.Module) -> list[tuple[str, torch.nn.Module, int]]:
        """The attention modules to sparsify: ``(qualified name, module, layer index)`` from :attr:`attention_paths`.

        Only these modules are touched: anything else (cross-attention, HunyuanVideo's token refiner, the VAE's
        attention) keeps its stock processor.
        """
        found = []
        for container, attribute in self.attention_paths:
            for i, block in enumerate(getattr(transformer, container, None) or ()):
                module = getattr(block, attribute, None)
                if module is not None:
                    found.append((f"{container}.{i}.{attribute}", module, len(found)))
        return found

    def patch_size(self, config: Any) -> tuple[int, int, int]:
        """The model's (t, h, w) patch size from its config.

        A tuple ``patch_size`` (Wan), or an int ``patch_size`` with an optional ``patch_size_t`` (None or absent: 1).
        """
        p = config.patch_size
        if isinstance(p, int):
            return (getattr(config, "patch_size_t", None) or 1, p, p)
        return tuple(int(x) for x in p)

    def grid_from_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[int, int, int] | None:
        """Latent token grid (T', H', W') of this forward call, or None when it cannot be read.

        Default: the 5-D ``hidden_states`` argument divided by :meth:`patch_size` (frames along
        :attr:`frames_dim`).
        """
        hidden_states = forward_arguments(module, args, kwargs).get("hidden_states")
        return grid_from_5d(hidden_states, self.patch_size(module.config), frames_dim=self.frames_dim)

    def text_len_from_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> int | None:
        """Text tokens in the self-attention sequence of this forward call, when known before the blocks run.

        Video-only families (``text_position == "none"``) have none. Joint families return None by default: their
        processors count the text themselves, after the model's own text handling, and a compiled processor then
        builds its layout and plans itself (see :class:`vidsparse.hooks.LayerCall`).
        """
        return 0 if self.text_position == "none" else None

    def hidden_states_from_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
        """The ``hidden_states`` of this forward call (its device and batch are the attention's), or None."""
        return forward_arguments(module, args, kwargs).get("hidden_states")

    def make_processor(self, config: SparseConfig, original: Any) -> Any:
        """A sparse processor replacing ``original`` (copying its backend / parallel settings)."""
        if self.processor_cls is None:
            raise NotImplementedError(f"{type(self).__name__} declares no processor_cls.")
        return self.processor_cls(config, original)

    def get_processor(self, module: torch.nn.Module) -> Any:
        """The module's current processor."""
        return module.processor

    def set_processor(self, module: torch.nn.Module, processor: Any) -> None:
        """Install ``processor`` on ``module`` (``set_processor`` where the module has it, else assignment)."""
        if hasattr(module, "set_processor"):
            module.set_processor(processor)
        else:
            module.processor = processor

    def describe(self) -> dict[str, Any]:
        """A JSON-friendly summary (for ``vidsparse models``)."""
        return {
            "family": self.name,
            "transformer_classes": list(self.model_classes),
            "text_position": self.text_position,
            "attention_modules": [f"{c}.*.{a}" for c, a in self.attention_paths],
            "processor": self.processor_cls.__name__ if self.processor_cls else None,
            "cfg_contexts": list(self.cfg_contexts),
            "description": self.description,
        }


@functools.cache
def _forward_signature(cls: type) -> inspect.Signature:
    return inspect.signature(cls.forward)


def forward_arguments(module: torch.nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The forward call's arguments by name (positional ones bound through the class's ``forward`` signature)."""
    if not args:
        return kwargs
    try:
        bound = _forward_signature(type(module)).bind_partial(module, *args, **kwargs)
    except TypeError:
        return kwargs
    return {name: value for name, value in bound.arguments.items() if name != "self"}


def grid_from_5d(hidden_states: Any, patch_size: Any, *, frames_dim: int = 2) -> tuple[int, int, int] | None:
    """Grid of a 5-D latent tensor divided by the patch size (floor division, as the models' patch embeddings do).

    Args:
        hidden_states: ``[B, C, F, H, W]`` (``frames_dim=2``) or ``[B, F, C, H, W]`` (``frames_dim=1``).
        patch_size: An int (spatial patch, temporal 1) or a (t, h, w) tuple.
    """
    if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 5:
        return None
    if isinstance(patch_size, int):
        pt, ph, pw = 1, patch_size, patch_size
    else:
        pt, ph, pw = (int(p) for p in patch_size)
    f = hidden_states.shape[frames_dim]
    h, w = hidden_states.shape[-2:]
    grid = (f // pt, h // ph, w // pw)
    return grid if min(grid) > 0 else None


# ------------------------------------------------------------------------------------------------- model masks
def sequence_validity(attention_mask: torch.Tensor | None, batch: int, seq_len: int) -> torch.Tensor | None:
    """A per-token validity mask bool ``[B, S]`` from a key-padding style attention mask, video first.

    Accepts the forms diffusers' video-first joint models pass: ``[B, 1, 1, S]`` or ``[B, S]`` over the whole
    sequence (HunyuanVideo), or ``[B, T]`` over the text only, to which the video tokens in front are added as valid
    (HunyuanVideo 1.5). Boolean or 0/1 masks (nonzero = valid); additive float masks are not of this kind and
    never reach it (only cross-attention, which stays stock, receives them).

    Returns:
        bool ``[B, S]`` (True = valid token), ``None`` for no mask; raises ``ValueError`` for any other shape (the
        caller then runs the stock processor: vidsparse never guesses a mask's meaning).
    """
    if attention_mask is None:
        return None
    if attention_mask.dim() == 4 and attention_mask.shape[1:3] == (1, 1):
        attention_mask = attention_mask[:, 0, 0]
    if attention_mask.dim() != 2 or attention_mask.shape[0] not in (1, batch) or attention_mask.shape[1] > seq_len:
        raise ValueError(f"attention mask of shape {tuple(attention_mask.shape)} is not a key padding mask")
    valid = attention_mask.to(torch.bool).expand(batch, -1)
    missing = seq_len - valid.shape[1]
    if missing:
        valid = torch.cat([valid.new_ones(batch, missing), valid], dim=1)
    return valid


def text_key_padding(text_valid: torch.Tensor | None, layout: VideoLayout) -> torch.Tensor | None:
    """Key padding mask bool ``[B, S]`` for a joint sequence from the text tokens' validity ``[B, T]``.

    The video tokens are always valid; the text part sits before or after them as ``layout`` says.
    """
    if text_valid is None:
        return None
    text_valid = text_valid.to(torch.bool)
    video = text_valid.new_ones(text_valid.shape[0], layout.num_video_tokens)
    parts = [text_valid, video] if layout.text_position == "before" else [video, text_valid]
    return torch.cat(parts, dim=1)


class _GroupsCache:
    """The last few masks seen by :func:`causal_groups_from_mask` and their groups.

    A model passes the same mask tensor to every block of a forward call, so it is analysed once per call, not once
    per layer.
    """

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self.entries: list[tuple[Any, int, int, torch.Tensor | None]] = []

    def get(self, mask: torch.Tensor) -> tuple[bool, torch.Tensor | None]:
        for ref, version, ptr, groups in self.entries:
            if ref() is mask and version == mask._version and ptr == mask.data_ptr():
                return True, groups
        return False, None

    def put(self, mask: torch.Tensor, groups: torch.Tensor | None) -> None:
        self.entries = [*self.entries[-(self.size - 1) :], (weakref.ref(mask), mask._version, mask.data_ptr(), groups)]


_groups_cache = _GroupsCache()


@torch.compiler.disable
def causal_groups_from_mask(attention_mask: torch.Tensor, seq_len: int) -> torch.Tensor | None:
    """Express a boolean self-attention mask as block-causal groups, when it is one.

    A mask is block-causal when every query sees exactly the keys whose group is not later than its own, with groups
    of consecutive tokens: SkyReels-V2's diffusion-forcing mask (a latent frame sees the frames of its own block and
    all earlier blocks) is one. Then the number of keys a query sees, ``mask.sum(-1)``, is itself a valid group
    index (the end of the query's group), and the check below verifies the whole mask against it exactly.

    Args:
        attention_mask: bool ``[B or 1, 1, S, S]`` (True = may attend).
        seq_len: S.

    Returns:
        int32 ``[B or 1, S]`` groups with ``mask[b, 0, i, j] == (groups[b, j] <= groups[b, i])``, or ``None`` when the
        mask has another form (the caller then runs the stock dense path).
    """
    hit, groups = _groups_cache.get(attention_mask)
    if hit:
        return groups
    groups = None
    shape_ok = attention_mask.dim() == 4 and attention_mask.shape[1] == 1 and attention_mask.shape[2:] == (seq_len,) * 2
    if shape_ok and attention_mask.dtype == torch.bool:
        mask = attention_mask[:, 0]
        candidate = mask.sum(-1, dtype=torch.int32)  # [B, S]: keys seen by each query
        if torch.equal(mask, candidate[:, None, :] <= candidate[:, :, None]):
            groups = candidate
    _groups_cache.put(attention_mask, groups)
    return groups


_warned: set[tuple] = set()


def project_heads(
    attn: torch.nn.Module, states: torch.Tensor, *, added: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v ``[B, S, H, D]`` of ``states`` ``[B, S, C]`` through the module's projections and its q/k norms.

    Args:
        attn: A diffusers ``Attention``-like module (``heads``, ``to_q/k/v``, optional ``norm_q/k``).
        states: The tokens to project.
        added: Use the text-stream projections of joint attention (``add_q/k/v_proj``, ``norm_added_q/k``).
    """
    names = ("add_q_proj", "add_k_proj", "add_v_proj") if added else ("to_q", "to_k", "to_v")
    query, key, value = (getattr(attn, name)(states).unflatten(2, (attn.heads, -1)) for name in names)
    norm_q = getattr(attn, "norm_added_q" if added else "norm_q", None)
    norm_k = getattr(attn, "norm_added_k" if added else "norm_k", None)
    if norm_q is not None:
        query = norm_q(query)
    if norm_k is not None:
        key = norm_k(key)
    return query, key, value


def warn_once(key: tuple, message: str) -> None:
    """Warn once per ``key`` in this process (vidsparse never falls back to dense silently)."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)


# ----------------------------------------------------------------------------------------------- the processor
class SparseProcessorMixin:
    """The family-independent half of a vidsparse processor.

    Family processors are declared as ``class XSparse(SparseProcessorMixin, StockProcessor)`` (or through a mixin
    shared by several families): they keep the stock ``__call__`` signature (every parameter spelled out: diffusers
    filters keyword arguments by the signature), call :meth:`sparse_layout` to decide, :meth:`stock_call` for every
    dense path, and :meth:`sparse_attention` on the sparse path.

    Args (of every processor built on it):
        config: The method config.
        original: The processor being replaced (its attention backend and parallel config are kept).
    """

    #: diffusers sets these on processors that declare them (``set_attention_backend``, ``enable_parallelism``).
    _attention_backend = None
    _parallel_config = None

    config: SparseConfig

    def __init__(self, config: SparseConfig, original: Any = None) -> None:
        super().__init__()  # the stock processor's constructor (no arguments)
        self._init_sparse(config, original)

    def _init_sparse(self, config: SparseConfig, original: Any = None) -> None:
        self.config = config
        if original is not None:
            self._attention_backend = getattr(original, "_attention_backend", None)
            self._parallel_config = getattr(original, "_parallel_config", None)

    def stock_call(self, attn: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        """The stock processor's ``__call__`` (the next class after this mixin in the MRO): every dense path."""
        if not torch.compiler.is_compiling():
            mark_handled(attn)  # this eager call needs no record from the root hook (see LayerCall)
        return super().__call__(attn, *args, **kwargs)

    def prepared_call(self, attn: torch.nn.Module) -> LayerCall | None:
        """The root hook's decision for this call (:class:`~vidsparse.hooks.LayerCall`), if made for this config."""
        call = getattr(attn, "_vidsparse_call", None)
        return call if call is not None and call.config is self.config else None

    @staticmethod
    def runtime_of(attn: torch.nn.Module) -> SparseRuntime:
        """The runtime attached to ``attn`` by :func:`vidsparse.apply` / :func:`vidsparse.attach`."""
        runtime = getattr(attn, "_vidsparse_runtime", None)
        if runtime is None:
            raise missing_root_hook(attn)
        return runtime

    def sync_parallel_config(self, attn: torch.nn.Module) -> Any:
        """The context-parallel config this self-attention call runs under (None without context parallelism).

        diffusers' ``enable_parallelism`` sets ``_parallel_config`` only on the processors present when it runs,
        and :func:`vidsparse.apply` copies it from the processor it replaces; a processor that has none adopts the
        transformer's (published by the root hook). Either order of ``apply`` and ``enable_parallelism`` therefore
        works, and the stock dense path inherited from diffusers sees the config too.

        Raises:
            ValueError: ring attention (``ring_degree > 1``), which vidsparse does not support.
        """
        if self._parallel_config is None:
            published = self.runtime_of(attn).call_info(attn).parallel_config
            if context_parallel_config(published) is not None:
                self._parallel_config = published
        cp_config = context_parallel_config(self._parallel_config)
        if cp_config is not None:
            check_context_parallel(cp_config)
        return cp_config

    def sparse_layout(
        self, attn: torch.nn.Module, seq_len: int, *, text_len: int = 0, text_position: str = "after"
    ) -> VideoLayout | None:
        """The layout for a sparse call, or ``None`` when this self-attention call must run dense.

        Dense when: the warm-up rules of the config say so (steps, layers, timestep, min tokens), or the sequence
        does not match the grid the root hook saw (then a warning, once per shape: vidsparse never guesses). Under
        context parallelism ``seq_len`` is this rank's shard, compared with this rank's share of the grid.

        Inside a compiled region (``torch.compile``) the root hook's decision for this call is taken as it is
        (:class:`~vidsparse.hooks.LayerCall`: the same rules, applied before the forward), and its layout returned
        itself, so that :meth:`sparse_attention` finds the static plan built with it; eagerly, the call decides and
        records as always.

        Args:
            attn: The attention module.
            seq_len: Tokens in the attention sequence (video + text); this rank's shard under context parallelism.
            text_len: Text tokens in it (joint attention), padding included.
            text_position: ``"before"`` or ``"after"`` the video.
        """
        runtime = self.runtime_of(attn)
        cp_config = self.sync_parallel_config(attn)
        position = "before" if text_position == "before" else "after"
        if torch.compiler.is_compiling() and cp_config is None:
            # Compiled: take the root hook's decision; deciding here would read the step and the layer (guards).
            call = self.prepared_call(attn)
            if call is not None and call.num_video_tokens + text_len == seq_len:
                if not call.sparse:
                    return None
                layout = call.layout
                if layout is not None and layout.text_len == text_len and layout.text_position == position:
                    return layout
                return VideoLayout(*call.grid, text_len=text_len, text_position=position)
        grid = runtime.call_info(attn).grid
        if grid is None:
            return None
        n_video = grid[0] * grid[1] * grid[2]
        total = n_video + text_len
        expected = total if cp_config is None else local_sequence_length(total, cp_config)
        if expected != seq_len:
            shard = "" if cp_config is None else f" on this context-parallel rank (expected {expected})"
            warn_once(
                (type(attn).__name__, grid, seq_len, text_len),
                f"vidsparse: attention over {seq_len} tokens{shard} does not match the latent grid {grid} "
                f"(+{text_len} text); running it dense.",
            )
            return None
        if runtime.dense_reason(attn, self.config, n_video) is not None:
            return None
        return VideoLayout(*grid, text_len=text_len, text_position=position)

    def prepared_plan(self, attn: torch.nn.Module, layout: VideoLayout, device: torch.device) -> BlockPlan | None:
        """The static plan the root hook built for this call's ``layout`` on ``device``, or None.

        ``layout`` must be the prepared layout itself (the one :meth:`sparse_layout` returns when compiling), not an
        equal one: in a frame Dynamo resumes after a graph break, the layouts' sizes may be symbolic (automatic
        dynamic shapes, after a second resolution), and Dynamo cannot compare such dataclasses with ``!=``.
        """
        call = self.prepared_call(attn)
        if call is None or call.plan is None or call.layout is not layout or call.plan.device != device:
            return None
        return call.plan

    def sparse_attention(
        self,
        attn: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        layout: VideoLayout,
        *,
        key_padding_mask: torch.Tensor | None = None,
        causal_groups: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Plan and run block-sparse attention: q/k/v ``[B, S, H, D]`` -> ``[B, S, H, D]``.

        Args:
            key_padding_mask: bool ``[B, S]`` (True = key may be attended), the model's padding: ANDed with the
                plan by every executor.
            causal_groups: int ``[B or 1, S]`` block-causal groups of the model's mask (see
                :func:`causal_groups_from_mask`): ANDed with the plan by every executor.

        Under context parallelism (Ulysses) q/k/v are this rank's sequence shard ``[B, S/N, H, D]``; planning and
        the executor then run inside diffusers' all-to-all on the full sequence of this rank's heads.
        """
        runtime = self.runtime_of(attn)

        def attend(q, k, v, padding_mask, head_offset, num_heads):
            plan = None
            if torch.compiler.is_compiling() and head_offset == 0 and num_heads == q.shape[2]:
                plan = self.prepared_plan(attn, layout, q.device)  # static: built by the root hook
            if plan is None:  # eager, or a dynamic method: plan here (compiled, a graph break)
                plan = runtime.plan(attn, self.config, q, k, layout, head_offset=head_offset, num_heads=num_heads)
            return block_sparse_attention(
                q,
                k,
                v,
                plan,
                backend=self.config.backend,
                key_padding_mask=padding_mask,
                causal_groups=causal_groups,
            )

        if context_parallel_config(self._parallel_config) is None:
            return attend(query, key, value, key_padding_mask, 0, query.shape[2])
        if causal_groups is not None:
            # The groups index the full sequence, but under Ulysses this rank holds a shard: not wired yet.
            raise NotImplementedError(
                "vidsparse: block-causal self-attention masks (SkyReels-V2 diffusion forcing) are not supported "
                "under context parallelism; run this model on one process or without sparse attention."
            )
        return ulysses_attention(query, key, value, attend, self._parallel_config, key_padding_mask=key_padding_mask)
