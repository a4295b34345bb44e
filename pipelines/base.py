"""What every model family shares: the adapter interface and the sparse half of every processor.

A family adapter (one file per family: ``pipelines/wan.py``, ...) says which transformer classes it serves, which
attention modules are video self-attention, how to read the latent grid from the transformer's forward arguments,
and which processor class replaces the stock one. The processor classes subclass the stock diffusers processor (so
every dense path *is* the stock code) and :class:`SparseProcessorMixin`, which holds the logic that is the same for
all families: decide dense or sparse for this call, plan, run the executor.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, ClassVar

import torch

from vidsparse.config import SparseConfig
from vidsparse.hooks import SparseRuntime
from vidsparse.kernels import block_sparse_attention
from vidsparse.layout import VideoLayout


class FamilyAdapter:
    """How vidsparse plugs into one family of diffusers video transformers.

    Subclasses set the class attributes and implement :meth:`attention_modules`, :meth:`grid_from_forward` and
    :meth:`make_processor`.

    Attributes:
        name: Family name (``"wan"``, ...).
        model_classes: Names of the diffusers transformer classes served (matched exactly: diffusers reuses
            processor names across unrelated models, so matching is by model class, never by processor class).
        text_position: Where text sits in the self-attention sequence: ``"none"``, ``"before"``, ``"after"``.
        description: One line for ``vidsparse models``.
    """

    name: ClassVar[str] = ""
    model_classes: ClassVar[tuple[str, ...]] = ()
    text_position: ClassVar[str] = "none"
    description: ClassVar[str] = ""

    def matches(self, transformer: torch.nn.Module) -> bool:
        """True when ``transformer`` is one of :attr:`model_classes`."""
        return type(transformer).__name__ in self.model_classes

    def attention_modules(self, transformer: torch.nn.Module) -> list[tuple[str, torch.nn.Module, int]]:
        """The attention modules to sparsify: ``(qualified name, module, layer index)``."""
        raise NotImplementedError

    def grid_from_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[int, int, int] | None:
        """Latent token grid (T', H', W') of this forward call, or None when it cannot be read."""
        raise NotImplementedError

    def make_processor(self, config: SparseConfig, original: Any) -> Any:
        """A sparse processor replacing ``original`` (copying its backend / parallel settings)."""
        raise NotImplementedError

    def get_processor(self, module: torch.nn.Module) -> Any:
        """The module's current processor."""
        return module.processor

    def set_processor(self, module: torch.nn.Module, processor: Any) -> None:
        """Install ``processor`` on ``module`` (``set_processor`` where the module has it)."""
        if hasattr(module, "set_processor"):
            module.set_processor(processor)
        else:
            module.processor = processor


def grid_from_5d(hidden_states: Any, patch_size: Any, *, frames_dim: int = 2) -> tuple[int, int, int] | None:
    """Grid of a 5-D latent tensor divided by the patch size.

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
    return (math.ceil(f / pt), h // ph, w // pw)


_warned_layouts: set[tuple] = set()


class SparseProcessorMixin:
    """The family-independent half of a vidsparse processor.

    Subclasses (one per family) inherit the stock diffusers processor *after* this mixin, keep the stock
    ``__call__`` signature (every parameter spelled out: diffusers filters keyword arguments by the signature), and
    call :meth:`sparse_layout` to decide, then :meth:`sparse_attention` on the sparse path.
    """

    #: diffusers sets these on processors that declare them (``set_attention_backend``, ``enable_parallelism``).
    _attention_backend = None
    _parallel_config = None

    config: SparseConfig

    def _init_sparse(self, config: SparseConfig, original: Any = None) -> None:
        self.config = config
        if original is not None:
            self._attention_backend = getattr(original, "_attention_backend", None)
            self._parallel_config = getattr(original, "_parallel_config", None)

    @staticmethod
    def runtime_of(attn: torch.nn.Module) -> SparseRuntime:
        """The runtime attached to ``attn`` by :func:`vidsparse.apply` / :func:`vidsparse.attach`."""
        runtime = getattr(attn, "_vidsparse_runtime", None)
        if runtime is None:
            raise RuntimeError(
                "This vidsparse processor runs without its root hook. Install it with "
                "`vidsparse.apply(pipe, method)` (or `vidsparse.attach(pipe)` after `set_attn_processor`)."
            )
        return runtime

    def sparse_layout(
        self, attn: torch.nn.Module, seq_len: int, *, text_len: int = 0, text_position: str = "after"
    ) -> VideoLayout | None:
        """The layout for a sparse call, or ``None`` when this self-attention call must run dense.

        Dense when: the warm-up rules of the config say so (steps, layers, timestep, min tokens), or the sequence
        does not match the grid the root hook saw (then a warning, once per shape: vidsparse never guesses).
        """
        runtime = self.runtime_of(attn)
        grid = runtime.call_info(attn).grid
        if grid is None:
            return None
        n_video = grid[0] * grid[1] * grid[2]
        if n_video + text_len != seq_len:
            key = (type(attn).__name__, grid, seq_len, text_len)
            if key not in _warned_layouts:
                _warned_layouts.add(key)
                warnings.warn(
                    f"vidsparse: attention over {seq_len} tokens does not match the latent grid {grid} "
                    f"(+{text_len} text); running it dense.",
                    stacklevel=3,
                )
            return None
        if runtime.dense_reason(attn, self.config, n_video) is not None:
            return None
        return VideoLayout(*grid, text_len=text_len, text_position="before" if text_position == "before" else "after")

    def sparse_attention(
        self,
        attn: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        layout: VideoLayout,
        *,
        key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Plan and run block-sparse attention: q/k/v ``[B, S, H, D]`` -> ``[B, S, H, D]``."""
        plan = self.runtime_of(attn).plan(attn, self.config, query, key, layout)
        return block_sparse_attention(
            query, key, value, plan, backend=self.config.backend, key_padding_mask=key_padding_mask
        )
