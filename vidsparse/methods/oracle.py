"""``oracle``: the best block selection at a given density, from the exact attention (a reference, not a method).

Every method guesses which (query block, key block) pairs matter. The oracle does not guess: it computes the exact
softmax attention mass of every video block pair (:func:`~vidsparse.methods.cached.block_attention_mass`, every
query row, about one dense attention) and keeps the pairs with the most mass until the density is reached. It keeps
the invariants every plan keeps (each query block its own block, text rows and columns dense, and with text after
a partial last video block that block dense too, as :func:`~vidsparse.plan.finalize_plan` makes it): those forced
pairs count in its budget, so its measured density equals the target up to one pair.

Three ways to spend the budget (``scope``): ``"head"`` keeps the pairs of most mass over all pairs of a head (the
selection that keeps the most mass, so rows that need more blocks get more); ``"row"`` (the default) keeps the same
number of key blocks of most mass in every query block (AdaSpa's row-wise rule without its head-adaptive budgets);
``"adaptive"`` is the row rule with AdaSpa's head-adaptive budgets (half for heads that are concentrated enough,
1.5x for as many diffuse ones). Keeping the most mass is not the smallest output error: on the synthetic suite the
per-head spread loses to the row rule (relative L2 0.256 vs 0.191 at density 0.25 on 9x30x52), presumably because it
takes blocks from the rows of flat heads, whose mass is spread thin but whose output barely moves when some of it is
dropped. The suite (``vidsparse eval attention``) therefore reports as the oracle the best of the three at a
method's own measured density and in the method's own token order, and every method's error divided by it. A method
can still beat it (neither rule is the error optimum, which would need the values): a ratio below 1 says so,
unclipped.

It is registered as a *reference* method: ``vidsparse.make_plan("oracle", q, k, layout, density=0.25)`` and
``vidsparse eval --methods oracle:density=0.25`` work, but it is not among :func:`~vidsparse.methods.method_names`
(sweeps and benchmarks over "every method" leave it out: planning costs more than the dense attention it replaces).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from vidsparse.config import SparseConfig, check_choice, check_int
from vidsparse.layout import VideoLayout
from vidsparse.plan import BlockPlan, finalize_plan, num_blocks

from . import MethodSpec, PlanContext

#: How the oracle spreads its budget: over all pairs of a head, or the same number per query block.
SCOPES: tuple[str, ...] = ("row", "head", "adaptive")


@dataclass(frozen=True)
class OracleConfig(SparseConfig):
    """Config of the ``oracle`` reference.

    Args:
        density: Target fraction of video block pairs (forced pairs included), in (0, 1].
        scope: ``"row"`` (the same budget per query block, the default), ``"head"`` (top mass over all pairs of
            a head) or ``"adaptive"`` (the row rule with AdaSpa's head-adaptive budgets).
        tile: Token order of the blocks: ``None`` = raster, or a (t, h, w) tile (:meth:`VideoLayout.tile_order`).
    """

    method: ClassVar[str] = "oracle"

    density: float | None = 0.25
    scope: str = "row"
    tile: tuple[int, int, int] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.density is None:
            raise ValueError("density=None is invalid for the oracle: expected a number in (0, 1].")
        check_choice("scope", self.scope, SCOPES)
        if self.tile is not None:
            if not (isinstance(self.tile, tuple | list) and len(self.tile) == 3):
                raise ValueError(f"tile={self.tile!r} is invalid: expected None or three ints (t, h, w) >= 1.")
            for axis, value in zip("thw", self.tile):
                check_int(f"tile {axis}", value, minimum=1)
            object.__setattr__(self, "tile", tuple(self.tile))


def forced_video_pairs(layout: VideoLayout, block_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Bool ``[Vb, Vb]``: the video block pairs every plan keeps (the diagonal; with text, the block it shares).

    :func:`~vidsparse.plan.finalize_plan` makes the block that holds the last video tokens and the first text
    tokens dense as a row and a column when the video does not fill it; those pairs count as video pairs.
    """
    nv = layout.num_video_tokens
    vb = num_blocks(nv, block_size)
    forced = torch.eye(vb, dtype=torch.bool, device=device)
    if layout.text_len and nv % block_size:
        forced[-1, :] = True
        forced[:, -1] = True
    return forced


def oracle_mask(mass: torch.Tensor, density: float, *, forced: torch.Tensor | None = None, scope: str = "row"):
    """The top-mass block selection: bool ``[B, H, Nb, Nb]``.

    Args:
        mass: float32 ``[B, H, Nb, Nb]`` block masses (rows sum to 1), from the exact attention.
        density: Fraction of the ``Nb²`` pairs to keep, forced pairs included (at least the forced ones are kept).
        forced: bool ``[Nb, Nb]`` pairs always kept (default: the diagonal).
        scope: ``"head"``: the ``round(density × Nb²)`` pairs of most mass per head; ``"row"``: the same number
            of key blocks of most mass per query block, the most whose total stays within ``round(density × Nb²)``
            (rows with more forced pairs keep those); ``"adaptive"``: the row rule with AdaSpa's head budgets
            (:func:`~vidsparse.methods.cached.select_blocks`), forced pairs added.
    """
    check_choice("scope", scope, SCOPES)
    b, h, nb, _ = mass.shape
    if forced is None:
        forced = torch.eye(nb, dtype=torch.bool, device=mass.device)
    forced = forced.to(mass.device)
    # Masses are <= 1: adding 2 ranks the forced pairs first, so they are counted in the budget.
    ranked = mass + 2.0 * forced
    total = min(nb * nb, max(int(forced.sum()), round(density * nb * nb)))  # pairs to keep, forced included
    if scope == "adaptive":
        from .cached import select_blocks

        # AdaSpa's head-adaptive budgets on the exact masses (the row rule's budget, halved for concentrated heads
        # and 1.5x for as many diffuse ones); the forced pairs beyond the own block come on top.
        return select_blocks(mass, density=density, head_adaptive=True) | forced
    if scope == "row":
        # The most blocks per row whose total (a row keeps at least its forced pairs) stays within the budget: a
        # forced dense row (text shares the last video block) does not push the density past the target.
        per_row = forced.sum(-1)  # [Nb]
        candidates = torch.arange(1, nb + 1, device=mass.device)
        totals = torch.maximum(per_row[None, :], candidates[:, None]).sum(-1)
        fits = candidates[totals <= total]
        budget = torch.maximum(per_row, fits.max() if fits.numel() else per_row.new_tensor(1))
        order = ranked.argsort(dim=-1, descending=True)
        keep_sorted = torch.arange(nb, device=mass.device) < budget[:, None]
        return torch.zeros_like(forced.expand(b, h, nb, nb)).scatter(-1, order, keep_sorted.expand(b, h, nb, nb))
    top = ranked.reshape(b, h, nb * nb).topk(total, dim=-1).indices
    keep = torch.zeros(b, h, nb * nb, dtype=torch.bool, device=mass.device).scatter_(-1, top, True)
    return keep.view(b, h, nb, nb)


def exact_video_mass(
    q: torch.Tensor, k: torch.Tensor, layout: VideoLayout, block_size: int, order: torch.Tensor | None = None
) -> torch.Tensor:
    """Exact block masses of the video part of ``q``/``k`` ``[B, S, H, D]`` in ``order``: float32 ``[B, H, Vb, Vb]``."""
    from .cached import block_attention_mass, video_qk

    return block_attention_mass(*video_qk(q, k, layout, order), block_size)


def plan(
    q: torch.Tensor | None, k: torch.Tensor | None, layout: VideoLayout, config: OracleConfig, ctx: PlanContext
) -> BlockPlan:
    """The oracle plan of ``q``/``k`` ``[B, S, H, D]``: top-mass pairs per head (or row) at ``config.density``."""
    if q is None or k is None:
        raise ValueError("the oracle needs q and k: it selects blocks from the exact attention.")
    order = None if config.tile is None else layout.tile_order(config.tile).to(q.device)
    mass = exact_video_mass(q, k, layout, config.block_size, order)
    forced = forced_video_pairs(layout, config.block_size, q.device)
    mask = oracle_mask(mass, config.density, forced=forced, scope=config.scope)
    meta = {"method": "oracle", "scope": config.scope, "recall": float((mass * mask).sum(-1).mean())}
    return finalize_plan(mask, layout, config.block_size, video_order=order, meta=meta)


METHOD = MethodSpec(
    "oracle",
    OracleConfig,
    plan,
    static=False,
    summary="reference: the block pairs of most exact attention mass at the target density (costs a dense "
    "attention per call)",
    targets_density=True,
)
