"""``cached``: search the block pattern once, reuse it on the following denoising steps.

The sparse patterns of video DiTs change with the layer and the head but barely with the denoising step (AdaSpa)
and barely with the prompt (Sparse-vDiT). Two ways to use that, one config (:class:`CachedConfig`):

**online** (AdaSpa, the default). Steps before ``dense_steps`` run dense. At the first sparse step the method
computes the attention mass of every (query block, key block) pair of every head in one chunked pass
(:func:`block_attention_mass`, at search steps only): by default from 16 evenly spaced query rows per block (exact
softmax rows, about 0.09-0.11 of a dense attention on a CPU with the C++ kernel), with ``search_rows=None`` from
every row as AdaSpa does (0.6-1 dense attention), then keeps for each query
block

- the ``density`` fraction of key blocks with the most mass, with AdaSpa's head-adaptive budgets (heads that keep
  ``adaptive_recall`` of their mass with half the budget get half, as many low-recall heads get 1.5x; the mean
  density is unchanged), or
- with ``recall`` set: the fewest key blocks whose mass reaches ``recall`` (``density`` then caps each row);

and reuses that plan on the following steps. ``refresh_steps`` re-search (default: once, midway between the first
sparse step and the end; AdaSpa's search steps {10, 30} of 50). The state is kept per cache context (cond and
uncond search separately) or, with ``share_contexts``, once per layer for all contexts; it is reset per generation.

**offline** (Sparse-vDiT). ``patterns="file.safetensors"`` loads per-(layer, head) pattern types made by
``vidsparse calibrate`` (see :mod:`vidsparse.methods.cached_patterns`) and builds each layer's plan from them once
per geometry; q/k are not looked at.

Where the plans live: the searched plan is kept in the runtime's per-(model, layer, context) store (or the
per-(model, layer) shared store), not as a buffer on the attention module. Planning runs inside
:meth:`vidsparse.hooks.SparseRuntime.plan`, a ``torch.compiler.disable`` function, so a compiled region only ever
sees the plan's tensors as inputs of the executor; reusing the very same :class:`~vidsparse.plan.BlockPlan` object
keeps their shapes (and FlexAttention's cached ``BlockMask``) fixed from step to step, which is what keeps a
compiled model from recompiling. A module buffer would add nothing but a second owner whose lifetime the runtime
would have to reset per generation anyway.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from vidsparse.config import (
    SparseConfig,
    check_choice,
    check_fraction,
    check_int,
    check_step_count,
    resolve_step_count,
)
from vidsparse.layout import VideoLayout
from vidsparse.plan import BlockPlan, finalize_plan, num_blocks

from . import MethodSpec, ModelInfo, PlanContext, build_plan

if TYPE_CHECKING:
    from .cached_patterns import PatternRecorder

#: Storage formats of a searched pattern between steps (see :class:`CachedConfig`).
STORAGE_FORMATS: tuple[str, ...] = ("indices", "bits")
#: Float32 score elements one chunk of the block-mass search may hold (16 MiB: measured fastest of 1-64 MiB on the
#: CPU at 14k tokens, the chunk stays in the last-level cache between the exp and the block sums).
SEARCH_CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class CachedConfig(SparseConfig):
    """Config of the ``cached`` method.

    Args:
        density: Fraction of key blocks kept per query block (mean over heads when ``head_adaptive``); with
            ``recall`` set, an upper bound per row (``None``: no bound). Default 0.2 (AdaSpa's sparsity 0.8).
        dense_steps: Dense warm-up; default 0.2 of the run (AdaSpa: 10 of 50 steps).
        recall: Keep per query block the fewest key blocks holding this fraction of its attention mass
            (``None``: keep a fixed ``density``).
        head_adaptive: AdaSpa's head-adaptive budgets at fixed ``density`` (no effect with ``recall``, which adapts
            per row by itself).
        adaptive_recall: A head whose rows keep this fraction of their mass with half the budget gets half.
        refresh_steps: Steps (ints, or floats = fractions of the run) at which the pattern is searched again.
            ``None`` (default): one refresh midway between the first sparse step and the end when each pattern then
            serves at least two steps (needs the run's step count, which pipelines report); ``()`` or ``"never"``:
            never refresh.
        share_contexts: One pattern per layer for all cache contexts (the first context to reach a search step
            searches, cond under split CFG; the others reuse it) instead of one per context.
        tile: Token order of the blocks: ``None`` = raster (AdaSpa), or a (t, h, w) tile so each block is a compact
            cuboid (:meth:`VideoLayout.tile_order`).
        storage: How a pattern is kept between steps: ``"indices"`` = the executable plan (int32 ``kv_idx`` cut to
            the longest row; nothing to do on reuse) or ``"bits"`` = a bit-packed block mask (8x to 30x smaller,
            rebuilt into a plan on every reuse).
        search_rows: Query rows per block the online search scores (evenly spaced; each row's softmax over all keys
            is exact, a block's mass is the mean of its rows). ``None``: every row, AdaSpa's exact search, which
            costs 0.6-1 dense attention per search on a CPU; the default 16 (of 128-token blocks) costs about
            0.09-0.11 of one and keeps the same blocks up to near-ties (measured in the README).
        patterns: Offline mode: a pattern file written by ``vidsparse calibrate``. ``density``, ``recall``,
            ``head_adaptive``, ``refresh_steps``, ``tile`` and ``storage`` do not apply then.
        calibration: Used by ``vidsparse calibrate``: an active
            :class:`~vidsparse.methods.cached_patterns.PatternRecorder` (the object). Every call then runs dense and
            its exact block masses are recorded into it.
    """

    method: ClassVar[str] = "cached"

    density: float | None = 0.2
    dense_steps: int | float = 0.2
    recall: float | None = None
    head_adaptive: bool = True
    adaptive_recall: float = 0.9
    refresh_steps: tuple[int | float, ...] | None = None
    share_contexts: bool = False
    tile: tuple[int, int, int] | None = None
    storage: str = "indices"
    search_rows: int | None = 16
    patterns: str | None = None
    calibration: PatternRecorder | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fraction("recall", self.recall, allow_none=True)
        check_fraction("adaptive_recall", self.adaptive_recall)
        for name in ("head_adaptive", "share_contexts"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: expected True or False.")
        object.__setattr__(self, "refresh_steps", _normalise_refresh(self.refresh_steps))
        if self.tile is not None:
            if not (isinstance(self.tile, tuple | list) and len(self.tile) == 3):
                raise ValueError(f"tile={self.tile!r} is invalid: expected None or three ints (t, h, w) >= 1.")
            for axis, value in zip("thw", self.tile):
                check_int(f"tile {axis}", value, minimum=1)
            object.__setattr__(self, "tile", tuple(self.tile))
        check_choice("storage", self.storage, STORAGE_FORMATS)
        if self.search_rows is not None:
            check_int("search_rows", self.search_rows, minimum=1)
        if self.calibration is not None:
            from .cached_patterns import PatternRecorder

            if not isinstance(self.calibration, PatternRecorder):
                raise ValueError(
                    f"calibration={self.calibration!r} is invalid: expected a PatternRecorder (the object, used by "
                    "`vidsparse calibrate`; it cannot be given as text)."
                )
        if isinstance(self.patterns, tuple):
            # The CLI's option syntax reads "a/b/c" as a tuple: a path given as patterns=dir/file is joined back.
            object.__setattr__(self, "patterns", "/".join("" if part is None else str(part) for part in self.patterns))
        if self.patterns is not None:
            if not isinstance(self.patterns, str | os.PathLike):
                raise ValueError(f"patterns={self.patterns!r} is invalid: expected a path to a .safetensors file.")
            object.__setattr__(self, "patterns", os.fspath(self.patterns))
            if not os.path.isfile(self.patterns):
                raise ValueError(
                    f"patterns={self.patterns!r} is invalid: no such file (make one with `vidsparse calibrate`)."
                )
            if self.calibration is not None:
                raise ValueError("patterns and calibration are exclusive: a calibration run records, it does not load.")
            if self.tile is not None:
                raise ValueError(f"tile={self.tile!r} cannot be combined with patterns: the file sets the token order.")
        elif self.calibration is None and self.density is None and self.recall is None:
            raise ValueError(
                "density=None and recall=None: the online search needs a density, a recall target, or "
                "both (recall with a density cap)."
            )

    @property
    def mode(self) -> str:
        """``"offline"`` (a pattern file), ``"calibration"`` (recording) or ``"online"`` (search and reuse)."""
        if self.patterns is not None:
            return "offline"
        return "calibration" if self.calibration is not None else "online"


def _normalise_refresh(value: Any) -> tuple[int | float, ...] | None:
    """``refresh_steps`` as ``None`` (midway) or a tuple of step counts; accepts one number and "never"/"midway"."""
    if value is None or value == "midway":
        return None
    if value == "never":
        return ()
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = (value,)
    if not isinstance(value, tuple | list):
        raise ValueError(
            f"refresh_steps={value!r} is invalid: expected None/'midway', 'never', or step counts (ints, or floats "
            "in [0, 1) = fractions of the run)."
        )
    for item in value:
        check_step_count("refresh_steps", item)
    return tuple(value)


def refresh_schedule(config: CachedConfig, num_steps: int | None) -> tuple[int, ...]:
    """The steps at which a pattern is searched again (the first search happens at the first sparse call).

    ``refresh_steps=None`` means one refresh midway between the first sparse step and the last one, when each
    pattern then serves at least two steps; it needs the run's step count and is empty without it.
    """
    if config.refresh_steps is None:
        if num_steps is None:
            return ()
        first = resolve_step_count(config.dense_steps, num_steps)
        end = num_steps - resolve_step_count(config.dense_last_steps, num_steps)
        mid = (first + end) // 2
        # A refresh is worth its search only when both patterns serve at least two steps: in a short run (4 steps:
        # search at 1, "midway" at 2) it would re-search the pattern found one step before, which barely changes.
        return (mid,) if mid - first >= 2 and end - mid >= 2 else ()
    return tuple(resolve_step_count(step, num_steps) for step in config.refresh_steps)


# ------------------------------------------------------------------------------------------------- block-mass search
def block_attention_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    block_size: int,
    *,
    scale: float | None = None,
    max_elements: int = SEARCH_CHUNK_ELEMENTS,
    rows_per_block: int | None = None,
) -> torch.Tensor:
    """Softmax attention mass of every (query block, key block) pair, in bounded memory.

    Exact by default: every query row's full softmax is computed (chunks hold whole rows, so one pass suffices and
    AdaSpa's LSE-reuse trick saves nothing here). With ``rows_per_block=r`` only ``r`` evenly spaced query rows of
    each block are scored (their softmax is still exact over all keys) and a block's mass is their mean: the cost
    falls by ``block_size / r``, the result is an estimate of the exact mass. Vectorised over the heads of a chunk;
    the scores are exponentiated in place and summed per key block, and the softmax's normaliser comes from those
    block sums: no probability tensor is made. Cost (exact): about one dense attention on a CPU.

    Args:
        q, k: ``[B, H, N, D]``, tokens in the order the blocks are cut (any float dtype; computed in float32).
        block_size: Tokens per block; the last block may be partial.
        scale: Softmax scale, default ``1/sqrt(D)``.
        max_elements: Score elements per chunk of the torch path, used where the CPU kernel is not (memory is
            about one float32 buffer of that size).
        rows_per_block: Query rows scored per block (``None``: all of them, exact).

    Returns:
        float32 ``[B, H, Nb, Nb]``, ``Nb = ceil(N / block_size)``: entry ``(i, j)`` is the mean over the (scored)
        queries of block ``i`` of their probability mass on the keys of block ``j``; every row sums to 1.
    """
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"q and k must be [B, H, N, D] of the same shape; got {tuple(q.shape)}, {tuple(k.shape)}.")
    if rows_per_block is not None:
        check_int("rows_per_block", rows_per_block, minimum=1)
    b, h, n, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    nb = num_blocks(n, block_size)
    g = b * h
    rows = scored_rows(n, block_size, rows_per_block, q.device)  # [R]
    qf = q.reshape(g, n, d)
    if rows is not None:
        qf = qf.index_select(1, rows)
    row_block = (rows if rows is not None else torch.arange(n, device=q.device)) // block_size  # [R]
    num_rows = qf.shape[1]
    mass = torch.zeros(g, nb, nb, dtype=torch.float32, device=q.device)
    from vidsparse.kernels.cpp import cpp_kernel_for  # the compute layer; imported late, the methods need none of it

    kernel = cpp_kernel_for(q.device)
    if kernel is not None:  # on CPU: one pass that keeps the scores in cache (0.085-0.11 of a dense attention)
        per_key_block = torch.zeros(g, num_rows, nb, dtype=torch.float32)
        q_rows, keys = qf.float().contiguous(), k.reshape(g, n, d).float().contiguous()
        kernel.block_mass_rows(q_rows, keys, block_size, scale, per_key_block)
        mass.index_add_(1, row_block, per_key_block)
    else:  # elsewhere: chunks of whole score rows, exponentiated in place
        kt = k.reshape(g, n, d).float().transpose(1, 2)  # [G, D, N]
        rows_per_chunk = max(1, min(num_rows, max_elements // n))  # rows of one head per chunk
        heads_per_chunk = max(1, min(g, max_elements // (n * rows_per_chunk)))
        full = n // block_size  # complete key blocks; a partial last one is summed separately
        for g0 in range(0, g, heads_per_chunk):
            g1 = min(g, g0 + heads_per_chunk)
            for r0 in range(0, num_rows, rows_per_chunk):
                r1 = min(num_rows, r0 + rows_per_chunk)
                scores = torch.matmul(qf[g0:g1, r0:r1].float() * scale, kt[g0:g1])  # [G', R', N]
                scores.sub_(scores.amax(-1, keepdim=True)).exp_()
                per_key_block = scores[..., : full * block_size].unflatten(-1, (full, block_size)).sum(-1)
                if full < nb:
                    tail = scores[..., full * block_size :].sum(-1, keepdim=True)
                    per_key_block = torch.cat([per_key_block, tail], -1)
                per_key_block /= per_key_block.sum(-1, keepdim=True)  # the softmax's normaliser, 64x fewer values
                mass[g0:g1].index_add_(1, row_block[r0:r1], per_key_block)
    counts = torch.bincount(row_block, minlength=nb).clamp(min=1).float()
    return (mass / counts[:, None]).view(b, h, nb, nb)


def scored_rows(n: int, block_size: int, rows_per_block: int | None, device: torch.device) -> torch.Tensor | None:
    """Indices of the query rows a sampled search scores: ``rows_per_block`` evenly spaced rows per block.

    Returns ``None`` (score every row) when ``rows_per_block`` is ``None`` or not below ``block_size``. A partial last
    block gets the rows of the same spacing that fall inside it, at least its first one.
    """
    if rows_per_block is None or rows_per_block >= block_size:
        return None
    offsets = (torch.arange(rows_per_block, device=device) * block_size) // rows_per_block
    offsets += block_size // (2 * rows_per_block)  # centred in each stride
    starts = torch.arange(num_blocks(n, block_size), device=device) * block_size
    rows = (starts[:, None] + offsets).flatten()
    last_start = int(starts[-1])
    rows = rows[rows < n]
    if not bool((rows >= last_start).any()):
        rows = torch.cat([rows, torch.tensor([last_start], device=device)])
    return rows


def kept_recall(mask: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """Fraction of the attention mass inside the kept blocks, per head: float32 ``[B, H]``.

    Args:
        mask: bool ``[B|1, H, Nb, Nb]`` over video blocks.
        mass: float32 ``[B, H, Nb, Nb]`` from :func:`block_attention_mass` (rows sum to 1).
    """
    return (mass * mask).sum(-1).mean(-1)


def select_blocks(
    mass: torch.Tensor,
    *,
    density: float | None,
    recall: float | None = None,
    head_adaptive: bool = False,
    adaptive_recall: float = 0.9,
) -> torch.Tensor:
    """Choose the key blocks of every query block from block masses (exact, or estimated from sampled rows).

    Each query block's own block is always ranked first (every plan keeps it), so it counts in the budget.

    Args:
        mass: float32 ``[B, H, Nb, Nb]`` (rows sum to 1).
        density: Fraction of key blocks per row (with ``recall``: a cap, or ``None``).
        recall: Keep the fewest blocks whose mass reaches this fraction of the row (``None``: fixed density).
        head_adaptive: AdaSpa's head-adaptive budgets (fixed density only): see :func:`head_budgets`.
        adaptive_recall: Threshold of the head-adaptive rule.

    Returns:
        bool ``[B, H, Nb, Nb]``.
    """
    nb = mass.shape[-1]
    own = torch.eye(nb, dtype=torch.bool, device=mass.device)
    order = (mass + 2.0 * own).argsort(dim=-1, descending=True)  # masses are <= 1: own block first
    ranked = mass.gather(-1, order)
    cumulative = ranked.cumsum(-1)
    rank = torch.arange(nb, device=mass.device)
    if recall is not None:
        keep = (cumulative - ranked) < recall  # the mass ranked ahead of this block is still short of the target
        if density is not None:
            keep &= rank < _budget(density, nb)
    else:
        if density is None:
            raise ValueError("select_blocks needs density or recall.")
        budgets = head_budgets(cumulative, density, head_adaptive=head_adaptive, adaptive_recall=adaptive_recall)
        keep = rank.expand_as(ranked) < budgets[..., None, None]
    return torch.zeros_like(keep).scatter_(-1, order, keep)


def _budget(fraction: float, nb: int) -> int:
    """Blocks per row for a kept ``fraction`` of ``nb`` (at least 1, at most ``nb``)."""
    return min(nb, max(1, round(fraction * nb)))


def adaptive_budgets(density: float, nb: int) -> tuple[int, int]:
    """Blocks per row of AdaSpa's "up" (half budget) and "down" (1.5x) heads, rounded as upstream rounds them.

    Upstream works in sparsity ``s = 1 - density``: ``s_up = (1 + s) / 2``, ``s_down = (3s - 1) / 2`` and a row keeps
    ``round((1 - s_x) * M)`` of its ``M`` blocks. The same products in density terms (``density / 2 * M``,
    ``1.5 * density * M``) can land on the other side of a tie in floating point: at density 0.1 and 30 blocks,
    ``1.5 * 0.1 * 30`` is 4.500000000000001 and rounds to 5, where upstream's ``(1 - (3 * 0.9 - 1) / 2) * 30`` is
    4.499999999999997 and rounds to 4; the half-budget heads get 2 (1.5000000000000013): 2 and 4 around the base
    3, so the mean stays 3 blocks (with 5 it would be 3.5).

    Returns:
        ``(up, down)`` blocks per row, each in ``[1, nb]``.
    """
    sparsity = 1.0 - density
    up = (1.0 + sparsity) / 2.0
    down = (3.0 * sparsity - 1.0) / 2.0
    return tuple(min(nb, max(1, round((1.0 - s) * nb))) for s in (up, down))


def head_budgets(
    cumulative: torch.Tensor, density: float, *, head_adaptive: bool, adaptive_recall: float = 0.9
) -> torch.Tensor:
    """Blocks per row of each head: ``density`` everywhere, or AdaSpa's head-adaptive split.

    Head-adaptive (AdaSpa §4, as in its FlagScale port): heads whose rows keep ``adaptive_recall`` of their mass
    with half the budget form the "up" group (at most half the heads) and get half the budget; as many heads with the
    lowest recall at the base budget get 1.5x; the mean density stays the same up to rounding and the cap at 1
    (rounded as upstream, :func:`adaptive_budgets`: at density 0.1 and 30 blocks a row, 2 / 3 / 4 blocks).

    Args:
        cumulative: float32 ``[B, H, Nb, Nb]``: per row, the cumulative mass of the blocks in ranked order.
        density: Base fraction of key blocks per row.

    Returns:
        int64 ``[B, H]``.
    """
    b, h, _, nb = cumulative.shape
    base = _budget(density, nb)
    budgets = torch.full((b, h), base, dtype=torch.long, device=cumulative.device)
    if not head_adaptive or h < 2:
        return budgets
    low, high = adaptive_budgets(density, nb)
    recall_low = cumulative[..., low - 1].mean(-1)  # [B, H]
    recall_base = cumulative[..., base - 1].mean(-1)
    n_up = (recall_low >= adaptive_recall).sum(-1).clamp(max=h // 2)  # [B]
    up = _ranks(-recall_low) < n_up[:, None]
    down = (_ranks(recall_base.masked_fill(up, float("inf"))) < n_up[:, None]) & ~up
    budgets[up] = low
    budgets[down] = high
    return budgets


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Rank of every entry along the last dim (0 = smallest), ties broken by position."""
    return x.argsort(dim=-1, stable=True).argsort(dim=-1)


# ------------------------------------------------------------------------------------------- plans and storage
def video_qk(
    q: torch.Tensor, k: torch.Tensor, layout: VideoLayout, order: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The video part of ``q``/``k`` ``[B, S, H, D]`` in block order, as ``[B, H, N, D]`` each."""
    start, n = layout.video_start, layout.num_video_tokens
    qv, kv = q[:, start : start + n], k[:, start : start + n]
    if order is not None:
        qv, kv = qv.index_select(1, order), kv.index_select(1, order)
    return qv.transpose(1, 2), kv.transpose(1, 2)


def video_order(layout: VideoLayout, tile: tuple[int, int, int] | None, device: torch.device) -> torch.Tensor | None:
    """The token order of the blocks: ``None`` for raster, else the tile permutation on ``device``."""
    return None if tile is None else layout.tile_order(tile).to(device)


def compact_plan(plan: BlockPlan) -> BlockPlan:
    """The same plan with ``kv_idx`` cut to its longest row (what a cached plan keeps in memory)."""
    kmax = int(plan.kv_num.max())
    if kmax >= plan.kv_idx.shape[-1]:
        return plan
    return BlockPlan(
        plan.kv_num,
        plan.kv_idx[..., :kmax].contiguous(),
        plan.block_size,
        plan.seq_len,
        plan.perm,
        plan.video_range,
        plan.meta,
    )


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack bool ``[..., N]`` into uint8 ``[..., ceil(N / 8)]``: bit ``j % 8`` of byte ``j // 8`` is entry ``j``."""
    n = mask.shape[-1]
    padded = torch.nn.functional.pad(mask.to(torch.uint8), (0, -n % 8))
    weights = (1 << torch.arange(8, device=mask.device, dtype=torch.uint8)).to(torch.uint8)
    return (padded.unflatten(-1, (-1, 8)) * weights).sum(-1, dtype=torch.uint8)


def unpack_bits(bits: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: uint8 ``[..., ceil(n / 8)]`` -> bool ``[..., n]``."""
    weights = (1 << torch.arange(8, device=bits.device, dtype=torch.uint8)).to(torch.uint8)
    return ((bits[..., None] & weights) != 0).flatten(-2)[..., :n]


@dataclass
class CachedPattern:
    """A searched pattern as kept in a store between steps.

    Attributes:
        layout: Geometry it was searched for.
        batch: Batch dimension of the plan (1 when shared by all samples and contexts).
        step: Step it was searched at.
        block_size: Tokens per block.
        plan: The executable plan (``storage="indices"``), else ``None``.
        bits: uint8 ``[B, H, Vb, ceil(Vb / 8)]`` packed video block mask (``storage="bits"``), else ``None``.
        order: int64 ``[N]`` token order of the blocks (tile order) or ``None`` (raster).
        meta: Plan metadata (search step, recall at the search).
    """

    layout: VideoLayout
    batch: int
    step: int
    block_size: int
    plan: BlockPlan | None = None
    bits: torch.Tensor | None = None
    order: torch.Tensor | None = None
    meta: dict[str, Any] | None = None

    @classmethod
    def from_mask(
        cls,
        mask: torch.Tensor,
        layout: VideoLayout,
        block_size: int,
        *,
        step: int,
        storage: str,
        order: torch.Tensor | None,
        meta: dict[str, Any],
    ) -> CachedPattern:
        """Keep ``mask`` (bool ``[B, H, Vb, Vb]``) in ``storage`` format."""
        if storage == "bits":
            return cls(layout, mask.shape[0], step, block_size, bits=pack_bits(mask), order=order, meta=meta)
        plan = compact_plan(finalize_plan(mask, layout, block_size, video_order=order, meta=meta))
        return cls(layout, mask.shape[0], step, block_size, plan=plan, order=order, meta=meta)

    def to_plan(self, device: torch.device) -> BlockPlan:
        """The plan on ``device`` (the kept object itself for ``"indices"``; rebuilt from the bits otherwise)."""
        if self.plan is None:
            vb = num_blocks(self.layout.num_video_tokens, self.block_size)
            mask = unpack_bits(self.bits, vb)
            plan = finalize_plan(mask, self.layout, self.block_size, video_order=self.order, meta=dict(self.meta))
            return compact_plan(plan).to(device)
        if self.plan.device != torch.device(device):
            self.plan = self.plan.to(device)  # moved once, then reused
        return self.plan

    def nbytes(self) -> int:
        """Bytes of the tensors this pattern keeps (indices or bits, plus the tile permutation if any)."""
        tensors = [self.bits, self.order]
        if self.plan is not None:
            tensors += [self.plan.kv_num, self.plan.kv_idx, self.plan.perm]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def search_reason(
    pattern: CachedPattern | None, layout: VideoLayout, batch: int, step: int, refresh: tuple[int, ...]
) -> str | None:
    """Why the pattern must be searched now (``"first"``, ``"shape"``, ``"refresh"``), or ``None`` to reuse it."""
    if pattern is None:
        return "first"
    if pattern.layout != layout or pattern.batch != batch:
        return "shape"
    if any(pattern.step < r <= step for r in refresh):
        return "refresh"
    return None


def _online_plan(q: torch.Tensor, k: torch.Tensor, layout: VideoLayout, config: CachedConfig, ctx: PlanContext):
    store = ctx.shared if config.share_contexts else ctx.store
    batch = 1 if config.share_contexts else q.shape[0]
    pattern = store.get("pattern")
    reason = search_reason(pattern, layout, batch, ctx.step, refresh_schedule(config, ctx.num_steps))
    if reason is not None:
        order = video_order(layout, config.tile, q.device)
        mass = block_attention_mass(
            *video_qk(q, k, layout, order), config.block_size, rows_per_block=config.search_rows
        )
        if config.share_contexts:
            mass = mass.mean(0, keepdim=True)  # one pattern for every sample and context
        mask = select_blocks(
            mass,
            density=config.density,
            recall=config.recall,
            head_adaptive=config.head_adaptive,
            adaptive_recall=config.adaptive_recall,
        )
        meta = {
            "method": "cached",
            "mode": "online",
            "searched_at": ctx.step,
            "search_context": ctx.context,
            "search_recall": float(kept_recall(mask, mass).mean()),
        }
        pattern = CachedPattern.from_mask(
            mask, layout, config.block_size, step=ctx.step, storage=config.storage, order=order, meta=meta
        )
        store["pattern"] = pattern
        store["searches"] = store.get("searches", 0) + 1
        store.setdefault("search_log", []).append((ctx.step, ctx.context, reason))
    return pattern.to_plan(q.device)


def _offline_plan(q: torch.Tensor | None, layout: VideoLayout, config: CachedConfig, ctx: PlanContext) -> BlockPlan:
    from .cached_patterns import load_patterns

    device = q.device if q is not None else torch.device("cpu")
    key = ("offline_plan", layout, str(device))
    plan = ctx.shared.get(key)  # one plan per (model, layer, geometry) serves every context
    if plan is None:
        patterns = load_patterns(config.patterns)
        # The file holds every head of the layer: under context parallelism q has only this rank's heads, so the
        # check uses the layer's head count and the runtime cuts the plan to this rank's heads.
        heads = ctx.num_heads if ctx.num_heads is not None else (q.shape[2] if q is not None else None)
        patterns.check_call(model=ctx.model, layer=ctx.layer, heads=heads, layout=layout, block_size=config.block_size)
        mask = patterns.video_mask(ctx.model, ctx.layer, layout, device=device)
        order = video_order(layout, patterns.tile, device)
        meta = {"method": "cached", "mode": "offline", "patterns": config.patterns}
        plan = compact_plan(finalize_plan(mask, layout, patterns.block_size, video_order=order, meta=meta))
        ctx.shared[key] = plan
        ctx.shared["builds"] = ctx.shared.get("builds", 0) + 1
    return plan


def _calibration_plan(q: torch.Tensor, k: torch.Tensor, layout: VideoLayout, config: CachedConfig, ctx: PlanContext):
    from .cached_patterns import active_recorder
    from .dense import DenseConfig

    recorder = active_recorder(config.calibration)
    order = video_order(layout, config.tile, q.device)
    mass = block_attention_mass(*video_qk(q, k, layout, order), config.block_size)
    recorder.record(ctx.model, ctx.layer, mass, layout, block_size=config.block_size, tile=config.tile)
    return build_plan(DenseConfig(block_size=config.block_size), None, None, layout, device=q.device)


def plan(
    q: torch.Tensor | None, k: torch.Tensor | None, layout: VideoLayout, config: CachedConfig, ctx: PlanContext
) -> BlockPlan:
    """Plan one call: reuse the stored pattern, search it (online), build it from the file (offline), or record.

    Args:
        q, k: ``[B, S, H, D]`` in original token order (offline mode only reads their shape).
        layout: Geometry of the sequence.
        config: The method config.
        ctx: Layer, step, context and the stores the pattern is kept in.
    """
    if config.mode == "offline":
        return _offline_plan(q, layout, config, ctx)
    if q is None or k is None:
        raise ValueError("method 'cached' searches its pattern from q and k: pass them (or a patterns file).")
    if config.mode == "calibration":
        return _calibration_plan(q, k, layout, config, ctx)
    return _online_plan(q, k, layout, config, ctx)


def check_model(config: CachedConfig, models: list[ModelInfo]) -> None:
    """At :func:`vidsparse.apply`: the pattern file must fit these transformers and this config.

    Class, config fingerprint, layer count, and block size: refused here, not at the first sparse step.
    """
    if config.mode == "offline":
        from .cached_patterns import load_patterns

        load_patterns(config.patterns).check_model(models, block_size=config.block_size)


METHOD = MethodSpec(
    "cached",
    CachedConfig,
    plan,
    static=False,
    summary="search the block pattern by attention mass once and reuse it across steps (AdaSpa), or load calibrated "
    "per-head pattern types (Sparse-vDiT)",
    targets_density=True,
    check_model=check_model,
)
