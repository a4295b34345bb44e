"""Offline patterns of the ``cached`` method (Sparse-vDiT-style): pattern types, calibration, the pattern file.

Every (model, layer, head) of a transformer gets one **pattern type** with up to two integer parameters:

====  ===========  ======================  ==========  =================================================================
id    name         parameters              geometric   keeps, for each query block
====  ===========  ======================  ==========  =================================================================
0     dense        -                       yes         every key block
1     window       frames                  yes         key blocks within ±frames latent frames (temporal-local band)
2     spatial      frames, tokens          yes         within ±frames frames *and* ±tokens rows and columns (3-D local)
3     temporal     tokens                  yes         the same place ±tokens in every frame (multi-diagonal)
4     sink         sink_frames, frames     yes         the first sink_frames frames (a vertical stripe) plus ±frames
5     stripe       columns                 no          the calibrated key blocks with the most mass (vertical stripes)
====  ===========  ======================  ==========  =================================================================

Distances are measured between the (t, h, w) bounding boxes of the tokens of two blocks, so a geometric type is a
function of the grid: a file calibrated on one grid is **re-derived** for another grid for these types. ``stripe``
holds block indices of the calibration grid: a file that uses it is **refused** on another grid. Block size and tile
order must match the file (they define the blocks the calibration measured).

Calibration (``vidsparse calibrate``, :class:`PatternRecorder`): dense generations run with a recording config; at
every call the exact block masses of each head are measured, and the recall (attention mass kept) of every candidate
pattern is accumulated. Each head then gets the cheapest candidate (lowest density on the calibration grid) whose mean
recall reaches the target, or ``dense`` when none does within ``max_density`` (Sparse-vDiT's "error vs cost" with
recall as the error: the mass a pattern drops bounds the attention-output error it causes).

The file (:class:`PatternFile`) is a safetensors file: tensors ``pattern_ids`` int32 ``[M, L, H]``,
``pattern_params`` int32 ``[M, L, H, 2]``, ``stripe_columns`` uint8 ``[M, L, H, Vb]``, ``recall`` and ``density``
float32 ``[M, L, H]`` (calibrated values), and string metadata: ``format``, ``format_version``, ``model_classes``,
``fingerprints`` (hash of each transformer's config), ``grid``, ``block_size``, ``tile``, ``pattern_types`` and
``calibration`` (settings). It is written atomically and never overwrites a file unless asked to.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vidsparse.layout import VideoLayout
from vidsparse.plan import num_blocks

from . import ModelInfo

#: File format name and version written into the metadata.
FORMAT = "vidsparse-cached-patterns"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class PatternType:
    """One pattern type of the offline mode (see the module docstring)."""

    id: int
    name: str
    params: tuple[str, ...]
    geometric: bool


PATTERN_TYPES: tuple[PatternType, ...] = (
    PatternType(0, "dense", (), True),
    PatternType(1, "window", ("frames",), True),
    PatternType(2, "spatial", ("frames", "tokens"), True),
    PatternType(3, "temporal", ("tokens",), True),
    PatternType(4, "sink", ("sink_frames", "frames"), True),
    PatternType(5, "stripe", ("columns",), False),
)
DENSE, WINDOW, SPATIAL, TEMPORAL, SINK, STRIPE = range(6)
PATTERN_NAMES: dict[int, str] = {p.id: p.name for p in PATTERN_TYPES}

#: Geometric candidates tried by the calibration: (type id, param 0, param 1).
DEFAULT_CANDIDATES: tuple[tuple[int, int, int], ...] = (
    *((WINDOW, f, 0) for f in (0, 1, 2, 3, 4, 6, 8)),
    *((SPATIAL, f, r) for f in (0, 1, 2, 4, 8) for r in (1, 2, 3, 4, 6, 8, 12, 16)),
    *((TEMPORAL, r, 0) for r in (0, 1, 2, 4, 8)),
    *((SINK, 1, f) for f in (0, 1, 2)),
)
#: Fractions of the key blocks tried as data-derived stripes.
DEFAULT_STRIPE_FRACTIONS: tuple[float, ...] = (1 / 32, 1 / 16, 1 / 8, 1 / 4)


# ------------------------------------------------------------------------------------------ geometric patterns
def block_boxes(
    layout: VideoLayout, block_size: int, order: torch.Tensor | None = None, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (t, h, w) bounding box of the tokens of every video block.

    Args:
        layout: Geometry.
        block_size: Tokens per block.
        order: int64 ``[N]`` token order of the blocks (``None``: raster).

    Returns:
        ``(lo, hi)``, int64 ``[Vb, 3]`` each: smallest and largest (t, h, w) of the block's tokens.
    """
    coords = layout.token_coords(device)
    if order is not None:
        coords = coords[order.to(coords.device)]
    n = coords.shape[0]
    vb = num_blocks(n, block_size)
    block = (torch.arange(n, device=coords.device) // block_size)[:, None].expand(-1, 3)
    lo = torch.full((vb, 3), n, dtype=torch.long, device=coords.device).scatter_reduce(0, block, coords, "amin")
    hi = torch.full((vb, 3), -1, dtype=torch.long, device=coords.device).scatter_reduce(0, block, coords, "amax")
    return lo, hi


def box_gaps(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Gap along t, h, w between the boxes of query block ``i`` and key block ``j``: int64 ``[Vb, Vb, 3]``."""
    return torch.clamp(torch.maximum(lo[None, :, :] - hi[:, None, :], lo[:, None, :] - hi[None, :, :]), min=0)


def pattern_masks(
    kinds: torch.Tensor,
    params: torch.Tensor,
    layout: VideoLayout,
    block_size: int,
    *,
    order: torch.Tensor | None = None,
    columns: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """The video block masks of a set of (pattern type, parameters).

    Args:
        kinds: int ``[P]`` pattern type ids.
        params: int ``[P, 2]`` their parameters.
        layout, block_size, order: The blocks (geometry, size, token order).
        columns: bool ``[P, Vb]`` kept key blocks of ``stripe`` entries (needed when there are any).

    Returns:
        bool ``[P, Vb, Vb]`` (the own block is added later by :func:`vidsparse.plan.finalize_plan`).
    """
    lo, hi = block_boxes(layout, block_size, order, device)
    gaps = box_gaps(lo, hi)
    dt, dh, dw = gaps.unbind(-1)
    vb = lo.shape[0]
    kinds, params = kinds.to(device), params.to(device).long()
    out = torch.zeros(kinds.shape[0], vb, vb, dtype=torch.bool, device=device)
    for kind in PATTERN_TYPES:  # a handful of types, each vectorised over its entries
        sel = (kinds == kind.id).nonzero().squeeze(1)
        if sel.numel() == 0:
            continue
        p0, p1 = params[sel, 0, None, None], params[sel, 1, None, None]
        if kind.id == DENSE:
            mask = torch.ones(sel.numel(), vb, vb, dtype=torch.bool, device=device)
        elif kind.id == WINDOW:
            mask = dt <= p0
        elif kind.id == SPATIAL:
            mask = (dt <= p0) & (dh <= p1) & (dw <= p1)
        elif kind.id == TEMPORAL:
            mask = (dh <= p0) & (dw <= p0)
        elif kind.id == SINK:
            mask = (lo[None, None, :, 0] < p0) | (dt <= p1)
        else:
            if columns is None or columns.shape[-1] != vb:
                raise ValueError(f"stripe patterns need columns [P, {vb}] for this geometry.")
            mask = columns.to(device)[sel][:, None, :].expand(-1, vb, -1)
        out[sel] = mask
    return out


# -------------------------------------------------------------------------------------------------- the file
def _grid_text(grid: tuple[int, int, int]) -> str:
    return "x".join(map(str, grid))


def _parse_grid(text: str, what: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split("x"))
    except ValueError as err:
        raise ValueError(f"{what}={text!r} is not of the form TxHxW.") from err
    if len(values) != 3 or min(values) < 1:
        raise ValueError(f"{what}={text!r} is not of the form TxHxW with positive sizes.")
    return values


@dataclass(eq=False)
class PatternFile:
    """Calibrated per-(model, layer, head) patterns (see the module docstring for the meaning of each field).

    Attributes:
        kinds: int32 ``[M, L, H]`` pattern type ids.
        params: int32 ``[M, L, H, 2]`` their parameters.
        columns: bool ``[M, L, H, Vb]`` key blocks of ``stripe`` heads (on the calibration grid).
        recall: float32 ``[M, L, H]`` mean recall of the chosen pattern on the calibration runs.
        density: float32 ``[M, L, H]`` its density on the calibration grid.
        model_classes: Transformer class of each model.
        fingerprints: :func:`vidsparse.integration.model_fingerprint` of each model.
        grid: Calibration latent grid (T', H', W').
        block_size: Tokens per block.
        tile: Token order of the blocks (``None`` = raster).
        info: Calibration settings (prompts, steps, recall target, ...).
        path: Where it was loaded from, if anywhere.
    """

    kinds: torch.Tensor
    params: torch.Tensor
    columns: torch.Tensor
    recall: torch.Tensor
    density: torch.Tensor
    model_classes: tuple[str, ...]
    fingerprints: tuple[str, ...]
    grid: tuple[int, int, int]
    block_size: int
    tile: tuple[int, int, int] | None = None
    info: dict[str, Any] = field(default_factory=dict)
    path: str | None = None

    def __post_init__(self) -> None:
        where = f"patterns file {self.path!r}" if self.path else "patterns"
        if self.kinds.dim() != 3:
            raise ValueError(f"{where}: pattern_ids must be [models, layers, heads]; got {tuple(self.kinds.shape)}.")
        m, nl, h = self.kinds.shape
        vb = num_blocks(self.grid[0] * self.grid[1] * self.grid[2], self.block_size)
        expected = {
            "pattern_params": (self.params, (m, nl, h, 2)),
            "stripe_columns": (self.columns, (m, nl, h, vb)),
            "recall": (self.recall, (m, nl, h)),
            "density": (self.density, (m, nl, h)),
        }
        for name, (tensor, shape) in expected.items():
            if tuple(tensor.shape) != shape:
                raise ValueError(f"{where}: {name} has shape {tuple(tensor.shape)}; expected {shape}.")
        if len(self.model_classes) != m or len(self.fingerprints) != m:
            raise ValueError(
                f"{where}: {m} models in the tensors but {len(self.model_classes)} model classes and "
                f"{len(self.fingerprints)} fingerprints in the metadata."
            )
        if bool(((self.kinds < 0) | (self.kinds >= len(PATTERN_TYPES))).any()):
            raise ValueError(
                f"{where}: pattern_ids outside 0..{len(PATTERN_TYPES) - 1} "
                f"({', '.join(f'{k}={v}' for k, v in PATTERN_NAMES.items())})."
            )
        if bool((self.params < 0).any()):
            raise ValueError(f"{where}: pattern_params must be >= 0.")
        for name, tensor in (("recall", self.recall), ("density", self.density)):
            # NaN compares false with everything: test "inside [0, 1]" rather than "outside", so NaN fails too.
            bad = ~(torch.isfinite(tensor) & (tensor >= 0) & (tensor <= 1))
            if bool(bad.any()):
                first = tuple(int(i) for i in bad.nonzero()[0])
                raise ValueError(
                    f"{where}: {name} must be finite numbers in [0, 1]; {int(bad.sum())} entries are not (first at "
                    f"[model, layer, head] {list(first)}: {float(tensor[first])}): the file is corrupted."
                )
        self.kinds, self.params = self.kinds.to(torch.int32), self.params.to(torch.int32)
        self.columns = self.columns.to(torch.bool)

    # ------------------------------------------------------------------------------------------ description
    @property
    def shape(self) -> tuple[int, int, int]:
        """(models, layers, heads)."""
        return tuple(self.kinds.shape)

    def counts(self) -> dict[str, int]:
        """How many (model, layer, head) entries use each pattern type."""
        return {p.name: int((self.kinds == p.id).sum()) for p in PATTERN_TYPES}

    def uses_stripes(self) -> bool:
        """True when some head uses the data-derived ``stripe`` type (tied to the calibration grid)."""
        return bool((self.kinds == STRIPE).any())

    # ------------------------------------------------------------------------------------------------ checks
    def check_model(self, models: list[ModelInfo], *, block_size: int | None = None) -> None:
        """Raise ``ValueError`` unless the file was calibrated for exactly these transformers (class and config).

        Also checked here, at :func:`vidsparse.apply` rather than at the first sparse step (after the dense
        warm-up): the layer count of each model against the file's, and ``block_size`` (the config's, when given)
        against the file's.
        """
        where = f"patterns file {self.path!r}" if self.path else "patterns"
        if block_size is not None and block_size != self.block_size:
            raise ValueError(
                f"{where} was calibrated with block_size={self.block_size}; the config has "
                f"block_size={block_size}: pass block_size={self.block_size}."
            )
        classes = tuple(m.class_name for m in models)
        if len(models) != len(self.model_classes):
            raise ValueError(
                f"{where} was calibrated for {len(self.model_classes)} transformer(s) "
                f"{list(self.model_classes)}; this pipeline has {len(models)} {list(classes)}."
            )
        for index, (m, cls, fp) in enumerate(zip(models, self.model_classes, self.fingerprints)):
            if m.class_name != cls:
                raise ValueError(f"{where} was calibrated for a {cls} (model {index}); got a {m.class_name}.")
            actual = m.fingerprint
            if actual != fp:
                raise ValueError(
                    f"{where} was calibrated for another {cls} configuration (config fingerprint {fp}, "
                    f"this model's is {actual}: a different size or architecture); run `vidsparse "
                    "calibrate` for this model."
                )
            if m.num_layers > self.shape[1]:
                raise ValueError(
                    f"{where} covers {self.shape[1]} layers per model; model {index} ({cls}) has {m.num_layers} "
                    "attention layers vidsparse makes sparse: the file is corrupted or was edited."
                )

    def check_call(self, *, model: int, layer: int, heads: int | None, layout: VideoLayout, block_size: int) -> None:
        """Raise ``ValueError`` when this call cannot use the file (index, heads, block size, or grid)."""
        where = f"patterns file {self.path!r}" if self.path else "patterns"
        m, nl, h = self.shape
        if not (0 <= model < m and 0 <= layer < nl):
            raise ValueError(f"{where} covers {m} model(s) x {nl} layers; got model {model}, layer {layer}.")
        if heads is not None and heads != h:
            raise ValueError(f"{where} was calibrated for {h} heads per layer; this attention has {heads}.")
        if block_size != self.block_size:
            raise ValueError(
                f"{where} was calibrated with block_size={self.block_size}; the config has "
                f"block_size={block_size}: pass block_size={self.block_size}."
            )
        if layout.grid != self.grid and self.uses_stripes():
            n = int((self.kinds == STRIPE).sum())
            raise ValueError(
                f"{where} was calibrated on the latent grid {_grid_text(self.grid)} and {n} heads use "
                f"the data-derived 'stripe' type, which cannot be re-derived for the grid "
                f"{_grid_text(layout.grid)}; calibrate again at this resolution and frame count "
                "(geometric types alone would be re-derived)."
            )

    # ------------------------------------------------------------------------------------------------- masks
    def video_mask(
        self, model: int, layer: int, layout: VideoLayout, *, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """The video block mask of every head of (model, layer) on ``layout``'s grid: bool ``[1, H, Vb, Vb]``."""
        order = None if self.tile is None else layout.tile_order(self.tile)
        masks = pattern_masks(
            self.kinds[model, layer],
            self.params[model, layer],
            layout,
            self.block_size,
            order=order,
            columns=self.columns[model, layer],
            device=device,
        )
        return masks[None]

    # --------------------------------------------------------------------------------------------------- I/O
    def metadata(self) -> dict[str, str]:
        """The safetensors string metadata of this file."""
        return {
            "format": FORMAT,
            "format_version": str(FORMAT_VERSION),
            "model_classes": json.dumps(list(self.model_classes)),
            "fingerprints": json.dumps(list(self.fingerprints)),
            "grid": _grid_text(self.grid),
            "block_size": str(self.block_size),
            "tile": "none" if self.tile is None else _grid_text(self.tile),
            "pattern_types": json.dumps({p.id: {"name": p.name, "params": list(p.params)} for p in PATTERN_TYPES}),
            "calibration": json.dumps(self.info, default=str),
        }

    def save(self, path: str | os.PathLike, *, force: bool = False) -> Path:
        """Write the file atomically (a temporary file in the same folder, then a rename).

        Raises:
            ValueError: ``path`` exists and ``force`` is False (the existing file is left untouched), or its
                folder does not exist.
        """
        from safetensors.torch import save_file

        path = Path(path)
        if not path.parent.is_dir():
            raise ValueError(f"cannot write {str(path)!r}: the folder {str(path.parent)!r} does not exist.")
        if path.exists() and not force:
            raise ValueError(f"{str(path)!r} exists; pass --force (force=True) to overwrite it.")
        tensors = {
            "pattern_ids": self.kinds.to(torch.int32).contiguous(),
            "pattern_params": self.params.to(torch.int32).contiguous(),
            "stripe_columns": self.columns.to(torch.uint8).contiguous(),
            "recall": self.recall.to(torch.float32).contiguous(),
            "density": self.density.to(torch.float32).contiguous(),
        }
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=self.metadata())
            if force:
                os.replace(tmp, path)
            else:
                try:
                    os.link(tmp, path)  # atomic "create, never overwrite": a file that appeared meanwhile survives
                except FileExistsError as err:
                    raise ValueError(f"{str(path)!r} exists; pass --force (force=True) to overwrite it.") from err
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        self.path = str(path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> PatternFile:
        """Read and validate a pattern file; every problem is a ``ValueError`` that names the file and the fix."""
        from safetensors import safe_open

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise ValueError(f"patterns file {path!r} does not exist (make one with `vidsparse calibrate`).")
        try:
            with safe_open(path, framework="pt") as handle:
                meta = dict(handle.metadata() or {})
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        except Exception as err:  # safetensors raises its own error types for truncated or foreign files
            raise ValueError(
                f"patterns file {path!r} is not a readable safetensors file ({err}); it is truncated "
                "or corrupted: make it again with `vidsparse calibrate`."
            ) from err
        if meta.get("format") != FORMAT:
            raise ValueError(
                f"{path!r} is not a vidsparse pattern file (metadata format={meta.get('format')!r}, "
                f"expected {FORMAT!r})."
            )
        version = meta.get("format_version")
        if version != str(FORMAT_VERSION):
            raise ValueError(
                f"patterns file {path!r} has format version {version!r}; this vidsparse reads version "
                f"{FORMAT_VERSION}: calibrate again with this version."
            )
        missing = sorted({"pattern_ids", "pattern_params", "stripe_columns", "recall", "density"} - set(tensors))
        missing += sorted({"model_classes", "fingerprints", "grid", "block_size", "tile"} - set(meta))
        if missing:
            raise ValueError(f"patterns file {path!r} lacks {', '.join(missing)}: it is incomplete or corrupted.")
        try:
            classes = tuple(json.loads(meta["model_classes"]))
            fingerprints = tuple(json.loads(meta["fingerprints"]))
            info = json.loads(meta.get("calibration", "{}"))
            block_size = int(meta["block_size"])
        except (ValueError, TypeError) as err:
            raise ValueError(f"patterns file {path!r} has unreadable metadata ({err}).") from err
        grid = _parse_grid(meta["grid"], f"{path!r} grid")
        tile = None if meta["tile"] == "none" else _parse_grid(meta["tile"], f"{path!r} tile")
        for name in ("pattern_ids", "pattern_params"):
            if tensors[name].dtype != torch.int32:
                raise ValueError(f"patterns file {path!r}: {name} must be int32; got {tensors[name].dtype}.")
        return cls(
            tensors["pattern_ids"],
            tensors["pattern_params"],
            tensors["stripe_columns"],
            tensors["recall"],
            tensors["density"],
            classes,
            fingerprints,
            grid,
            block_size,
            tile,
            info,
            path,
        )


def load_patterns(path: str | os.PathLike) -> PatternFile:
    """:meth:`PatternFile.load`, cached per (file, modification time, size): a rewritten file is read again."""
    path = os.fspath(path)
    try:
        stat = os.stat(path)
    except OSError as err:
        raise ValueError(f"patterns file {path!r} cannot be read ({err.strerror}).") from err
    return _load_cached(os.path.realpath(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def _load_cached(path: str, mtime_ns: int, size: int) -> PatternFile:
    return PatternFile.load(path)


# ---------------------------------------------------------------------------------------------- calibration
def active_recorder(recorder: PatternRecorder) -> PatternRecorder:
    """``recorder`` itself, checked to be inside its ``with`` block (its type is checked by ``CachedConfig``)."""
    if not recorder.active:
        raise ValueError(
            f"calibration={recorder!r} is not an active PatternRecorder (use it inside `with "
            "PatternRecorder() as recorder:` and pass calibration=recorder)."
        )
    return recorder


@dataclass
class _LayerStats:
    """Running sums of one (model, layer) during calibration (float64, on the CPU: they are small)."""

    recall: torch.Tensor  # [H, C] candidate recalls, summed over calls
    columns: torch.Tensor  # [H, Vb] mean-over-rows mass of each key block, summed
    own: torch.Tensor  # [H, Vb] mass of each query block on its own block, summed
    calls: int = 0


class PatternRecorder:
    """Collects, per (model, layer, head), what the classification needs from dense calibration runs.

    Use as a context manager (it records while inside its ``with`` block) and run the pipeline with
    ``vidsparse.apply(pipe, "cached", calibration=recorder, ...)``; then :meth:`classify`. The config holds the
    recorder itself, so its state belongs to whoever made it (no process-wide registry); copies of the config (its
    ``to_dict``, ``replace``) share the one recorder.

    Args:
        candidates: Geometric candidates ``(type id, param 0, param 1)``.
        stripe_fractions: Fractions of the key blocks tried as ``stripe`` patterns (empty: no stripes).
    """

    def __init__(
        self,
        candidates: tuple[tuple[int, int, int], ...] = DEFAULT_CANDIDATES,
        stripe_fractions: tuple[float, ...] = DEFAULT_STRIPE_FRACTIONS,
    ) -> None:
        self.active = False
        self.candidates = torch.tensor(candidates, dtype=torch.int32).reshape(-1, 3)
        self.stripe_fractions = tuple(stripe_fractions)
        self.layout: VideoLayout | None = None
        self.block_size: int | None = None
        self.tile: tuple[int, int, int] | None = None
        self._candidate_masks: torch.Tensor | None = None  # float32 [C, Vb, Vb] on the recording device
        self.stats: dict[tuple[int, int], _LayerStats] = {}

    def __enter__(self) -> PatternRecorder:
        self.active = True
        return self

    def __exit__(self, *exc: Any) -> None:
        self.active = False

    def __deepcopy__(self, memo: dict) -> PatternRecorder:
        return self  # a live collector is shared, never copied (dataclasses.asdict deep-copies field values)

    def __repr__(self) -> str:
        state = "active" if self.active else "inactive"
        return f"PatternRecorder({state}, {len(self.stats)} layers recorded)"

    def record(
        self,
        model: int,
        layer: int,
        mass: torch.Tensor,
        layout: VideoLayout,
        *,
        block_size: int,
        tile: tuple[int, int, int] | None,
    ) -> None:
        """Add one call's exact block masses (float32 ``[B, H, Vb, Vb]``, rows sum to 1) of (model, layer)."""
        if self.layout is None:
            self.layout, self.block_size, self.tile = layout, block_size, tile
        elif (layout.grid, block_size, tile) != (self.layout.grid, self.block_size, self.tile):
            raise ValueError(
                f"calibration runs must share one geometry: got {layout.describe()} (block "
                f"{block_size}, tile {tile}) after {self.layout.describe()} (block {self.block_size}, "
                f"tile {self.tile})."
            )
        if self._candidate_masks is None or self._candidate_masks.device != mass.device:
            order = None if tile is None else layout.tile_order(tile)
            kinds, params = self.candidates[:, 0], self.candidates[:, 1:]
            self._candidate_masks = pattern_masks(
                kinds, params, layout, block_size, order=order, device=mass.device
            ).float()
        vb = mass.shape[-1]
        own = torch.eye(vb, dtype=torch.bool, device=mass.device)
        recalls = []
        for chunk in self._candidate_masks.split(8):  # bounded memory: 8 candidate masks at a time
            kept = (chunk + own).clamp(max=1)  # every plan keeps the own block
            recalls.append(torch.einsum("bhij,cij->bhc", mass, kept))
        recall = torch.cat(recalls, -1).sum(0).double().cpu() / vb  # [H, C], summed over the batch
        columns = mass.mean(2).sum(0).double().cpu()
        own_mass = mass.diagonal(dim1=-2, dim2=-1).sum(0).double().cpu()
        stats = self.stats.get((model, layer))
        if stats is None:
            stats = self.stats[(model, layer)] = _LayerStats(
                torch.zeros_like(recall), torch.zeros_like(columns), torch.zeros_like(own_mass)
            )
        stats.recall += recall
        stats.columns += columns
        stats.own += own_mass
        stats.calls += mass.shape[0]

    def candidate_densities(self) -> torch.Tensor:
        """float64 ``[C]``: density of each geometric candidate on the calibration grid (own block included)."""
        vb = self._candidate_masks.shape[-1]
        own = torch.eye(vb, device=self._candidate_masks.device)
        return (self._candidate_masks + own).clamp(max=1).mean((-1, -2)).double().cpu()

    def classify(
        self,
        models: list[ModelInfo],
        *,
        recall: float = 0.9,
        max_density: float = 0.5,
        info: dict[str, Any] | None = None,
    ) -> PatternFile:
        """Choose each head's pattern: the lowest-density candidate whose mean recall reaches ``recall``.

        Heads where no candidate reaches it at ``max_density`` or less stay dense; layers never recorded (e.g. an
        expert of Wan 2.2 that did not run) stay dense too.

        Args:
            models: The transformers calibrated, described by :func:`vidsparse.integration.describe_models` (their
                classes and config fingerprints go into the file; the layer count sizes it).
            recall: Target fraction of the attention mass kept.
            max_density: Densest pattern worth using instead of dense attention.
            info: Extra calibration settings written into the file.
        """
        if not self.stats:
            raise ValueError("nothing was recorded: no sparse-eligible attention call ran during calibration.")
        layers = max(m.num_layers for m in models)
        heads = next(iter(self.stats.values())).recall.shape[0]
        vb = next(iter(self.stats.values())).columns.shape[1]
        m = len(models)
        kinds = torch.zeros(m, layers, heads, dtype=torch.int32)
        params = torch.zeros(m, layers, heads, 2, dtype=torch.int32)
        columns = torch.zeros(m, layers, heads, vb, dtype=torch.bool)
        recalls = torch.ones(m, layers, heads)
        densities = torch.ones(m, layers, heads)
        cand_density = self.candidate_densities()
        for (model, layer), stats in self.stats.items():  # one entry per (model, layer)
            cand_recall = stats.recall / stats.calls  # [H, C]
            stripe_recall, stripe_density, stripe_cols = self._stripes(stats)
            all_recall = torch.cat([cand_recall, stripe_recall], 1)
            all_density = torch.cat([cand_density.expand(heads, -1), stripe_density], 1)
            feasible = (all_recall >= recall) & (all_density <= max_density)
            # Cheapest feasible pattern; among equally dense ones the higher recall.
            score = torch.where(feasible, all_density - 1e-9 * all_recall, torch.full_like(all_density, 2.0))
            best = score.argmin(1)
            chosen = feasible.any(1)
            n_cand = cand_recall.shape[1]
            for h in range(heads):  # a handful of heads per layer: plain bookkeeping
                if not bool(chosen[h]):
                    continue
                c = int(best[h])
                if c < n_cand:
                    kinds[model, layer, h] = int(self.candidates[c, 0])
                    params[model, layer, h] = self.candidates[c, 1:]
                else:
                    kinds[model, layer, h] = STRIPE
                    params[model, layer, h, 0] = int(stripe_cols[h, c - n_cand].sum())
                    columns[model, layer, h] = stripe_cols[h, c - n_cand]
                recalls[model, layer, h] = float(all_recall[h, c])
                densities[model, layer, h] = float(all_density[h, c])
        return PatternFile(
            kinds,
            params,
            columns,
            recalls,
            densities,
            tuple(m.class_name for m in models),
            tuple(m.fingerprint for m in models),
            self.layout.grid,
            self.block_size,
            self.tile,
            {
                "recall_target": recall,
                "max_density": max_density,
                "calls_per_layer": max(s.calls for s in self.stats.values()),
                "layers_recorded": len(self.stats),
                **(info or {}),
            },
        )

    def _stripes(self, stats: _LayerStats) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Recall, density and columns of the stripe candidates of one layer.

        A stripe keeps the ``n`` key blocks with the most mean mass for every query block, plus its own block. Its
        recall is exact from the running sums: the mean over rows of the mass in the columns, plus the own-block
        mass of the rows whose own block is not a column.

        Returns:
            ``(recall [H, F], density [H, F], columns bool [H, F, Vb])`` for the ``F`` stripe fractions.
        """
        colmean = stats.columns / stats.calls  # [H, Vb]
        own = stats.own / stats.calls
        heads, vb = colmean.shape
        if not self.stripe_fractions:
            empty = torch.zeros(heads, 0, dtype=torch.float64)
            return empty, empty, torch.zeros(heads, 0, vb, dtype=torch.bool)
        counts = [min(vb, max(1, round(f * vb))) for f in self.stripe_fractions]
        ranked = colmean.argsort(dim=1, descending=True)
        rank_of = ranked.argsort(dim=1)  # rank of every column
        cols = torch.stack([rank_of < n for n in counts], 1)  # [H, F, Vb]
        recall = (colmean[:, None] * cols).sum(-1) + (own[:, None] * ~cols).sum(-1) / vb
        n = torch.tensor(counts, dtype=torch.float64)
        density = ((n * vb + (vb - n)) / (vb * vb)).expand(heads, -1)
        return recall, density, cols
