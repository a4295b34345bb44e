"""``moba``: mixture-of-block attention for video (VMoBA, arXiv 2506.23858), in vidsparse's block format.

What VMoBA does (research notes ``moba_cached.md`` §2):

1. **Layer-wise recurrent partition** of the latent grid ``T'×H'×W'`` into *chunks*: layer ``l mod 3 = 0`` cuts
   whole frames (1-D, ``frames_1d`` frames per chunk), ``1`` cuts spatial patches that span every frame (2-D,
   ``patch_2d = (h, w)``), ``2`` cuts cuboids (3-D, ``cuboid_3d = (t, h, w)``). Tokens are reordered so each chunk
   is contiguous; grids the chunk shape does not divide get smaller (ragged) chunks at the far edges.
2. Each chunk is represented by the **mean of its keys** (fp32); a query scores a chunk by ``q · mean_k`` (raw dot
   product, as the code does).
3. **Selection**: ``topk`` (each query keeps the ``k`` best chunks, MoBA's rule, the paper's training-free setting),
   ``head_global`` (the paper's "global block selection": the same budget ``k × #queries`` per head, handed out over
   all (query, chunk) pairs of the head), or ``threshold`` (keep the smallest set of chunks, own chunk counted
   first, whose cumulative normalised score reaches ``tau``). The query's own chunk is always attended.

How chunks map onto a :class:`~vidsparse.plan.BlockPlan` (whose blocks are ``block_size`` = 64/128 tokens while
chunks hold hundreds to thousands of tokens):

- The plan's video order *is* the chunk order (:meth:`VideoLayout.tile_order` with the chunk shape as the tile), so
  every chunk is a contiguous run of plan positions.
- **Query granularity = plan blocks.** A plan row can only hold one selection per query block, so the finest
  routing it can express is per block of ``block_size`` tokens; per chunk would force e.g. all 4 680 queries of a
  1-D chunk to share one choice. Each query block is scored with its **mean query**: by linearity
  ``mean_i(q_i) · k̄ = mean_i(q_i · k̄)``, i.e. exactly the average of the paper's per-token gates over the block.
  (Per-token routing then a union per block would be a superset, denser than the target.)
- **Block-aligned chunks** (``align_chunks=True``, the default): a chunk of ``T×h×w`` tokens is rarely a multiple
  of the block size, so a plain tile order leaves blocks that hold the end of one chunk and the start of the next;
  keeping such a block for either chunk computes a superset (measured up to +85 % over the chunk selection, issue
  28). Instead every plan block joins the chunk that holds most of its tokens (ties: the earlier chunk), so each
  chunk is a run of whole blocks in plan order and a selected chunk costs exactly its blocks: the plan computes
  what is selected, no more. The price: up to half a block of tokens at each chunk boundary belongs to the
  neighbouring chunk (a chunk smaller than half a block merges into a neighbour), i.e. chunks are the paper's tiles
  up to a block-sized seam. ``align_chunks=False`` keeps exact tiles and the superset expansion below.
- **Own chunk(s)**: the chunk of the query block (aligned), or every chunk it overlaps (exact tiles).
- **Expansion**: a selected (query block, chunk) pair keeps every plan key block that holds a token of the chunk.
  With exact tiles a shared boundary block is kept when *either* chunk is selected, a superset;
  :meth:`ChunkSelection.token_density` gives the selection's own token-pair density, to measure that overhead.

Threshold normalisation. ``normalize="minmax"`` is what the official code does (scores min-max scaled to [0, 1]
over the pool, despite comments calling it "LSE-style"; the pool minimum gets weight 0). The paper's τ = 0.25 was
tuned for it. ``normalize="softmax"`` is the alternative reading of the paper's "normalised similarity":
``softmax(q·k̄/√d + log|chunk|)`` over the chunks of a query block, a first-order estimate of the attention mass
each chunk receives (Jensen: ``Σ_j exp(q·k_j) ≥ |c| exp(q·k̄)``), so ``tau`` becomes "estimated attention mass
covered" (sensible values ~0.5–0.95, not 0.25). Ours is ``minmax`` without the code's quirk (the default): on the
synthetic suite ``softmax`` was no better at equal density (the mean of a large chunk's keys is a weak
representative, so its softmax is flat), see ``vidsparse study moba-sweep``. Pool ``"query"`` (per query
block, the official FastVideo configs) or ``"head"`` (all (query, chunk) pairs of a head, the paper's
Global+Threshold). ``faithful=True`` keeps the code's quirk: at least one chunk besides the own chunk is always
kept, even when the own chunk alone already reaches ``tau`` (with 3 one-D chunks that alone doubles the density).

Defaults are the paper's (Wan 2.1 480p training-free shapes, appendix Table 4; τ = 0.25; the first 25 % of steps
dense). Paper and official code differ: the paper's training-free results use per-query top-k ("Local+TopK"), its
training runs Global+Threshold; the public configs use threshold with the per-query pool; FastVideo never applies
its ``first_full_step`` warm-up and offsets the 1-D/2-D/3-D cycle by its first dense layer (we follow the paper:
``layer mod 3``, warm-up through ``dense_steps``). Differences that the block format forces: routing per query
block (not per query token), superset expansion at shared blocks, ragged edge chunks (the code asserts
divisibility), and text tokens (which VMoBA never sees; here they are dense rows and columns).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import ClassVar

import torch

from vidsparse.config import SparseConfig, check_choice, check_fraction, check_int
from vidsparse.layout import VideoLayout
from vidsparse.plan import BlockPlan, finalize_plan, num_blocks

from . import MethodSpec, PlanContext

#: Partition choices: ``cycle`` follows the layer (paper Eq. 1), the others force one type for every layer.
PARTITIONS: tuple[str, ...] = ("cycle", "1d", "2d", "3d")
#: Selection rules.
SELECTIONS: tuple[str, ...] = ("topk", "head_global", "threshold")
#: Score normalisations of the threshold rule.
NORMALIZATIONS: tuple[str, ...] = ("minmax", "softmax")
#: Pools over which the threshold rule normalises and accumulates.
THRESHOLD_POOLS: tuple[str, ...] = ("query", "head")
#: The 1-D / 2-D / 3-D cycle of paper Eq. 1, indexed by ``layer % 3``.
_CYCLE: tuple[str, ...] = ("1d", "2d", "3d")
#: Floor of a normaliser (the official code uses the same value against division by zero).
_EPS = 1e-6


def _check_shape(name: str, value: object, length: int) -> None:
    """Raise ``ValueError`` unless ``value`` is a tuple of ``length`` positive ints."""
    ok = isinstance(value, tuple) and len(value) == length
    ok = ok and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)
    if not ok:
        example = "/".join(["4"] * length)
        raise ValueError(
            f"{name}={value!r} is invalid: expected a tuple of {length} integers >= 1 (CLI: {name}={example})."
        )


@dataclass(frozen=True)
class MoBAConfig(SparseConfig):
    """Config of the ``moba`` method (VMoBA).

    Args:
        selection: ``"topk"`` (per query block, the ``density`` fraction of chunks), ``"head_global"`` (the same
            budget per head, spread over all query blocks of the head) or ``"threshold"`` (``tau``).
        density: For ``topk``/``head_global``: kept chunks per query block, ``k = round(density × #chunks)``
            (halves up; at least 1, the own chunk). Must be ``None`` for ``threshold``, whose density follows from
            ``tau``.
        tau: Threshold of the cumulative normalised score, in (0, 1] (paper default 0.25, tuned for ``minmax``).
        threshold_pool: ``"query"`` (each query block on its own, the official configs) or ``"head"`` (all
            (query block, chunk) pairs of a head: the paper's Global+Threshold).
        normalize: ``"minmax"`` (the official code) or ``"softmax"`` (estimated attention mass, ours).
        partition: ``"cycle"`` (layer mod 3 → 1-D, 2-D, 3-D) or one of ``"1d"``, ``"2d"``, ``"3d"`` for every layer.
        frames_1d: Whole latent frames per 1-D chunk.
        patch_2d: (h, w) tokens of a 2-D chunk; it spans every frame.
        cuboid_3d: (t, h, w) tokens of a 3-D chunk.
        faithful: Reproduce the official threshold rule exactly: ``minmax`` and at least one chunk besides the own
            chunk kept. Needs ``normalize="minmax"``.
        align_chunks: Snap chunks to whole plan blocks (each block joins its majority chunk), so the plan computes
            exactly the selected chunks; ``False``: exact tiles, shared boundary blocks kept for either chunk.
        dense_steps: The paper runs the first 25 % of denoising steps dense.
    """

    method: ClassVar[str] = "moba"

    dense_steps: int | float = 0.25
    selection: str = "threshold"
    tau: float = 0.25
    threshold_pool: str = "query"
    normalize: str = "minmax"
    partition: str = "cycle"
    frames_1d: int = 3
    patch_2d: tuple[int, int] = (5, 13)
    cuboid_3d: tuple[int, int, int] = (7, 5, 13)
    faithful: bool = False
    align_chunks: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("selection", self.selection, SELECTIONS)
        check_choice("align_chunks", self.align_chunks, (False, True))
        check_fraction("tau", self.tau)
        check_choice("threshold_pool", self.threshold_pool, THRESHOLD_POOLS)
        check_choice("normalize", self.normalize, NORMALIZATIONS)
        check_choice("partition", self.partition, PARTITIONS)
        check_int("frames_1d", self.frames_1d, minimum=1)
        _check_shape("patch_2d", self.patch_2d, 2)
        _check_shape("cuboid_3d", self.cuboid_3d, 3)
        check_choice("faithful", self.faithful, (False, True))
        if self.selection == "threshold" and self.density is not None:
            raise ValueError(
                f"density={self.density!r} is invalid with selection='threshold': its density follows from tau; "
                "use selection='topk' or 'head_global' to target a density."
            )
        if self.selection != "threshold" and self.density is None:
            raise ValueError(
                f"density=None is invalid with selection={self.selection!r}: expected a number in (0, 1] "
                "(the fraction of chunks each query block keeps)."
            )
        if self.faithful and self.normalize != "minmax":
            raise ValueError(
                f"normalize={self.normalize!r} is invalid with faithful=True: the official code normalises with "
                "'minmax'."
            )


# ------------------------------------------------------------------------------------------------- partition
def partition_kind(config: MoBAConfig, layer: int) -> str:
    """The partition type ("1d", "2d" or "3d") used at transformer block ``layer``."""
    if config.partition != "cycle":
        return config.partition
    return _CYCLE[layer % 3]


def chunk_shape(layout: VideoLayout, config: MoBAConfig, kind: str) -> tuple[int, int, int]:
    """The chunk as a (t, h, w) tile of the latent grid: 1-D = whole frames, 2-D = a patch over every frame."""
    if kind == "1d":
        return (config.frames_1d, layout.height, layout.width)
    if kind == "2d":
        return (layout.frames, *config.patch_2d)
    check_choice("kind", kind, _CYCLE)
    return config.cuboid_3d


@dataclass(frozen=True)
class ChunkPartition:
    """A chunk partition of the video tokens and how it lies over the plan's blocks (geometry only, cached).

    Attributes:
        tile: The chunk shape (t, h, w) on the latent grid.
        video_order: int64 ``[N]``: plan position ``p`` holds raster video token ``video_order[p]``; ``None`` when
            it is raster order (1-D chunks).
        chunk_of_token: int64 ``[N]``: chunk of each raster video token (chunks numbered in plan order).
        block_of_token: int64 ``[N]``: plan block of each raster video token.
        chunk_sizes: float32 ``[C]``: tokens per chunk (ragged edge chunks are smaller).
        block_sizes: float32 ``[Vb]``: tokens per video block (the last may be partial).
        overlap: bool ``[Vb, C]``: plan block ``j`` holds at least one token of chunk ``c``.
    """

    tile: tuple[int, int, int]
    video_order: torch.Tensor | None
    chunk_of_token: torch.Tensor
    block_of_token: torch.Tensor
    chunk_sizes: torch.Tensor
    block_sizes: torch.Tensor
    overlap: torch.Tensor

    @property
    def num_chunks(self) -> int:
        """C: chunks in the partition."""
        return self.chunk_sizes.numel()

    @property
    def num_blocks(self) -> int:
        """Vb: video blocks of the plan."""
        return self.block_sizes.numel()


def chunk_partition(
    layout: VideoLayout,
    tile: tuple[int, int, int],
    block_size: int,
    device: torch.device | str = "cpu",
    *,
    align: bool = False,
) -> ChunkPartition:
    """The :class:`ChunkPartition` of ``layout`` into ``tile`` chunks (cached per geometry and device).

    Args:
        align: Snap the chunks to whole plan blocks: each block joins the chunk holding most of its tokens.
    """
    video_only = VideoLayout(*layout.grid)  # text does not change the partition: share the cache entry
    tile = tuple(min(a, b) for a, b in zip(tile, layout.grid))
    return _chunk_partition(video_only, tile, block_size, str(device), align)


@lru_cache(maxsize=64)
def _chunk_partition(
    layout: VideoLayout, tile: tuple[int, int, int], block_size: int, device: str, align: bool
) -> ChunkPartition:
    """Cached worker of :func:`chunk_partition` (vectorised; runs once per geometry)."""
    frames, height, width = layout.grid
    tt, th, tw = tile
    n = layout.num_video_tokens
    coords = layout.token_coords()
    n_th, n_tw = -(-height // th), -(-width // tw)
    # The same tile numbering as VideoLayout.tile_order, so chunk ids increase along the plan order.
    chunk_of_token = ((coords[:, 0] // tt) * n_th + coords[:, 1] // th) * n_tw + coords[:, 2] // tw
    order = layout.tile_order(tile)
    position = torch.empty(n, dtype=torch.int64)
    position[order] = torch.arange(n)
    block_of_token = position // block_size
    num_chunk = int(chunk_of_token.max()) + 1
    vb = num_blocks(n, block_size)
    if align:
        # Majority chunk of each block (argmax takes the first maximum: the earlier chunk on a tie). Chunks are
        # contiguous in plan order, so the majority chunk never decreases along the blocks; chunks that win no
        # block are dropped and the rest renumbered in order.
        counts = torch.bincount(block_of_token * num_chunk + chunk_of_token, minlength=vb * num_chunk)
        block_chunk = counts.view(vb, num_chunk).argmax(-1)
        block_chunk = torch.unique(block_chunk, return_inverse=True)[1]
        chunk_of_token = block_chunk[block_of_token]
        num_chunk = int(block_chunk.max()) + 1
    chunk_sizes = torch.bincount(chunk_of_token, minlength=num_chunk).float()
    block_sizes = torch.bincount(block_of_token, minlength=vb).float()
    overlap = torch.zeros(vb, num_chunk, dtype=torch.bool)
    overlap[block_of_token, chunk_of_token] = True
    identity = bool(torch.equal(order, torch.arange(n)))
    dev = torch.device(device)
    return ChunkPartition(
        tile=tile,
        video_order=None if identity else order.to(dev),
        chunk_of_token=chunk_of_token.to(dev),
        block_of_token=block_of_token.to(dev),
        chunk_sizes=chunk_sizes.to(dev),
        block_sizes=block_sizes.to(dev),
        overlap=overlap.to(dev),
    )


# ---------------------------------------------------------------------------------------------------- scores
def _segment_mean(x: torch.Tensor, segment: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Mean of ``x [B, N, H, D]`` over tokens grouped by ``segment [N]`` (ids < len(sizes)): fp32 ``[B, G, H, D]``."""
    b, _, h, d = x.shape
    out = torch.zeros(b, sizes.numel(), h, d, dtype=torch.float32, device=x.device)
    out.index_add_(1, segment, x.float())
    return out / sizes[None, :, None, None]


def chunk_scores(q: torch.Tensor, k: torch.Tensor, layout: VideoLayout, part: ChunkPartition) -> torch.Tensor:
    """Gate of every (query block, chunk) pair: mean query of the block · mean key of the chunk, in fp32.

    Args:
        q, k: ``[B, S, H, D]``, original token order (text, if any, is ignored).
        part: The partition (on q's device).

    Returns:
        float32 ``[B, H, Vb, C]`` (raw dot products, no 1/√d scale, as the official code).
    """
    start, end = layout.video_start, layout.video_start + layout.num_video_tokens
    q_mean = _segment_mean(q[:, start:end], part.block_of_token, part.block_sizes)  # [B, Vb, H, D]
    k_mean = _segment_mean(k[:, start:end], part.chunk_of_token, part.chunk_sizes)  # [B, C, H, D]
    return torch.einsum("bihd,bchd->bhic", q_mean, k_mean)


# ------------------------------------------------------------------------------------------------- selection
def select_topk(scores: torch.Tensor, own: torch.Tensor, k: int) -> torch.Tensor:
    """Per row, keep the own chunk(s) and the best chunks up to ``k`` in all (MoBA's rule; own counts in ``k``).

    Args:
        scores: float ``[..., C]``; own: bool ``[..., C]`` (broadcastable); k: chunks per row, >= 1.

    Returns:
        bool ``[..., C]``: ``max(k, #own)`` chunks per row.
    """
    ranked = scores.masked_fill(own, math.inf)
    top = ranked.topk(min(k, scores.shape[-1]), dim=-1).indices
    keep = torch.zeros_like(ranked, dtype=torch.bool).scatter_(-1, top, True)
    return keep | own


def select_head_global(scores: torch.Tensor, own: torch.Tensor, k: int) -> torch.Tensor:
    """Per head, keep the own chunks and the best (query block, chunk) pairs up to ``k × Qb`` pairs in all.

    The paper's "global block selection" with the top-k budget: a query block whose scores stand out gets more
    chunks, a flat one fewer. Raw scores are compared across query blocks, as the code does.

    Args:
        scores: float ``[B, H, Qb, C]``; own: bool ``[Qb, C]`` or ``[B, H, Qb, C]``; k: chunks per query block.

    Returns:
        bool ``[B, H, Qb, C]``.
    """
    b, h, qb, c = scores.shape
    own = own.expand_as(scores)
    ranked = scores.masked_fill(own, math.inf).reshape(b, h, qb * c)
    top = ranked.topk(min(k * qb, qb * c), dim=-1).indices
    keep = torch.zeros_like(ranked, dtype=torch.bool).scatter_(-1, top, True)
    return keep.view(b, h, qb, c) | own


def normalize_scores(
    scores: torch.Tensor, method: str, pool: str, *, log_sizes: torch.Tensor | None = None
) -> torch.Tensor:
    """Non-negative weights of the threshold rule.

    Args:
        scores: float32 ``[B, H, Qb, C]`` gates, already scaled by 1/√d for ``softmax``.
        method: ``"minmax"``: ``(s - min) / (max - min)`` over the pool (a flat pool, max - min <= 1e-6, keeps
            ``s - min``, i.e. all zeros, as the code). ``"softmax"``: softmax over the chunks of each query block
            of ``scores + log_sizes``; every row sums to 1 whatever the pool.
        pool: ``"query"`` (min/max per query block) or ``"head"`` (per head over all query blocks).
        log_sizes: float32 ``[C]``, log tokens per chunk (``softmax`` only).

    Returns:
        float32 ``[B, H, Qb, C]``, >= 0.
    """
    if method == "softmax":
        logits = scores if log_sizes is None else scores + log_sizes
        return torch.softmax(logits, dim=-1)
    dims = (-1,) if pool == "query" else (-2, -1)
    low = scores.amin(dim=dims, keepdim=True)
    span = scores.amax(dim=dims, keepdim=True) - low
    span = torch.where(span <= _EPS, torch.ones_like(span), span)
    return (scores - low) / span


def select_threshold(
    weights: torch.Tensor, own: torch.Tensor, tau: float, *, at_least_one_other: bool = False
) -> torch.Tensor:
    """Keep the smallest own-first prefix of each pool whose cumulative weight reaches ``tau`` of the pool's total.

    The own entries are counted first; the others follow in descending weight until
    ``own + prefix >= tau × total``. A pool whose total is 0 (flat scores) keeps everything, as nothing can rank it,
    and so does ``tau = 1``.

    Args:
        weights: float ``[..., P]``, >= 0 (P = the pool: chunks of a query block, or all pairs of a head).
        own: bool ``[..., P]``: the own entries, always kept.
        tau: Fraction in (0, 1].
        at_least_one_other: The official code's quirk: keep at least one non-own entry even when the own entries
            already reach ``tau``.

    Returns:
        bool ``[..., P]``.
    """
    own = own.expand_as(weights)
    weights = weights.float()
    total = weights.sum(-1, keepdim=True)
    target = tau * total - (weights * own).sum(-1, keepdim=True)  # weight still needed from the others
    ranked = weights.masked_fill(own, -1.0)  # own entries sort last and are never counted as "others"
    sorted_w, order = ranked.sort(dim=-1, descending=True)
    cumulative = sorted_w.clamp_min(0).cumsum(-1)
    # Others needed = (positions whose prefix still falls short) + 1, or 0 when the own entries suffice.
    short = (cumulative < target).sum(-1, keepdim=True)
    needed = torch.where(target > 0, short + 1, torch.zeros_like(short))
    if at_least_one_other:
        needed = needed.clamp_min(1)
    # tau = 1 means "all of it": keep everything, rather than let rounding in the sums (or zero-weight entries, the
    # pool minimum under min-max) decide.
    everything = (total <= 0) | (tau >= 1.0)
    needed = torch.where(everything, torch.full_like(needed, weights.shape[-1]), needed)
    rank = torch.arange(weights.shape[-1], device=weights.device)
    keep_sorted = (rank < needed) & (sorted_w >= 0)
    keep = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
    return keep | own


@dataclass(frozen=True)
class ChunkSelection:
    """The chunks each query block attends, before expansion into plan blocks.

    Attributes:
        keep: bool ``[B, H, Vb, C]``: query block ``i`` attends chunk ``c``.
        partition: The chunk partition (geometry).
        kind: ``"1d"``, ``"2d"`` or ``"3d"``.
    """

    keep: torch.Tensor
    partition: ChunkPartition
    kind: str

    def block_mask(self) -> torch.Tensor:
        """Bool ``[B, H, Vb, Vb]``: key block ``j`` is kept when it holds a token of any selected chunk."""
        overlap = self.partition.overlap.to(torch.float32)
        return (self.keep.to(torch.float32) @ overlap.T) > 0

    def token_density(self) -> torch.Tensor:
        """float32 ``[B, H]``: fraction of video (query, key) token pairs the chunk selection itself needs.

        The plan computes a superset (shared boundary blocks), so ``plan token density / this - 1`` is the overhead
        of expressing chunks with plan blocks.
        """
        part = self.partition
        n = float(part.chunk_sizes.sum())
        pairs = torch.einsum("bhic,i,c->bh", self.keep.float(), part.block_sizes, part.chunk_sizes)
        return pairs / (n * n)

    def block_token_density(self) -> torch.Tensor:
        """float32 ``[B, H]``: fraction of video token pairs inside the kept plan blocks (:meth:`block_mask`)."""
        sizes = self.partition.block_sizes
        n = float(sizes.sum())
        return torch.einsum("bhij,i,j->bh", self.block_mask().float(), sizes, sizes) / (n * n)


def select_chunks(
    q: torch.Tensor, k: torch.Tensor, layout: VideoLayout, config: MoBAConfig, ctx: PlanContext
) -> ChunkSelection:
    """Partition for ``ctx.layer``, score, and select chunks per query block (see the module docstring).

    Args:
        q, k: ``[B, S, H, D]`` (diffusers layout), original token order.

    Returns:
        The :class:`ChunkSelection` (``keep`` is ``[B, H, Vb, C]``).
    """
    kind = partition_kind(config, ctx.layer)
    tile = chunk_shape(layout, config, kind)
    part = chunk_partition(layout, tile, config.block_size, q.device, align=config.align_chunks)
    scores = chunk_scores(q, k, layout, part)
    own = part.overlap  # [Vb, C]: the chunks a query block's own tokens belong to
    num_chunk = part.num_chunks
    if config.selection != "threshold":
        k_chunks = max(1, int(config.density * num_chunk + 0.5))  # round halves up (Python's round() goes to even)
        if config.selection == "topk":
            keep = select_topk(scores, own, k_chunks)
        else:
            keep = select_head_global(scores, own, k_chunks)
        return ChunkSelection(keep, part, kind)
    if config.normalize == "softmax":
        weights = normalize_scores(
            scores / math.sqrt(q.shape[-1]), "softmax", config.threshold_pool, log_sizes=part.chunk_sizes.log()
        )
    else:
        weights = normalize_scores(scores, "minmax", config.threshold_pool)
    own = own.expand_as(weights)
    if config.threshold_pool == "head":
        b, h, qb, c = weights.shape
        keep = select_threshold(
            weights.reshape(b, h, qb * c), own.reshape(b, h, qb * c), config.tau, at_least_one_other=config.faithful
        ).view(b, h, qb, c)
    else:
        keep = select_threshold(weights, own, config.tau, at_least_one_other=config.faithful)
    return ChunkSelection(keep, part, kind)


def plan(
    q: torch.Tensor | None, k: torch.Tensor | None, layout: VideoLayout, config: MoBAConfig, ctx: PlanContext
) -> BlockPlan:
    """VMoBA plan: chunk selection per query block, expanded to the plan blocks each selected chunk covers.

    Args:
        q, k: ``[B, S, H, D]`` (diffusers layout), original token order, S = ``layout.seq_len``.
        layout: Geometry; text rows and columns are dense.
        config: The method's config.
        ctx: ``ctx.layer`` picks the partition type when ``partition="cycle"``.

    Returns:
        A plan with ``B`` and ``H`` of ``q``, in chunk order (``perm`` set for 2-D and 3-D partitions).
    """
    if q is None or k is None:
        raise ValueError("method 'moba' is dynamic: it needs q and k to plan.")
    selection = select_chunks(q, k, layout, config, ctx)
    meta = {
        "method": "moba",
        "partition": selection.kind,
        "chunk": selection.partition.tile,
        "num_chunks": selection.partition.num_chunks,
        "selection": config.selection,
    }
    return finalize_plan(
        selection.block_mask(),
        layout,
        config.block_size,
        video_order=selection.partition.video_order,
        meta=meta,
    )


METHOD = MethodSpec(
    "moba",
    MoBAConfig,
    plan,
    static=False,
    summary="VMoBA: 1-D/2-D/3-D chunks per layer, mean-key routing by top-k, head-global or threshold",
    targets_density=True,
    density_options={"selection": "topk"},  # the default threshold selection follows tau, not a density
)
