"""The attention share of real checkpoints counted in FLOPs, and the published speed-ups set against its bound.

Timing a 14B model at 75 600 tokens is out of reach on a CPU, but counting its work is not: the checkpoint's
diffusers class (:mod:`vidsparse.eval.model_shapes`) runs one forward on the ``meta`` device under torch's
``FlopCounterMode``, which records the FLOPs of every matmul per module without allocating a tensor, so the whole
model at its full depth is counted in seconds. Of each sparse self-attention module's FLOPs, the attention core
(the batched matmuls ``QKᵀ`` and ``PV``) is what a block-sparse method cuts, and of that only the video→video part
(text rows and columns stay dense: a fraction ``N² / (N + T)²``).

The **FLOP share** is that video→video core over the whole forward. It is the time share a GPU would show if its
attention kernel ran at the same FLOP rate as its GEMMs; a real FlashAttention runs somewhat below the GEMM rate,
so the time share on a GPU is at least this (measure it there with ``vidsparse bench e2e --config NAME --device
cuda``). The **FLOP bound** of a method at a density is Amdahl's law over that share, with the method's dense
warm-up counted over the pipeline's schedule (:func:`vidsparse.eval.bench.schedule_effective_density`).

:data:`PUBLISHED` holds what each paper reports for a model (speed-up, density, warm-up, GPU, and its own FLOP
counts where it gives them), so :func:`claims_report` shows next to each claim the FLOP bound at the paper's own
density and warm-up, and how the paper's dense FLOPs compare with this count (a check of the count itself).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from vidsparse.config import SparseConfig
from vidsparse.methods import parse_method_spec

from .bench import BOUND_DENSITIES, amdahl_bound, schedule_effective_density
from .model_shapes import ModelShape, build_model, forward_inputs, get_shape, schedule_timesteps

#: Matmul ops of the attention core (``QKᵀ``, ``PV``) when torch's SDPA decomposes on the meta device.
CORE_OPS = ("aten.bmm", "aten.baddbmm")


@contextlib.contextmanager
def _meta_friendly() -> Iterator[None]:
    """Let the few model lines that refuse the meta device run there.

    Mochi's rotary embedding opens ``torch.autocast(freqs.device.type, ...)`` (autocast has no 'meta' device: it is
    entered as a disabled CPU autocast instead) and its text path calls ``nonzero`` on the text mask (all text
    tokens are valid here, which torch's meta ``nonzero`` assumes when told to).
    """
    import torch.fx.experimental._config as fx_config

    real = torch.autocast

    class _Autocast(real):  # type: ignore[misc, valid-type]
        def __init__(self, device_type: str, *args: Any, **kwargs: Any) -> None:
            if device_type == "meta":
                device_type, args, kwargs = "cpu", (), {"enabled": False}
            super().__init__(device_type, *args, **kwargs)

    torch.autocast = _Autocast
    try:
        with fx_config.patch(meta_nonzero_assume_all_nonzero=True):
            yield
    finally:
        torch.autocast = real


def _count(shape: ModelShape, layers: int | None, grid: tuple[int, int, int]) -> tuple[float, float, bool]:
    """One forward, batch 1: (total FLOPs, attention-core FLOPs of the sparse modules, text in their sequence?)."""
    from torch.utils.flop_counter import FlopCounterMode

    from vidsparse.pipelines.registry import adapter_for

    with _meta_friendly():
        with torch.device("meta"):
            model = build_model(shape, layers)
        inputs = forward_inputs(shape, model, grid, device=torch.device("meta"), dtype=torch.float32)
        counter = FlopCounterMode(display=False, depth=None)
        with counter, torch.no_grad():
            model(**inputs, return_dict=False)
    counts = counter.get_flop_counts()
    root = type(model).__name__
    adapter = adapter_for(model)
    total = float(sum(counts["Global"].values()))
    core = 0.0
    for name, *_ in adapter.attention_modules(model):
        ops = counts.get(f"{root}.{name}", {})
        core += float(sum(v for op, v in ops.items() if str(op) in CORE_OPS))
    return total, core, adapter.text_position != "none"


@dataclass(frozen=True)
class FlopCount:
    """FLOPs of one forward (batch 1) of a full-depth checkpoint at one token grid.

    Attributes:
        total: Every counted FLOP of the forward (matmuls and convolutions; elementwise work is not counted).
        attention_core: ``QKᵀ`` and ``PV`` of every sparse self-attention module, text included.
        video_core: The video→video part of ``attention_core``: what a block-sparse method scales by its density.
        tokens: Video tokens; ``text_tokens``: text tokens in the self-attention sequence (0 for Wan, LTX).
    """

    total: float
    attention_core: float
    video_core: float
    tokens: int
    text_tokens: int

    @property
    def share(self) -> float:
        """The FLOP share: video→video attention core / whole forward."""
        return self.video_core / self.total


def count_flops(shape: ModelShape, grid: tuple[int, int, int] | None = None) -> FlopCount:
    """Count one forward of ``shape``'s full-depth transformer at ``grid`` (default: its published grid).

    The full model is built on the meta device (no weights are allocated, so a 14B model costs nothing).
    """
    grid = tuple(grid or shape.grid)
    total, core, joint = _count(shape, None, grid)
    tokens = grid[0] * grid[1] * grid[2]
    text = shape.text_tokens if joint else 0  # cross-attention families keep text out of the self-attention
    return FlopCount(total, core, core * tokens**2 / (tokens + text) ** 2, tokens, text)


def bounds_for(
    shape: ModelShape, count: FlopCount, config: SparseConfig, densities: Sequence[float], steps: int | None = None
) -> list[dict[str, float]]:
    """The FLOP bound of ``config``'s method (with its dense warm-up) at each density, over the pipeline's schedule."""
    steps = steps or shape.steps
    timesteps = schedule_timesteps(steps, shape.shift)
    rows = []
    for density in densities:
        effective = schedule_effective_density(
            config, density, depth=shape.depth, steps=steps, timesteps=timesteps, tokens=count.tokens
        )
        rows.append(
            {
                "density": density,
                "step_bound": amdahl_bound(count.share, density),
                "effective_density": effective,
                "schedule_bound": amdahl_bound(count.share, effective),
            }
        )
    return rows


def flops_report(
    names: Sequence[str],
    *,
    methods: Sequence[str] = ("radial",),
    densities: Sequence[float] = BOUND_DENSITIES,
    grid: tuple[int, int, int] | None = None,
    progress: Any = print,
) -> dict[str, Any]:
    """Per checkpoint config: dense FLOPs of a forward, the FLOP share, the bounds of each method at each density."""
    say = progress or (lambda _line: None)
    configs = {spec: parse_method_spec(spec, where=f"method {spec!r}") for spec in methods}
    rows = []
    for name in names:
        shape = get_shape(name)
        count = count_flops(shape, grid)
        row = {
            "config": name,
            "source": shape.source,
            "published_shape": shape.resolution,
            "grid": list(grid or shape.grid),
            "tokens": count.tokens,
            "text_tokens": count.text_tokens,
            "depth": shape.depth,
            "steps": shape.steps,
            "dense_tflops_per_forward": count.total / 1e12,
            "attention_core_share": count.attention_core / count.total,
            "flop_share": count.share,
            "bounds": {spec: bounds_for(shape, count, config, densities) for spec, config in configs.items()},
        }
        rows.append(row)
        say(
            f"{name:16s} {count.tokens:7d} tokens  {count.total / 1e12:9.1f} TFLOP/forward  "
            f"FLOP share {count.share:.3f}  "
            + "  ".join(f"{b['density']}: {b['schedule_bound']:.2f}x" for b in row["bounds"][methods[0]])
        )
    return {"kind": "FLOP count on the meta device (no timing)", "methods": list(methods), "rows": rows}


@dataclass(frozen=True)
class PublishedResult:
    """One end-to-end speed-up a paper reports, with what is needed to put the FLOP bound next to it.

    Attributes:
        method: The paper's method as vidsparse names it (``sparse-vdit`` is ``cached:patterns=``).
        config: The ``--config`` of the checkpoint the paper ran.
        grid: Latent token grid of the paper's shape; ``shape``: as the paper states it.
        gpu: The GPU it was measured on.
        speedup: The end-to-end speed-up reported.
        spec: The paper's density and dense warm-up as a vidsparse method spec (``None``: not published).
        paper_flops: The paper's own dense and sparse FLOPs (any unit, same for both), and how many forwards they
            cover (``forwards``: steps x CFG passes), when it gives them.
        source: Where the numbers come from (paper table, as summarised in the project's research notes).
    """

    method: str
    config: str
    grid: tuple[int, int, int]
    shape: str
    gpu: str
    speedup: float
    spec: str | None
    source: str
    paper_flops: tuple[float, float] | None = None
    forwards: int | None = None


#: What the papers report. Densities are 1 - the paper's sparsity; warm-ups as each paper's scripts set them.
PUBLISHED: tuple[PublishedResult, ...] = (
    PublishedResult(
        "radial",
        "hunyuanvideo",
        (30, 48, 80),
        "768x1280, 117 frames, 50 steps",
        "H100",
        1.88,
        "radial:density=0.275,dense_steps=12,dense_layers=0",
        "Radial Attention, Table 1 (612 -> 339 PFLOPs)",
        (612e15, 339e15),
        50,
    ),
    PublishedResult(
        "radial",
        "wan2.1-14b",
        (18, 48, 80),
        "768x1280, 69 frames, 50 steps",
        "H100",
        1.77,
        "radial:density=0.287,dense_steps=12,dense_layers=1",
        "Radial Attention, Table 1 (560 -> 323 PFLOPs)",
        (560e15, 323e15),
        100,
    ),
    PublishedResult(
        "draft",
        "hunyuanvideo",
        (33, 48, 80),
        "768x1280, 128 frames, 50 steps",
        "H100",
        1.75,
        "draft:density=0.1,dense_above_timestep=945,dense_layers=2",
        "DraftAttention, end-to-end table (90 %)",
    ),
    PublishedResult(
        "draft",
        "wan2.1-14b",
        (21, 48, 80),
        "768x1280, 80 frames, 50 steps",
        "H100",
        1.42,
        "draft:density=0.25,dense_above_timestep=925,dense_layers=1",
        "DraftAttention, end-to-end table (75 %)",
    ),
    PublishedResult(
        "sparse-vdit",
        "hunyuanvideo",
        (33, 45, 80),
        "1280x720, 129 frames",
        "A800",
        1.85,
        None,
        "Sparse-vDiT, Table (612.37 -> 257.09 PFLOPs)",
        (612.37e15, 257.09e15),
        50,
    ),
    PublishedResult(
        "sparse-vdit",
        "wan2.1-14b",
        (21, 45, 80),
        "1280x720, 81 frames",
        "H800",
        1.58,
        None,
        "Sparse-vDiT, Table (660.49 -> 397.39 PFLOPs)",
        (660.49e15, 397.39e15),
        100,
    ),
    PublishedResult(
        "moba",
        "wan2.1-1.3b",
        (21, 45, 80),
        "1280x720, 81 frames (training-free)",
        "not stated",
        1.35,
        None,
        "VMoBA, inference table (1246.78T -> 519.75T FLOPs per forward)",
        (1246.78e12, 519.75e12),
        1,
    ),
    PublishedResult(
        "moba",
        "wan2.1-1.3b",
        (21, 30, 52),
        "832x480, 81 frames (training-free)",
        "not stated",
        1.01,
        None,
        "VMoBA, inference table (282.64T -> 149.00T FLOPs per forward)",
        (282.64e12, 149.00e12),
        1,
    ),
    PublishedResult(
        "cached",
        "hunyuanvideo",
        (31, 45, 80),
        "720p, 8 s (about 110K tokens), 50 steps",
        "A100",
        1.78,
        "cached:density=0.2,dense_steps=10",
        "AdaSpa, Table 1 (sparsity 0.8, 10 dense steps)",
    ),
)


def claims_report(results: Sequence[PublishedResult] = PUBLISHED, progress: Any = print) -> dict[str, Any]:
    """Each published speed-up next to the FLOP bound at the paper's own density and warm-up.

    Where the paper gives its FLOPs, its FLOP ratio (dense / sparse) is the bound by its own count, and its dense
    FLOPs per forward are compared with this module's count of the same model and shape (``count_vs_paper``).
    """
    say = progress or (lambda _line: None)
    rows = []
    for claim in results:
        shape = get_shape(claim.config)
        count = count_flops(shape, claim.grid)
        bound = None
        if claim.spec is not None:
            config = parse_method_spec(claim.spec, where=f"published spec {claim.spec!r}")
            bound = bounds_for(shape, count, config, [config.density])[0]
        paper_ratio = paper_per_forward = None
        if claim.paper_flops is not None:
            paper_ratio = claim.paper_flops[0] / claim.paper_flops[1]
            paper_per_forward = claim.paper_flops[0] / claim.forwards
        flop_bound = bound["schedule_bound"] if bound else paper_ratio
        rows.append(
            {
                "method": claim.method,
                "config": claim.config,
                "shape": claim.shape,
                "grid": list(claim.grid),
                "tokens": count.tokens,
                "gpu": claim.gpu,
                "published_speedup": claim.speedup,
                "spec": claim.spec,
                "source": claim.source,
                "flop_share": count.share,
                "our_bound": bound,
                "paper_flop_ratio": paper_ratio,
                "dense_tflops_per_forward": count.total / 1e12,
                "paper_dense_tflops_per_forward": None if paper_per_forward is None else paper_per_forward / 1e12,
                "count_vs_paper": None if paper_per_forward is None else count.total / paper_per_forward,
                "fraction_of_flop_bound": None if flop_bound is None else claim.speedup / flop_bound,
            }
        )
        say(
            f"{claim.method:12s} {claim.config:13s} {count.tokens:7d} tokens  published {claim.speedup:.2f}x  "
            f"FLOP bound {flop_bound or float('nan'):.2f}x  share {count.share:.3f}"
            + ("" if paper_per_forward is None else f"  dense FLOPs ours/paper {count.total / paper_per_forward:.2f}")
        )
    return {"kind": "published speed-ups vs the FLOP bound", "rows": rows}
