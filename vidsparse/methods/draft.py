"""``draft``: DraftAttention — a low-resolution draft attention map chooses the blocks (Shen, Han et al. 2025).

Algorithm (per call, per sample, per head):

1. **Regions.** The video tokens are reordered so that every block of ``block_size`` consecutive tokens is one
   spatially compact *region* (see "Regions and blocks" below); the permutation and its inverse are on the plan.
2. **Draft q/k.** q and k are average-pooled over each region: ``q̄, k̄ [B, H, Vb, D]``, ``Vb = ceil(N_video / bs)``.
3. **Draft map.** ``P = softmax(q̄ k̄ᵀ / √D)`` over regions, ``[B, H, Vb, Vb]`` (float32). Ours adds a capped
   key-variance term to the scores (``key_variance``, :func:`draft_map`): pooling alone underrates a region whose
   keys disagree, e.g. one that holds a few very strong keys.
4. **Selection.** Keep the ``density`` fraction of region pairs with the largest ``P``:

   - *faithful* (``faithful=True``, the paper and official code): one global cut per head over all ``Vb²`` entries
     (top ``round(density · Vb²)``, ties broken by ``topk`` where upstream keeps every tie of the threshold);
     nothing else is forced, except the own block that every vidsparse plan keeps (``finalize_plan``), so faithful
     plans can end up slightly above the target density.
   - *ours* (default): the same budget ``round(density · Vb²)``, but first every region keeps its own region, its
     ``ceil(min_row_share · density · Vb)`` best key regions (a per-row minimum: under one global cut a query whose
     draft row is flat gets nothing but its own block), and, with ``sink=True``, the key regions of the first
     latent frame; the rest of the budget goes to the largest remaining ``P`` of the head. Density equals the
     target unless the forced entries alone exceed it.

   Our defaults: ``key_variance=True``, ``min_row_share=0.5``, ``sink=False``. Both were chosen on the synthetic
   attention suite at equal density (rerun the comparison with ``vidsparse eval attention --methods draft
   draft:key_variance=false draft:min_row_share=0 --densities 0.1 0.25 0.5``).
   The sink helps further on heads that have one, but it is model-specific (upstream Radial
   keeps a first-frame sink for Wan and dropped it for HunyuanVideo) and costs ``1/T'`` of the pairs: at 9 latent
   frames it alone takes 0.12, more than a 0.1 budget. So it is an option.
5. **Text** tokens (joint models) attend and are attended densely; they are not pooled.

The region mask *is* the video block mask of the plan (region ``i`` = plan block ``i``), so the executors compute
exactly the selected region pairs; nothing is approximated after the selection.

Regions and blocks
------------------
Upstream pools 8×16-token windows and requires ``H' % 8 == 0``, ``W' % 16 == 0`` and 128-token kernel blocks, so a
window is exactly a block. vidsparse accepts every geometry, and a ``BlockPlan`` has uniform blocks and no padding
tokens, so a ragged edge window (fewer than ``block_size`` tokens) cannot be one block: the blocks after it would
straddle two windows. Instead of fixing the windows and letting blocks straddle them, vidsparse fixes the blocks
and makes *them* the regions, by choosing a token order in which any ``block_size`` consecutive tokens are
spatially compact (:func:`region_order`):

- each frame is cut into horizontal bands of ``region_rows`` rows (balanced: band heights differ by at most one);
- inside a band, tokens go column by column (each column top to bottom), left to right in even bands and right to
  left in odd bands (serpentine), so ``block_size`` consecutive tokens form a ``rows × block_size/rows`` patch;
- odd frames use the reversed order of even frames, so a block that straddles a frame boundary covers the *same*
  place in two consecutive frames.

Pooling is then a mean over each block in plan order: every region holds exactly ``block_size`` tokens (except the
last video block), every region is exactly one block, and the region mask is the block mask.

When the geometry is one upstream supports (``region_rows`` divides H', ``block_size / region_rows`` divides W'),
every block is exactly one upstream pooling window (tested), and faithful selection reproduces upstream's mask up
to the order of the regions, ties at the threshold and the own block vidsparse always keeps. Otherwise the cost
is that some regions are not rectangles: a block that reaches the end of a band continues in the next band at the
same edge (an L-shaped or stacked patch, still adjacent), and a block that reaches the end of a frame continues in
the next frame at the same place. Measured with
:func:`region_stats` (``block_size=128``, auto rows = 8, so 30 rows become bands of 8, 7, 8, 7 rows):

=====================  ======  =======================  ========================  ====================
geometry (T'×H'×W')    blocks  blocks spanning 2 bands  blocks spanning 2 frames  mean region bbox h×w
=====================  ======  =======================  ========================  ====================
9×30×52 (Wan 480p)     110     0.309                    0.073                     9.2 × 16.2
21×30×52               256     0.309                    0.074                     9.2 × 16.2
21×45×80 (Wan 720p)    591     0.183                    0.030                     8.7 × 16.5
13×48×80, 33×48×80     390/990 0                        0                         8.0 × 16.0 (upstream)
=====================  ======  =======================  ========================  ====================

The alternative of padding-free *ragged windows* (8×16 tiles with smaller edge tiles, laid out contiguously and
cut into uniform blocks) gives blocks that straddle two windows — often far apart, across a whole band — in 0.92
of the blocks at 9×30×52 (0.94 at 21×30×52); padding each window to a full block would need padding tokens, which a
``BlockPlan`` does not have.

Defaults and presets
--------------------
Faithful presets (:func:`faithful_config`), from the official scripts (research notes §2.3): Wan2.1 — density
0.25 (sparsity 0.75), dense while the scheduler timestep ``t > 925`` or in block 0 (``dense_above_timestep=925,
dense_layers=1``); HunyuanVideo — density 0.1, ``t > 945`` or dual-stream blocks 0–1 (``dense_above_timestep=945,
dense_layers=2``: with the dual-stream blocks numbered 0–19 before the single-stream ones, as in upstream
Radial's HunyuanVideo port, ``dense_layers=2`` is exactly the dual-stream blocks 0–1).

Our default warm-up is ``dense_steps=0.25`` (the first quarter of the run) and ``dense_layers=1``: the paper states
its warm-up as "the first 25 % of steps", and a fraction of steps means the same thing for every scheduler, shift
and step count, while ``t > 925`` is about 15 of 50 steps with Wan's shift 5 but a different share of the run
under another shift or step count (distilled few-step schedules, HunyuanVideo's shift 7). The presets are plain
configs; on the command line the Wan one is ``draft:faithful=true,dense_steps=0,dense_above_timestep=925``.

Planning cost
-------------
Planning is one gather of q and k into region order, a segment mean, one ``[Vb, D] × [D, Vb]`` matmul per head, a
softmax and a top-k over ``Vb²`` entries, all vectorised. Measure it against dense attention with::

    vidsparse study plan-cost --methods draft draft:faithful=true --geometry 9x30x52
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, ClassVar

import torch

from vidsparse.config import SparseConfig, check_fraction, check_int
from vidsparse.kernels.planning import block_sums
from vidsparse.layout import VideoLayout
from vidsparse.plan import BlockPlan, finalize_plan, num_blocks

from . import MethodSpec, PlanContext


def _check_bool(name: str, value: Any) -> None:
    """Raise ``ValueError`` unless ``value`` is a bool (``1`` or ``"yes"`` are refused, not coerced)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r} is invalid: expected True or False.")


@dataclass(frozen=True)
class DraftConfig(SparseConfig):
    """Config of the ``draft`` method.

    Args:
        density: Target fraction of video→video region (= block) pairs kept (the paper's sparsity 0.75 is density
            0.25).
        block_size: Tokens per block, which is also tokens per pooled region (128 = upstream's 8×16 windows).
        faithful: ``True``: upstream's draft map and one global cut per head, as the paper (the options marked
            "ours only" are then ignored). ``False``: ours (see the module docstring).
        region_rows: Rows of a region band (the region is ``region_rows × block_size / region_rows`` tokens);
            ``None`` picks 8 (16 at ``block_size=128`` for frames taller than wide, as LightX2V), at most H'.
        min_row_share: Ours only: every query region keeps at least ``ceil(min_row_share · density · Vb)`` key
            regions (its best ones), a share of the average row budget ``density · Vb``; 0 disables it.
        sink: Ours only: always keep the key regions of the first latent frame (costs ``1/T'`` density).
        key_variance: Ours only: add the within-region key-variance term to the draft scores (:func:`draft_map`).
        dense_steps: Our default runs the first quarter of the steps dense (the paper's 25 %).
        dense_layers: Our default runs block 0 dense (as the official Wan script).
    """

    method: ClassVar[str] = "draft"

    density: float | None = 0.25
    block_size: int = 128
    dense_steps: int | float = 0.25
    dense_layers: int = 1
    faithful: bool = False
    region_rows: int | None = None
    min_row_share: float = 0.5
    sink: bool = False
    key_variance: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fraction("density", self.density)
        _check_bool("faithful", self.faithful)
        _check_bool("sink", self.sink)
        _check_bool("key_variance", self.key_variance)
        if self.region_rows is not None:
            check_int("region_rows", self.region_rows, minimum=1)
        check_fraction("min_row_share", self.min_row_share, low_open=False)


#: Faithful presets per model family (official DraftAttention scripts; see the module docstring).
FAITHFUL_PRESETS: dict[str, dict[str, Any]] = {
    "wan": {"density": 0.25, "dense_above_timestep": 925, "dense_layers": 1},
    "hunyuan": {"density": 0.1, "dense_above_timestep": 945, "dense_layers": 2},
}


def faithful_config(model: str = "wan", **overrides: Any) -> DraftConfig:
    """The faithful DraftAttention config of ``model`` (``"wan"`` or ``"hunyuan"``), plus ``overrides``.

    Faithful selection (one global cut per head), the official warm-up by timestep value and dense layers, no
    step-count warm-up.
    """
    if model not in FAITHFUL_PRESETS:
        raise ValueError(f"model={model!r} is invalid: expected one of {', '.join(map(repr, FAITHFUL_PRESETS))}.")
    fields = {"faithful": True, "dense_steps": 0, **FAITHFUL_PRESETS[model], **overrides}
    return DraftConfig(**fields)


# ------------------------------------------------------------------------------------------------ regions
def default_region_rows(height: int, width: int, block_size: int) -> int:
    """Band height used when ``region_rows`` is ``None``: 8 rows (8×16 regions at block 128, 8×8 at 64).

    Frames taller than wide get 16-row bands at block 128 (16×8 regions), as LightX2V chooses by aspect ratio.
    Never more than H' rows.
    """
    rows = block_size // 8 if height > width else 8
    return max(1, min(rows, height))


def region_order(layout: VideoLayout, region_rows: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The video token order in which every run of ``block_size`` consecutive tokens is one compact region.

    Serpentine bands of ``region_rows`` rows, column by column, odd frames reversed (module docstring).

    Returns:
        int64 ``[T'*H'*W']``: position ``p`` holds raster video token ``order[p]`` (a copy of the cached order).
    """
    return _cached_region_order(layout, region_rows, device).clone()


def _cached_region_order(layout: VideoLayout, region_rows: int, device: torch.device | str | None) -> torch.Tensor:
    """The cached region order itself (shared: callers must not modify it)."""
    check_int("region_rows", region_rows, minimum=1)
    return _region_order(layout.frames, layout.height, layout.width, region_rows, str(torch.device(device or "cpu")))


@lru_cache(maxsize=32)
def _region_order(frames: int, height: int, width: int, region_rows: int, device: str) -> torch.Tensor:
    """Cached worker of :func:`region_order` (depends on geometry only)."""
    if device != "cpu":
        return _region_order(frames, height, width, region_rows, "cpu").to(device)
    rows = min(region_rows, height)
    n_bands = -(-height // rows)
    h = torch.arange(height)[:, None].expand(height, width)
    w = torch.arange(width)[None, :].expand(height, width)
    # Balanced bands: row h belongs to band floor(h * n_bands / H'), so band heights differ by at most one.
    band = h * n_bands // height
    column = torch.where(band % 2 == 0, w, width - 1 - w)  # serpentine: odd bands run right to left
    key = (band * width + column) * height + h  # band, then column, then row inside the column
    frame_order = torch.argsort(key.reshape(-1))  # [H'*W'] spatial indices in even-frame order
    t = torch.arange(frames)[:, None]
    per_frame = torch.where(t % 2 == 0, frame_order[None, :], frame_order.flip(0)[None, :])
    return (per_frame + t * (height * width)).reshape(-1)


def region_stats(layout: VideoLayout, block_size: int, region_rows: int | None = None) -> dict[str, float]:
    """How regular the regions of :func:`region_order` are for ``layout`` (the numbers in the module docstring).

    Returns:
        ``blocks``; ``two_bands`` / ``two_frames``: fraction of blocks whose tokens lie in more than one band /
        frame; ``bbox_h`` / ``bbox_w``: mean height / width of a region's spatial bounding box.
    """
    rows = region_rows or default_region_rows(layout.height, layout.width, block_size)
    order = region_order(layout, rows)
    coords = layout.token_coords()[order]  # [N, 3] (t, h, w) in region order
    n = coords.shape[0]
    vb = num_blocks(n, block_size)
    block = torch.arange(n) // block_size
    n_bands = -(-layout.height // min(rows, layout.height))
    band = coords[:, 1] * n_bands // layout.height + coords[:, 0] * n_bands

    def spread(values: torch.Tensor) -> torch.Tensor:
        low = torch.full((vb,), torch.iinfo(torch.int64).max).scatter_reduce(0, block, values, "amin")
        high = torch.full((vb,), -1).scatter_reduce(0, block, values, "amax")
        return high - low

    return {
        "blocks": vb,
        "two_bands": float((spread(band) > 0).float().mean()),
        "two_frames": float((spread(coords[:, 0]) > 0).float().mean()),
        "bbox_h": float((spread(coords[:, 1]) + 1).float().mean()),
        "bbox_w": float((spread(coords[:, 2]) + 1).float().mean()),
    }


# ------------------------------------------------------------------------------------------------- draft map
def pool_regions(
    x: torch.Tensor,
    layout: VideoLayout,
    order: torch.Tensor,
    block_size: int,
    *,
    second_moment: bool = False,
    scatter: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mean (and optionally mean square) of ``x`` over each region.

    Only video tokens are pooled; the last region holds the ``N_video % block_size`` leftover tokens when the video
    does not fill it.

    Two equivalent implementations: *scatter* adds every raster token into its region (``index_add_``, no copy of
    ``x``: about 5× faster on CPU, but float atomics on CUDA make it run-to-run nondeterministic there); *gather*
    copies the video tokens into region order and sums runs of ``block_size`` (deterministic, cheap at GPU
    bandwidth).

    Args:
        x: ``[B, S, H, D]`` in the original token order.
        order: The region order of the video tokens (:func:`region_order`), on x's device.
        second_moment: Also return the per-dimension mean of ``x²`` over each region.
        scatter: Force one implementation; ``None`` uses scatter on CPU and gather elsewhere.

    Returns:
        ``(mean, mean_square or None)``, float32 ``[B, H, Vb, D]`` each.
    """
    b, _, h, d = x.shape
    nv, start = layout.num_video_tokens, layout.video_start
    vb = num_blocks(nv, block_size)
    counts = torch.full((vb,), float(block_size), device=x.device)
    counts[-1] = nv - (vb - 1) * block_size
    counts = counts[None, :, None, None]
    if scatter if scatter is not None else x.device.type == "cpu":
        video = x[:, start : start + nv]
        if video.dtype != torch.float32:
            video = video.float()
        region = torch.empty_like(order).scatter_(0, order, torch.arange(nv, device=x.device) // block_size)
        sums = torch.zeros(b, vb, h, d, device=x.device).index_add_(1, region, video)
        squares = (
            torch.zeros(b, vb, h, d, device=x.device).index_add_(1, region, video.square()) if second_moment else None
        )
    else:
        video = x.index_select(1, order + start)  # [B, Nv, H, D] in region order
        sums = block_sums(video, block_size, dim=1)
        squares = block_sums(video.float().square(), block_size, dim=1) if second_moment else None
    mean = (sums / counts).permute(0, 2, 1, 3)
    if squares is None:
        return mean, None
    return mean, (squares / counts).permute(0, 2, 1, 3)


def draft_map(
    q: torch.Tensor,
    k: torch.Tensor,
    layout: VideoLayout,
    order: torch.Tensor,
    block_size: int,
    *,
    key_variance: bool = False,
) -> torch.Tensor:
    """The draft attention map ``softmax(q̄ k̄ᵀ / √D)`` over regions.

    With ``key_variance`` the score of region pair (i, j) also gets the second-order term of the log-mean-exp of
    the token scores ``q̄_i · k / √D`` over the keys ``k`` of region j: treating those scores as Gaussian with
    variance ``σ² = Σ_d q̄_id² Var_j(k_d) / D`` (per-dimension key variance, covariances ignored), the mean of their
    exponentials is ``exp(μ + σ²/2)``. Plain pooling scores only ``μ``, so a region whose keys disagree (a few very
    strong keys among weak ones, e.g. an attention sink) looks weaker than it is. The term is capped at
    ``σ·√(2 ln block_size)``, about the largest of ``block_size`` Gaussian scores, since the mean of the
    exponentials can never exceed the exponential of the largest score. Cost: one more pooled pass over k and one
    more ``[Vb, D] × [D, Vb]`` matmul.

    Args:
        q, k: ``[B, S, H, D]`` in the original token order.
        order: The region order of the video tokens (:func:`region_order`), on q's device.
        key_variance: Add the capped key-variance term (ours); ``False`` is upstream's map.

    Returns:
        float32 ``[B, H, Vb, Vb]``; every row sums to 1.
    """
    scale = q.shape[-1] ** -0.5
    q_bar, _ = pool_regions(q, layout, order, block_size)
    k_bar, k_square = pool_regions(k, layout, order, block_size, second_moment=key_variance)
    scores = torch.matmul(q_bar, k_bar.transpose(-1, -2)) * scale
    if k_square is not None:
        k_var = (k_square - k_bar.square()).clamp_min(0)
        score_var = torch.matmul(q_bar.square(), k_var.transpose(-1, -2)) * (scale * scale)
        cap = score_var.sqrt() * math.sqrt(2 * math.log(block_size))
        scores = scores + torch.minimum(0.5 * score_var, cap)
    return torch.softmax(scores, dim=-1)


# ------------------------------------------------------------------------------------------------- selection
def budget_pairs(density: float, num_regions: int) -> int:
    """Region pairs a head may keep: ``round(density · Vb²)``, at least 1."""
    return max(1, int(round(density * num_regions * num_regions)))


def select_faithful(probs: torch.Tensor, density: float) -> torch.Tensor:
    """Upstream's selection: per head, the top ``round(density · Vb²)`` entries of the whole draft map.

    Args:
        probs: float ``[B, H, Vb, Vb]`` draft map.

    Returns:
        bool ``[B, H, Vb, Vb]``.
    """
    vb = probs.shape[-1]
    flat = probs.flatten(-2)
    top = flat.topk(budget_pairs(density, vb), dim=-1, sorted=False).indices
    return torch.zeros_like(flat, dtype=torch.bool).scatter_(-1, top, True).view_as(probs)


def select_ours(probs: torch.Tensor, density: float, min_row_share: float, sink_regions: int = 0) -> torch.Tensor:
    """Our selection: forced entries first (own region, per-row minimum, sink), then the global cut of the rest.

    Args:
        probs: float ``[B, H, Vb, Vb]`` draft map.
        density: Target fraction of region pairs; the total kept is ``round(density · Vb²)`` per head unless the
            forced entries alone exceed it.
        min_row_share: Each row keeps its ``ceil(min_row_share · density · Vb)`` best key regions.
        sink_regions: The first ``sink_regions`` key regions are kept for every query (the first frame).

    Returns:
        bool ``[B, H, Vb, Vb]``.
    """
    vb = probs.shape[-1]
    eye = torch.eye(vb, dtype=torch.bool, device=probs.device)
    forced = eye.expand(probs.shape).clone()
    if sink_regions:
        forced[..., :sink_regions] = True
    per_row = min(vb, math.ceil(min_row_share * density * vb))
    if per_row:
        forced.scatter_(-1, probs.topk(per_row, dim=-1, sorted=False).indices, True)
    budget = budget_pairs(density, vb)
    remaining = (budget - forced.sum((-1, -2))).clamp(min=0)  # [B, H], stays on the device: no host sync
    flat = probs.masked_fill(forced, float("-inf")).flatten(-2)
    # The static upper bound `budget` keeps this free of host syncs; each head takes the first `remaining` of it.
    top = flat.topk(min(budget, vb * vb), dim=-1, sorted=True).indices
    take = torch.arange(top.shape[-1], device=probs.device) < remaining[..., None]
    extra = torch.zeros_like(flat, dtype=torch.bool).scatter_(-1, top, take)
    return forced | extra.view_as(probs)


# ------------------------------------------------------------------------------------------------------ plan
def plan(
    q: torch.Tensor | None, k: torch.Tensor | None, layout: VideoLayout, config: DraftConfig, ctx: PlanContext
) -> BlockPlan:
    """Plan DraftAttention for ``q``/``k`` ``[B, S, H, D]``: a per-sample, per-head plan ``[B, H, ...]``."""
    if q is None or k is None:
        raise ValueError("method 'draft' is dynamic: it needs q and k to plan.")
    if q.dim() != 4 or k.shape != q.shape or q.shape[1] != layout.seq_len:
        raise ValueError(
            f"q and k must both be [B, S, H, D] with S = {layout.seq_len} ({layout.describe()}); got "
            f"{tuple(q.shape)} and {tuple(k.shape)}."
        )
    bs = config.block_size
    rows = config.region_rows or default_region_rows(layout.height, layout.width, bs)
    order = _cached_region_order(layout, rows, q.device)
    probs = draft_map(q, k, layout, order, bs, key_variance=config.key_variance and not config.faithful)
    if config.faithful:
        mask = select_faithful(probs, config.density)
    else:
        sink = num_blocks(layout.tokens_per_frame, bs) if config.sink else 0
        mask = select_ours(probs, config.density, config.min_row_share, sink)
    meta = {
        "method": "draft",
        "faithful": config.faithful,
        "key_variance": config.key_variance and not config.faithful,
        "target_density": config.density,
        "region_rows": min(rows, layout.height),
        "regions": probs.shape[-1],
    }
    return finalize_plan(mask, layout, bs, video_order=_cached_region_order(layout, rows, "cpu"), meta=meta)


METHOD = MethodSpec(
    "draft",
    DraftConfig,
    plan,
    static=False,
    summary="pooled draft attention map over regions picks the top density fraction of region pairs",
    targets_density=True,
)
