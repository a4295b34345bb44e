"""BlockPlan: the one mask currency every method emits and every executor reads.

The layout is FlexAttention's: the sequence (in *plan order*, see :mod:`vidsparse.layout`) is cut into blocks of
``block_size`` tokens, the last one possibly partial; for every query block the plan lists the key blocks it
attends. ``kv_num[b, h, i]`` counts them and ``kv_idx[b, h, i, :kv_num]`` lists them, sorted ascending and unique.
Entries of ``kv_idx`` past ``kv_num`` are padding and never read.

Batch and head dimensions broadcast: a static plan (radial) has ``B = H = 1``; a per-head plan has ``B = 1``; a
per-sample plan (draft under batched classifier-free guidance) has ``B`` equal to the batch.

Invariants (checked by :meth:`BlockPlan.validate`): indices in range, sorted, unique; every query block attends
its own block (so no softmax row is empty and nothing is NaN). Methods keep text rows and columns dense by
building the plan with :func:`finalize_plan`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

import torch

from .config import SUPPORTED_BLOCK_SIZES, check_choice
from .layout import VideoLayout

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask


#: Where :attr:`BlockPlan.inv_perm` is cached on a plan (the frozen dataclass's ``__dict__``).
_INV_PERM_CACHE = "_inv_perm"


def num_blocks(seq_len: int, block_size: int) -> int:
    """ceil(seq_len / block_size): blocks needed to cover ``seq_len`` tokens (the last may be partial)."""
    return -(-seq_len // block_size)


@dataclass(frozen=True, eq=False)
class BlockPlan:
    """A block-sparse attention pattern over one sequence.

    Attributes:
        kv_num: int32 ``[B, H, Qb]``: number of key blocks each query block attends (B, H may be 1: broadcast).
        kv_idx: int32 ``[B, H, Qb, Kmax]``: the key block indices, ascending in the first ``kv_num`` entries.
        block_size: Tokens per block (64 or 128).
        seq_len: Tokens in the sequence S; ``Qb = ceil(S / block_size)``.
        perm: Optional int64 ``[S]``: plan position ``p`` holds original token ``perm[p]``. Executors gather
            q/k/v with it before attention and scatter the output back after it.
        video_range: ``(start, end)`` token range of the video part in plan order; density is measured over the
            blocks that hold video tokens.
        meta: Free-form information from the method (name, chosen parameters) for reports.
    """

    kv_num: torch.Tensor
    kv_idx: torch.Tensor
    block_size: int
    seq_len: int
    perm: torch.Tensor | None = None
    video_range: tuple[int, int] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_choice("block_size", self.block_size, SUPPORTED_BLOCK_SIZES)
        if self.kv_num.dim() != 3 or self.kv_idx.dim() != 4:
            raise ValueError(
                f"kv_num must be [B, H, Qb] and kv_idx [B, H, Qb, Kmax]; got {tuple(self.kv_num.shape)} and "
                f"{tuple(self.kv_idx.shape)}."
            )
        if self.kv_idx.shape[:3] != self.kv_num.shape:
            raise ValueError(
                f"kv_idx {tuple(self.kv_idx.shape)} and kv_num {tuple(self.kv_num.shape)} disagree on [B, H, Qb]."
            )
        qb = num_blocks(self.seq_len, self.block_size)
        if self.kv_num.shape[2] != qb:
            raise ValueError(
                f"plan has {self.kv_num.shape[2]} query blocks but seq_len={self.seq_len} with "
                f"block_size={self.block_size} needs {qb}."
            )
        if self.perm is not None and tuple(self.perm.shape) != (self.seq_len,):
            raise ValueError(f"perm has shape {tuple(self.perm.shape)}; expected ({self.seq_len},).")
        if self.video_range is None:
            object.__setattr__(self, "video_range", (0, self.seq_len))

    # ------------------------------------------------------------------------------------------------ shapes
    @property
    def num_q_blocks(self) -> int:
        """Qb = ceil(S / block_size)."""
        return self.kv_num.shape[2]

    @property
    def num_kv_blocks(self) -> int:
        """Kb = Qb (self-attention: queries and keys share the sequence)."""
        return self.kv_num.shape[2]

    @property
    def device(self) -> torch.device:
        """Device of the index tensors."""
        return self.kv_idx.device

    @property
    def inv_perm(self) -> torch.Tensor | None:
        """int64 ``[S]``: original token ``n`` sits at plan position ``inv_perm[n]`` (``None`` without perm).

        Computed once per plan and cached on it, outside ``torch.compile``; a compiled graph computes it instead (one
        scatter of ``S`` indices). Not a ``functools.cached_property``: Python 3.11's takes a lock, which Dynamo cannot
        trace (a graph break in every executor call of a plan with a permutation).
        """
        if self.perm is None:
            return None
        compiling = torch.compiler.is_compiling()
        if not compiling and _INV_PERM_CACHE in self.__dict__:
            return self.__dict__[_INV_PERM_CACHE]
        inv = torch.empty_like(self.perm)
        inv[self.perm] = torch.arange(self.seq_len, device=self.perm.device)
        if not compiling:
            self.__dict__[_INV_PERM_CACHE] = inv
        return inv

    def to(self, device: torch.device | str) -> BlockPlan:
        """The same plan with its tensors on ``device``."""
        device = torch.device(device)
        if self.kv_idx.device == device and (self.perm is None or self.perm.device == device):
            return self
        return BlockPlan(
            self.kv_num.to(device),
            self.kv_idx.to(device),
            self.block_size,
            self.seq_len,
            None if self.perm is None else self.perm.to(device),
            self.video_range,
            dict(self.meta),
        )

    def select_heads(self, start: int, stop: int) -> BlockPlan:
        """The plan of heads ``[start, stop)`` only (a plan that broadcasts over heads, H = 1, is returned as is).

        Context parallelism (Ulysses) gives each rank a contiguous range of heads; a plan made for every head of
        the layer is cut to that range here.
        """
        heads = self.kv_num.shape[1]
        if heads == 1:
            return self
        if not 0 <= start < stop <= heads:
            raise ValueError(f"heads [{start}, {stop}) are outside the plan's {heads} heads.")
        return BlockPlan(
            self.kv_num[:, start:stop],
            self.kv_idx[:, start:stop],
            self.block_size,
            self.seq_len,
            self.perm,
            self.video_range,
            dict(self.meta),
        )

    # ------------------------------------------------------------------------------------------ constructors
    @classmethod
    def from_block_mask(
        cls,
        mask: torch.Tensor,
        *,
        block_size: int,
        seq_len: int,
        perm: torch.Tensor | None = None,
        video_range: tuple[int, int] | None = None,
        meta: dict[str, Any] | None = None,
    ) -> BlockPlan:
        """Build a plan from a boolean block mask.

        Args:
            mask: bool ``[B, H, Qb, Kb]`` (or ``[Qb, Kb]``): ``mask[..., i, j]`` keeps key block ``j`` for query
                block ``i``.
        """
        if mask.dim() == 2:
            mask = mask[None, None]
        kv_num, kv_idx = block_mask_to_indices(mask)
        kv_idx = trim_to_longest_row(kv_num, kv_idx)
        return cls(kv_num, kv_idx, block_size, seq_len, perm, video_range, dict(meta or {}))

    @classmethod
    def full(cls, seq_len: int, block_size: int = 64, *, device: torch.device | str | None = None) -> BlockPlan:
        """The dense plan: every query block attends every key block (density 1)."""
        qb = num_blocks(seq_len, block_size)
        kv_idx = torch.arange(qb, dtype=torch.int32, device=device).expand(1, 1, qb, qb).contiguous()
        kv_num = torch.full((1, 1, qb), qb, dtype=torch.int32, device=device)
        return cls(kv_num, kv_idx, block_size, seq_len, meta={"method": "dense"})

    # ------------------------------------------------------------------------------------------------ views
    def block_mask(self) -> torch.Tensor:
        """Bool ``[B, H, Qb, Kb]``: the plan as a dense block mask (in plan order)."""
        b, h, qb = self.kv_num.shape
        kmax = self.kv_idx.shape[-1]
        valid = torch.arange(kmax, device=self.device) < self.kv_num[..., None]
        mask = torch.zeros(b, h, qb, qb + 1, dtype=torch.bool, device=self.device)
        # Padding entries are routed to a spare column qb, dropped afterwards: no Python loop, no host sync.
        idx = torch.where(valid, self.kv_idx.long(), torch.full_like(self.kv_idx, qb, dtype=torch.long))
        mask.scatter_(-1, idx, True)
        return mask[..., :qb]

    def to_dense_mask(self, original_order: bool = True) -> torch.Tensor:
        """Bool ``[B, H, S, S]``: token-level mask, in the original token order unless ``original_order=False``.

        Memory is S² per (B, H): for tests and small sequences only.
        """
        bm = self.block_mask()
        tok_block = torch.arange(self.seq_len, device=self.device) // self.block_size
        dense = bm[:, :, tok_block][:, :, :, tok_block]
        if original_order and self.perm is not None:
            inv = self.inv_perm
            dense = dense[:, :, inv][:, :, :, inv]
        return dense

    def to_block_mask(self, *, full_width: bool = True) -> BlockMask:
        """A FlexAttention ``BlockMask`` of this plan (in plan order), cached on the plan.

        Kept blocks are passed as *full* blocks (no ``mask_mod`` evaluated inside them), which is what makes the
        flex kernel fast; FlexAttention masks the partial tail block from ``seq_lengths`` itself.

        Args:
            full_width: Pad ``kv_idx`` to ``Kb`` columns so every plan of a geometry has the same tensor shapes and
                a compiled ``flex_attention`` never recompiles for new plan data.
        """
        cache = self.__dict__.setdefault("_block_mask_cache", {})
        if full_width not in cache:
            from torch.nn.attention.flex_attention import BlockMask

            kv_idx = self.kv_idx
            if full_width and kv_idx.shape[-1] < self.num_kv_blocks:
                pad = self.num_kv_blocks - kv_idx.shape[-1]
                kv_idx = torch.nn.functional.pad(kv_idx, (0, pad))
            empty_num = torch.zeros_like(self.kv_num)
            empty_idx = torch.zeros_like(kv_idx)
            cache[full_width] = BlockMask.from_kv_blocks(
                empty_num,
                empty_idx,
                self.kv_num.contiguous(),
                kv_idx.contiguous(),
                BLOCK_SIZE=self.block_size,
                seq_lengths=(self.seq_len, self.seq_len),
            )
        return cache[full_width]

    # ---------------------------------------------------------------------------------------------- numbers
    def video_block_range(self) -> tuple[int, int]:
        """[first, last) block indices that hold at least one video token (in plan order)."""
        start, end = self.video_range
        if end <= start:
            return (0, 0)
        return (start // self.block_size, num_blocks(end, self.block_size))

    def density_per_head(self) -> torch.Tensor:
        """float32 ``[B, H]``: computed video→video block pairs over all video→video block pairs."""
        b0, b1 = self.video_block_range()
        n = b1 - b0
        if n == 0:
            return torch.ones(self.kv_num.shape[:2], device=self.device)
        kmax = self.kv_idx.shape[-1]
        rows = self.kv_idx[:, :, b0:b1]
        valid = torch.arange(kmax, device=self.device) < self.kv_num[:, :, b0:b1, None]
        in_video = (rows >= b0) & (rows < b1) & valid
        return in_video.sum(dim=(-1, -2)).float() / float(n * n)

    @cached_property
    def mean_density(self) -> torch.Tensor:
        """0-dim float32 tensor: :meth:`density` without a host sync (computed once per plan)."""
        return self.density_per_head().mean()

    def density(self) -> float:
        """Mean density over batch and heads (video→video blocks); 1.0 is dense. Synchronises with the device."""
        return float(self.mean_density)

    # ------------------------------------------------------------------------------------------- validation
    def validate(self) -> BlockPlan:
        """Check the invariants; raise ``ValueError`` naming the first broken one. Returns ``self``."""
        qb = self.num_q_blocks
        kmax = self.kv_idx.shape[-1]
        if self.kv_num.dtype != torch.int32 or self.kv_idx.dtype != torch.int32:
            raise ValueError(f"kv_num/kv_idx must be int32; got {self.kv_num.dtype}/{self.kv_idx.dtype}.")
        if bool((self.kv_num < 1).any()) or bool((self.kv_num > min(qb, kmax)).any()):
            raise ValueError(f"kv_num must lie in [1, {min(qb, kmax)}] (each row attends at least its own block).")
        valid = torch.arange(kmax, device=self.device) < self.kv_num[..., None]
        idx = self.kv_idx
        if bool(((idx < 0) | (idx >= qb))[valid].any()):
            raise ValueError(f"kv_idx holds a block index outside [0, {qb}).")
        both = valid[..., 1:] & valid[..., :-1]
        if bool((idx[..., 1:] <= idx[..., :-1])[both].any()):
            raise ValueError("kv_idx rows must be sorted ascending without duplicates in their first kv_num entries.")
        own = torch.arange(qb, device=self.device)[None, None, :, None]
        has_own = ((idx == own) & valid).any(-1)
        if not bool(has_own.all()):
            bad = (~has_own).nonzero()[0].tolist()
            raise ValueError(f"query block {bad[2]} (batch {bad[0]}, head {bad[1]}) does not attend its own block.")
        if self.perm is not None:
            if self.perm.dtype != torch.int64:
                raise ValueError(f"perm must be int64; got {self.perm.dtype}.")
            seen = torch.zeros(self.seq_len, dtype=torch.bool, device=self.perm.device)
            seen[self.perm] = True
            if not bool(seen.all()):
                raise ValueError("perm is not a permutation of range(seq_len).")
        return self


def trim_to_longest_row(kv_num: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
    """``kv_idx`` ``[B, H, Qb, K]`` cut to ``Kmax`` = the longest row of ``kv_num`` (at least 1), contiguous.

    A sparse plan's index is then a fraction of ``Qb * Kb`` entries (a full-width one is 224 MB at 75.6k tokens,
    block 64, 40 heads); consumers that need fixed shapes pad it (``to_block_mask``'s ``full_width``). Not while
    compiling: trimming reads the width on the host (a sync), so a traced plan keeps its width.
    """
    if torch.compiler.is_compiling() or not kv_num.numel():
        return kv_idx
    return kv_idx[..., : max(int(kv_num.max()), 1)].contiguous()


def block_mask_to_indices(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn a bool ``[B, H, Qb, Kb]`` block mask into ``(kv_num int32 [B, H, Qb], kv_idx int32 [B, H, Qb, Kb])``.

    Vectorised: a stable sort of ``~mask`` brings the kept columns first, in ascending order.
    """
    kv_num = mask.sum(-1, dtype=torch.int32)
    order = torch.sort((~mask).to(torch.uint8), dim=-1, stable=True).indices
    return kv_num, order.to(torch.int32)


def finalize_plan(
    video_mask: torch.Tensor,
    layout: VideoLayout,
    block_size: int,
    *,
    video_order: torch.Tensor | None = None,
    meta: dict[str, Any] | None = None,
) -> BlockPlan:
    """Build a full-sequence plan from a method's video→video block mask.

    This is where the invariants shared by all methods are enforced, once: text rows and columns dense, every query
    block attends its own block, the permutation into plan order (video in ``video_order`` first, then text).

    Args:
        video_mask: bool ``[B, H, Vb, Vb]`` over the video blocks in plan order, ``Vb = ceil(N_video / block)``.
        layout: Geometry of the sequence.
        block_size: Tokens per block.
        video_order: int64 ``[N_video]`` order of the video tokens (``None``: raster).
        meta: Method information kept on the plan.
    """
    nv = layout.num_video_tokens
    vb = num_blocks(nv, block_size)
    if video_mask.shape[-2:] != (vb, vb):
        raise ValueError(f"video_mask must end in ({vb}, {vb}) for {layout.describe()}; got {tuple(video_mask.shape)}.")
    qb = num_blocks(layout.seq_len, block_size)
    b, h = video_mask.shape[:2]
    mask = torch.zeros(b, h, qb, qb, dtype=torch.bool, device=video_mask.device)
    mask[:, :, :vb, :vb] = video_mask
    # Text sits after the video in plan order, starting inside block nv // block_size when the video does not
    # fill its last block: every block that holds a text token is dense as a row and as a column.
    first_text_block = nv // block_size
    if layout.text_len:
        mask[:, :, first_text_block:, :] = True
        mask[:, :, :, first_text_block:] = True
    diag = torch.arange(qb, device=video_mask.device)
    mask[:, :, diag, diag] = True
    perm = layout.plan_permutation(video_order)
    return BlockPlan.from_block_mask(
        mask,
        block_size=block_size,
        seq_len=layout.seq_len,
        perm=None if perm is None else perm.to(video_mask.device),
        video_range=(0, nv),
        meta=meta,
    )
