"""``radial``: Radial Attention's static energy-decay mask (Li, Li et al., NeurIPS 2025, arXiv 2506.19852).

The idea: attention energy between two video tokens decays with their distance in time and space, so a query frame
``i`` needs a spatial window around each query token in key frame ``j`` that shrinks as ``d = |i - j|`` grows. The
mask depends only on the geometry, so it is built once per (layout, config) and cached by
:func:`vidsparse.methods.build_plan` (a bounded cache keyed by geometry: a new resolution gets a new plan).

Two settings, chosen with ``faithful``:

**faithful=True** reproduces the official code (mit-han-lab/radial-attention @ 72788d4, described in
``research/radial_draft.md`` §1.2), including its defects:

- frame pairs with ``d <= 1`` are dense; for ``d >= 2`` the kept band is ``|k - l| <= width`` over the *raster*
  spatial index ``k, l`` of the two frames (a 1-D diagonal band, not a 2-D window), with
  ``width = max(2**bit_length(s) / 2**bit_length(d) * decay, block_size)`` (``s`` tokens per frame): the band
  never gets narrower than one block, so density saturates (about 0.287 on Wan 768x1280x69 whatever the decay);
- frame decimation at large ``d``: with ``L0 = 2**bit_length(s) / 2**bit_length(d)``, when ``L0 < 128`` a pair is
  kept only if ``d % int(128 / L0) == 0`` (128 is hard-coded upstream, whatever the block size);
- an optional first-frame sink (key frame 0 dense for every query frame: on for Wan, off for HunyuanVideo);
- block-ification "shrinkMaskStrict": each frame pair's ``s x s`` token tile is placed at its offset inside the
  block grid; a block is kept iff more than 60 % of its key columns that have any coverage have more than a third
  of their rows covered; the pair results are OR-ed. Computed analytically per block here (vectorised over the
  distinct tiles), never as a token-level mask, so even 128 frames x 3600 tokens plan in seconds;
- the video token count must be a multiple of the block size (upstream removed padding and cannot run otherwise):
  a clear error, unless ``strict_tokens=False`` applies the same rule to the ragged tail (our extension).

**faithful=False** (ours, the default) keeps the energy-decay idea without those defects:

- a true 2-D spatial window: the distance between two tokens is the Euclidean distance in (h, w), not in raster
  order, so the top and bottom rows of a frame are treated like every other row;
- decay applies to every frame distance, so every density in (0, 1] is reachable. The window of a frame pair at
  distance ``d`` keeps the nearest fraction ``a(d) = min(1, decay * w(d))`` of its token pairs, with
  ``w(d) = near_weight`` (default 20) for ``d <= 1``: the near frames, which upstream always keeps dense, are the
  last to be windowed, but they are windowed when the target density requires it; and
  ``w(d) = (3 / (d + 1)) ** temporal_decay`` for ``d >= 2`` (``decay`` is the kept fraction at ``d = 2``). The
  default ``temporal_decay=0`` keeps one window size for all far frames, for "same place, any time" heads that need
  every frame; on the synthetic suite it is within 0.003 relative L2 error of the paper's halving per octave
  (``temporal_decay=1``) either way (``samples/reports/radial_suite_*.json``).
  A frame pair whose fraction is below one token pair (``a(d) < 1/s``) is dropped;
- token tiles: video tokens are reordered into spatial tiles of ``tile = (th, tw)`` tokens (default one block,
  8 x block/8), so every kept region fills whole blocks; grids the tile does not divide get ragged edge tiles (a
  block may then hold parts of two tiles or two frames, each judged where it really is) and no token count has
  to divide anything;
- ``density=`` picks the decay: every block pair has the smallest decay at which the window reaches it (see
  :func:`decay_thresholds`); the plan keeps the pairs with the lowest thresholds until the target density is met,
  admitting pairs tied at the boundary nearest block centre first, so the density is exact to one block pair;
  ``decay=`` instead keeps every pair whose threshold is at most ``decay``.

Text tokens stay dense and every query block attends its own block (:func:`vidsparse.plan.finalize_plan`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import ClassVar

import torch

from vidsparse.config import SparseConfig, check_int
from vidsparse.layout import VideoLayout
from vidsparse.plan import BlockPlan, finalize_plan, num_blocks

from . import MethodSpec, PlanContext

#: Upstream's default decay (Wan 2.1 scripts), used by ``faithful=True`` when ``decay`` is not given.
FAITHFUL_DEFAULT_DECAY = 0.2
#: Target density of ours when neither ``density`` nor ``decay`` is given.
DEFAULT_DENSITY = 0.3
#: Upstream's block size on Wan 2.1 and HunyuanVideo (its Wan 2.2 processor uses 64): ``faithful=True``'s default.
FAITHFUL_BLOCK_SIZE = 128
#: Ours' default block size.
OURS_BLOCK_SIZE = 64
#: Upstream's hard-coded frame-decimation threshold (independent of the block size).
_DECIMATION_THRESHOLD = 128


@dataclass(frozen=True)
class RadialConfig(SparseConfig):
    """Config of the ``radial`` method (see the module docstring for both rules).

    Args:
        faithful: ``True`` reproduces the official mask rule (raster band, block floor, saturating density);
            ``False`` (default) is ours: 2-D window, decay from ``d = 0``, token tiles, any density.
        decay: Faithful: upstream's ``decay_factor`` (band width multiplier; ``None`` = 0.2, Wan's default; 0.95
            or 1 for HunyuanVideo). Ours: the kept fraction of a frame pair at distance 2 (``None`` = solve it
            from ``density``). Ours takes ``density`` or ``decay``, not both.
        sink: Keep key frame 0 for every query frame (first-frame attention sink): on for Wan (upstream and ours);
            upstream turns it off for HunyuanVideo.
        near_weight: Ours: how much more window the near frames (``d <= 1``) get than ``d = 2``; large values
            keep them dense until the density target forces them to shrink (upstream keeps them always dense).
        temporal_decay: Ours: exponent of the window's decay with frame distance beyond ``d = 1`` (window area
            ``∝ (d + 1) ** -temporal_decay``; 1 halves it per doubling of ``d`` as the paper; 0, the default and
            the best on the synthetic suite, keeps it constant).
        tile: Ours: spatial token tile (th, tw) in latent tokens; ``None`` = (8, block_size // 8), one block.
        strict_tokens: Faithful only: raise when the video token count is not a multiple of ``block_size``, as
            upstream cannot run that; ``False`` applies the rule to the ragged tail block too (our extension,
            used to compare with faithful on any geometry).
        density: Ours: target fraction of video block pairs (``None`` with ``decay=None`` means 0.3). Faithful has
            no density target: its density follows from ``decay``.
        block_size: ``None`` (default) = upstream's 128 with ``faithful=True`` (Wan 2.1 and HunyuanVideo; pass 64
            for Wan 2.2, whose processor uses 64), 64 for ours. ``replace(faithful=...)`` re-resolves a default
            block size; an explicit one is kept.
        dense_steps, dense_layers, dense_last_steps: Upstream's warm-up: the first 24 % of the steps (12 of 50)
            and the first transformer block run dense.
    """

    method: ClassVar[str] = "radial"

    block_size: int | None = None
    faithful: bool = False
    decay: float | None = None
    sink: bool = True
    near_weight: float = 20.0
    temporal_decay: float = 0.0
    tile: tuple[int, int] | None = None
    strict_tokens: bool = True
    dense_steps: int | float = 0.24
    dense_layers: int = 1
    dense_last_steps: int | float = 0

    def __post_init__(self) -> None:
        auto = self.block_size is None
        if auto:
            faithful = self.faithful is True
            object.__setattr__(self, "block_size", FAITHFUL_BLOCK_SIZE if faithful else OURS_BLOCK_SIZE)
        object.__setattr__(self, "_auto_block_size", auto)  # not a field: equality and hashing ignore it
        super().__post_init__()
        for name in ("faithful", "sink", "strict_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: expected True or False.")
        for name, minimum in (("decay", None), ("near_weight", None), ("temporal_decay", 0.0)):
            value = getattr(self, name)
            if value is None and name == "decay":
                continue
            ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
            if not ok or (value <= 0 if minimum is None else value < minimum):
                allowed = "a number > 0" if minimum is None else f"a number >= {minimum}"
                raise ValueError(f"{name}={value!r} is invalid: expected {allowed}{' or None' * (name == 'decay')}.")
        if self.tile is not None:
            if not (isinstance(self.tile, tuple | list) and len(self.tile) == 2):
                raise ValueError(f"tile={self.tile!r} is invalid: expected two integers (th, tw) or None.")
            check_int("tile[0]", self.tile[0], minimum=1)
            check_int("tile[1]", self.tile[1], minimum=1)
        if self.faithful:
            if self.density is not None:
                raise ValueError(
                    f"density={self.density!r} cannot be used with faithful=True: the official rule has no density "
                    "target (its density follows from decay and saturates); pass decay=..., or use faithful=False."
                )
            defaults = {f.name: f.default for f in dataclasses.fields(RadialConfig)}
            for name in ("tile", "near_weight", "temporal_decay"):
                if getattr(self, name) != defaults[name]:
                    raise ValueError(
                        f"{name}={getattr(self, name)!r} is only used by faithful=False (the official rule has no "
                        "such option)."
                    )
        elif self.density is not None and self.decay is not None:
            raise ValueError(
                f"density={self.density!r} and decay={self.decay!r} are both set: ours takes one of them "
                "(density solves for the decay)."
            )

    def replace(self, **overrides: object) -> RadialConfig:
        """A copy with ``overrides``; a block size that was left to its default follows a new ``faithful``."""
        if getattr(self, "_auto_block_size", False) and "block_size" not in overrides:
            overrides["block_size"] = None
        return super().replace(**overrides)

    @property
    def tile_shape(self) -> tuple[int, int]:
        """Ours' spatial tile (th, tw)."""
        return tuple(self.tile) if self.tile is not None else (8, self.block_size // 8)


# ================================================================================================= faithful rule
def _band_tiles(tokens: int, block: int, row_off: torch.Tensor, col_off: torch.Tensor, width: torch.Tensor):
    """Upstream's shrinkMaskStrict of band tiles, analytically: bool ``[U, nb, nb]`` with ``nb = ceil(tokens / block)``.

    Tile ``u`` is the token mask ``|k - l| <= width[u]`` over ``k, l in [0, tokens)``, placed on a canvas at row
    offset ``row_off[u]`` and column offset ``col_off[u]`` (both < block) and cut into ``nb x nb`` blocks (like
    upstream, the canvas is cropped to ``nb`` blocks, so a tile that overhangs loses its last rows/columns). A
    block is kept iff more than 60 % of its columns with any coverage are covered in more than 1/3 of the rows.

    Args:
        row_off, col_off: int64 ``[U]``; width: float64 ``[U]`` (``>= tokens`` for a full tile).
    """
    nb = num_blocks(tokens, block)
    # int32 throughout: |k - l| <= width  <=>  |k - l| <= floor(width) for integer k, l.
    half = torch.floor(width).clamp(max=tokens).to(torch.int32)[:, None, None]
    row_off, col_off = row_off.to(torch.int32), col_off.to(torch.int32)
    a = torch.arange(nb, dtype=torch.int32)
    # Token rows of canvas block-row a: [k0, k1) after clipping to the frame.
    k0 = (a[None, :] * block - row_off[:, None]).clamp(min=0)  # [U, nb]
    k1 = (a[None, :] * block - row_off[:, None] + block).clamp(max=tokens)
    # Token column of every canvas column, grouped by block-column: [U, nb, block].
    cols = torch.arange(nb * block, dtype=torch.int32).view(nb, block)[None] - col_off[:, None, None]
    col_ok = (cols >= 0) & (cols < tokens)
    lo = torch.maximum(k0[:, :, None, None], (cols - half)[:, None])  # [U, nb(a), nb(b), block]
    hi = torch.minimum(k1[:, :, None, None] - 1, (cols + half)[:, None])
    count = (hi - lo + 1).clamp_(min=0).mul_(col_ok[:, None])
    covered = (count > 0).sum(-1, dtype=torch.int32)
    dense_cols = (3 * count > block).sum(-1, dtype=torch.int32)  # column density > 1/3
    return 5 * dense_cols > 3 * covered  # fraction of dense columns > 0.6, in integers


def faithful_block_mask(layout: VideoLayout, config: RadialConfig) -> torch.Tensor:
    """The official Radial block mask over the raster video blocks: bool ``[Vb, Vb]``.

    Raises:
        ValueError: when the video token count is not a multiple of ``block_size`` and ``strict_tokens`` is True.
    """
    block, frames, s = config.block_size, layout.frames, layout.tokens_per_frame
    nv = layout.num_video_tokens
    if nv % block and config.strict_tokens:
        raise ValueError(
            f"radial faithful=True needs the video token count to be a multiple of block_size: {nv} tokens "
            f"({layout.grid[0]}x{layout.grid[1]}x{layout.grid[2]}) is not a multiple of {block} (upstream removed "
            "padding and cannot run this shape). Use faithful=False (any token count), or strict_tokens=False to "
            "apply the official rule to the ragged tail."
        )
    decay = FAITHFUL_DEFAULT_DECAY if config.decay is None else float(config.decay)
    ref_len = 2 ** s.bit_length()  # upstream's reference length: the power of two above s
    # Per frame distance (a loop over at most T' distances, not over blocks): band width, or -1 = pair dropped.
    width_by_d = []
    for d in range(frames):
        base = ref_len / 2 ** d.bit_length()
        if base < _DECIMATION_THRESHOLD and d % int(_DECIMATION_THRESHOLD / base):
            width_by_d.append(-1.0)
        else:
            width_by_d.append(float(s) if d <= 1 else max(base * decay, float(block)))
    i, j = (x.reshape(-1) for x in torch.meshgrid(torch.arange(frames), torch.arange(frames), indexing="ij"))
    width = torch.tensor(width_by_d, dtype=torch.float64)[(i - j).abs()]
    if config.sink:
        width = torch.where(j == 0, float(s), width)
    live = width >= 0
    i, j, width = i[live], j[live], width[live]
    row_off, col_off = (i * s) % block, (j * s) % block
    # Pairs share a tile when they share (row offset, column offset, width): compute each distinct tile once.
    widths, width_id = torch.unique(width, return_inverse=True)
    key = (row_off * block + col_off) * len(widths) + width_id
    keys, tile_of_pair = torch.unique(key, return_inverse=True)
    u_width = widths[keys % len(widths)]
    u_col = (keys // len(widths)) % block
    u_row = keys // len(widths) // block
    nb = num_blocks(s, block)
    chunk = max(1, 4_000_000 // (nb * nb * block))  # bound the [U, nb, nb, block] intermediate
    tiles = torch.cat(
        [
            _band_tiles(s, block, u_row[c : c + chunk], u_col[c : c + chunk], u_width[c : c + chunk])
            for c in range(0, len(keys), chunk)
        ]
    )
    vb = num_blocks(nv, block)
    mask = torch.zeros(vb, vb, dtype=torch.bool)
    # OR every pair's tile into the grid at the pair's first block, clipped to the grid (ragged tail).
    pair, a, b = tiles[tile_of_pair].nonzero(as_tuple=True)
    rows = (i[pair] * s) // block + a
    cols = (j[pair] * s) // block + b
    ok = (rows < vb) & (cols < vb)
    mask[rows[ok], cols[ok]] = True
    return mask


# ===================================================================================================== ours
def pair_fraction_below(height: int, width: int) -> torch.Tensor:
    """Fraction of a frame's token pairs that are closer than a given gap: float64 ``[H', W']``.

    Entry ``[gh, gw]`` is the fraction of ordered token pairs ``(x, y)`` of an ``H' x W'`` frame with
    ``dh**2 + dw**2 < gh**2 + gw**2`` (Euclidean distance in token units). A window that keeps the nearest
    fraction ``a`` of the pairs reaches the distance ``(gh, gw)`` iff ``a > pair_fraction_below[gh, gw]``.
    """
    dh, dw = torch.arange(height, dtype=torch.int64), torch.arange(width, dtype=torch.int64)
    # Ordered pairs at offset |dh| = a: H' of them for a = 0, 2 (H' - a) otherwise.
    count_h = torch.where(dh == 0, height, 2 * (height - dh)).double()
    count_w = torch.where(dw == 0, width, 2 * (width - dw)).double()
    dist2 = (dh[:, None] ** 2 + dw[None, :] ** 2).reshape(-1)
    weight = (count_h[:, None] * count_w[None, :]).reshape(-1)
    sorted_d2, order = torch.sort(dist2)
    below = torch.cumsum(weight[order], 0) - weight[order]  # pairs strictly before each sorted entry...
    first = torch.searchsorted(sorted_d2, dist2)  # ...taken at the first entry of equal distance
    return (below[first] / float(height * width) ** 2).view(height, width)


@dataclass(frozen=True)
class _Pieces:
    """Maximal runs of plan-order tokens inside one block, one tile (and so one frame), with their statistics.

    A block is one tile when the tile divides the grid; ragged edge tiles make a block span parts of two tiles
    (or two frames), and each part is kept as its own piece so the window test sees where its tokens really are.
    All tensors are ``[P]``, pieces in plan order (so ``block`` is non-decreasing).
    """

    frame: torch.Tensor  # int64 latent frame
    centre: torch.Tensor  # float64 [P, 2] mean (h, w)
    spread: torch.Tensor  # float64 mean squared distance of the tokens to the centre
    block: torch.Tensor  # int64 block index in plan order


def _pieces(layout: VideoLayout, block: int, order: torch.Tensor, tile: tuple[int, int]) -> _Pieces:
    """Cut the tiled video order into pieces (see :class:`_Pieces`); ``order`` int64 ``[N]`` from ``tile_order``."""
    coords = layout.token_coords()[order]
    t, h, w = coords.unbind(1)
    th, tw = tile
    tile_id = (t * -(-layout.height // th) + h // th) * -(-layout.width // tw) + w // tw
    blk = torch.arange(order.numel()) // block
    start = torch.ones_like(blk, dtype=torch.bool)
    start[1:] = (blk[1:] != blk[:-1]) | (tile_id[1:] != tile_id[:-1])
    piece = torch.cumsum(start, 0) - 1
    n = int(piece[-1]) + 1
    hw = coords[:, 1:].double()
    size = torch.bincount(piece, minlength=n).double()
    centre = torch.zeros(n, 2, dtype=torch.float64).index_add_(0, piece, hw) / size[:, None]
    spread = torch.zeros(n, dtype=torch.float64).index_add_(0, piece, ((hw - centre[piece]) ** 2).sum(1)) / size
    return _Pieces(t[start], centre, spread, blk[start])


def frame_weight(distance: torch.Tensor, near_weight: float, temporal_decay: float) -> torch.Tensor:
    """Ours' temporal energy decay ``w(d)``: a frame pair at distance ``d`` keeps ``a(d) = min(1, decay * w(d))``.

    ``w(d) = near_weight`` for ``d <= 1`` (the frames upstream keeps dense are windowed last) and
    ``w(d) = (3 / (d + 1)) ** temporal_decay`` for ``d >= 2`` (``w(2) = 1``: ``decay`` is the kept fraction at
    ``d = 2``; exponent 1 halves the window area per doubling of ``d``, as in the paper).

    Args:
        distance: int64 tensor of frame distances; returns float64 of the same shape.
    """
    far = (3.0 / (distance.double() + 1)) ** temporal_decay
    return torch.where(distance <= 1, near_weight, far)


def decay_thresholds(layout: VideoLayout, config: RadialConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Ours: the smallest decay at which each video block pair is kept, and the tiled token order.

    Cached on what they depend on (not on ``density``/``decay``), so plans for several targets at one geometry
    share the work. See :func:`_decay_thresholds` for the rule; the returned tensors must not be modified.

    Returns:
        ``(thresholds float64 [Vb, Vb], order int64 [N])`` in plan (tiled) order.
    """
    return _decay_thresholds(
        layout, config.block_size, config.tile_shape, config.sink, float(config.near_weight), config.temporal_decay
    )


@lru_cache(maxsize=8)
def _decay_thresholds(
    layout: VideoLayout,
    block: int,
    tile: tuple[int, int],
    sink: bool,
    near_weight: float,
    temporal_decay: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Worker of :func:`decay_thresholds`.

    The window of a frame pair at distance ``d`` keeps the nearest fraction ``a(d) = min(1, decay * w(d))`` of its
    token pairs (:func:`frame_weight`), a 2-D disk in (h, w). It reaches a query piece x key piece when its radius
    reaches their root-mean-square token distance ``r`` (``r**2`` = squared centre distance + both spreads), i.e.
    when ``a(d) >= max(pair_fraction_below(r), 1/s)`` (below one token pair's worth, ``1/s``, a frame pair is
    dropped). A block pair is kept as soon as one of its piece pairs is, so its threshold is
    ``min over piece pairs of max(pair_fraction_below(r), 1/s) / w(d)``. Key blocks holding a first-frame token get
    0 with the sink on, and own blocks -1 (always kept).
    """
    height, width = layout.height, layout.width
    order = layout.tile_order((1, *tile))
    pieces = _pieces(layout, block, order, tile)
    vb = num_blocks(layout.num_video_tokens, block)
    # Pieces of different frames often have the same spatial shape (frames repeat the tiling, shifted by
    # s mod block): the spatial part of the threshold is computed once per pair of distinct shapes.
    shapes, shape_id = torch.unique(torch.cat([pieces.centre, pieces.spread[:, None]], 1), dim=0, return_inverse=True)
    centres = shapes[:, :2]
    r2 = torch.cdist(centres, centres, compute_mode="donot_use_mm_for_euclid_dist") ** 2
    r2 = r2 + shapes[:, 2, None] + shapes[None, :, 2]
    # Fraction of a frame's token pairs strictly closer than r, looked up by r**2 among the integer distances.
    dist2 = (torch.arange(height)[:, None] ** 2 + torch.arange(width)[None] ** 2).view(-1).double()
    sorted_d2, by_d2 = torch.sort(dist2)
    sorted_below = torch.cat([pair_fraction_below(height, width).view(-1)[by_d2], torch.ones(1, dtype=torch.float64)])
    spatial = sorted_below[torch.searchsorted(sorted_d2, r2)].clamp(min=1.0 / layout.tokens_per_frame)
    spatial = torch.nn.functional.pad(spatial, (0, 1, 0, 1), value=math.inf)  # last row/column: empty slot
    inv_weight = 1.0 / frame_weight(torch.arange(layout.frames), near_weight, temporal_decay)
    # Pad to [Vb, K] slots (K = most pieces in one block; 1 when the tile divides the grid); empty slots point at
    # the infinite row of ``spatial`` and never win the minimum.
    first = torch.searchsorted(pieces.block, torch.arange(vb))
    slot = torch.arange(pieces.block.numel()) - first[pieces.block]
    k = int(slot.max()) + 1
    frame = torch.zeros(vb, k, dtype=torch.int64).index_put_((pieces.block, slot), pieces.frame)
    shape = torch.full((vb, k), len(shapes), dtype=torch.int64).index_put_((pieces.block, slot), shape_id)
    thresholds = torch.empty(vb, vb, dtype=torch.float64)
    rows_per_chunk = max(1, 4_000_000 // (vb * k * k))
    for r0 in range(0, vb, rows_per_chunk):
        rows = slice(r0, r0 + rows_per_chunk)
        # [R, Vb, K (query slot), K (key slot)]
        tau = spatial[shape[rows, None, :, None], shape[None, :, None]]
        tau = tau * inv_weight[(frame[rows, None, :, None] - frame[None, :, None]).abs()]
        thresholds[rows] = tau.flatten(2).min(-1).values
    if sink:
        # The sink is a whole key frame: every key block holding a frame-0 token, including the one it shares
        # with frame 1.
        thresholds[:, ((frame == 0) & (shape < len(shapes))).any(1)] = 0.0
    thresholds.diagonal().fill_(-1.0)
    return thresholds, order


def _block_centres(layout: VideoLayout, block: int, order: torch.Tensor) -> torch.Tensor:
    """Mean (t, h, w) of each block's tokens in plan order: float64 ``[Vb, 3]``."""
    coords = layout.token_coords()[order].double()
    blk = torch.arange(order.numel()) // block
    vb = num_blocks(order.numel(), block)
    sums = torch.zeros(vb, 3, dtype=torch.float64).index_add_(0, blk, coords)
    return sums / torch.bincount(blk, minlength=vb)[:, None]


def ours_block_mask(layout: VideoLayout, config: RadialConfig) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Ours: bool ``[Vb, Vb]`` block mask in tiled order, the order (int64 ``[N]``) and the decay used.

    With ``decay`` set, keeps the pairs whose threshold is at most ``decay``. Otherwise keeps the
    ``round(density * Vb**2)`` pairs with the lowest thresholds (ties broken by block-centre distance), so the
    density is the target to within one block pair (never below the own-block diagonal).
    """
    thresholds, order = decay_thresholds(layout, config)
    vb = thresholds.shape[0]
    if config.decay is not None:
        return thresholds <= config.decay, order, float(config.decay)
    target = DEFAULT_DENSITY if config.density is None else config.density
    keep = min(vb * vb, max(vb, round(target * vb * vb)))
    flat = thresholds.reshape(-1)
    decay = float(torch.kthvalue(flat, keep).values)
    mask = flat < decay
    # Pairs tied at the boundary threshold: admit the nearest block centres first (then the lowest index).
    tied = torch.nonzero(flat == decay).flatten()
    centres = _block_centres(layout, config.block_size, order)
    distance = (centres[tied // vb] - centres[tied % vb]).norm(dim=1)
    mask[tied[torch.sort(distance, stable=True).indices[: keep - int(mask.sum())]]] = True
    decay = max(decay, 0.0)
    return mask.view(vb, vb), order, decay


def plan(
    q: torch.Tensor | None, k: torch.Tensor | None, layout: VideoLayout, config: RadialConfig, ctx: PlanContext
) -> BlockPlan:
    """The Radial plan for ``layout`` (static: ``q``/``k`` are ignored and may be ``None``).

    Returns:
        A :class:`BlockPlan` with ``B = H = 1``; faithful plans are in raster order, ours carry the tile
        permutation (video tokens in tiles, then text).
    """
    meta = {"method": "radial", "rule": "faithful" if config.faithful else "ours", "sink": config.sink}
    if config.faithful:
        mask = faithful_block_mask(layout, config)
        meta["decay"] = FAITHFUL_DEFAULT_DECAY if config.decay is None else config.decay
        return finalize_plan(mask[None, None], layout, config.block_size, meta=meta)
    mask, order, decay = ours_block_mask(layout, config)
    meta.update(decay=decay, tile=config.tile_shape)
    if config.decay is None:
        meta["target_density"] = DEFAULT_DENSITY if config.density is None else config.density
    return finalize_plan(mask[None, None], layout, config.block_size, video_order=order, meta=meta)


METHOD = MethodSpec(
    "radial",
    RadialConfig,
    plan,
    static=True,
    targets_density=True,
    summary="static energy-decay mask: spatial window shrinking with frame distance (Radial Attention)",
)
