"""Speed benchmarks: sparse attention vs dense SDPA, as ratios measured in one run.

This machine (and every shared machine) is noisy, so absolute times mean little: every number here is a ratio of
two timings taken back to back in the same process — dense vs sparse — and set against the ideal 1/density.

- :func:`bench_attention`: one attention call at realistic geometries, per method and density: dense SDPA time,
  planning time, sparse attention time, speed-up = dense / (plan + sparse), ideal = 1 / density,
  efficiency = speed-up / ideal. Compile time (first call of a shape) is reported separately.
- :func:`bench_e2e`: a few denoising steps of an attention-dominated ``WanTransformer3DModel`` (real diffusers
  class), dense vs each method with its default warm-up, against the Amdahl bound computed from the measured
  attention share and density.

Timing: a warm-up call, then the median of ``repeats`` calls; ``torch.cuda.synchronize`` around each on CUDA.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from vidsparse.config import SparseConfig
from vidsparse.kernels import block_sparse_attention, resolve_backend
from vidsparse.layout import VideoLayout
from vidsparse.methods import PlanContext, build_plan

from .synthetic import synthetic_qkv

#: Default geometries (latent token grids): Wan 480p at 33 frames (14 040 tokens) and 81 frames (32 760 tokens).
DEFAULT_GEOMETRIES: tuple[tuple[int, int, int], ...] = ((9, 30, 52), (21, 30, 52))
DEFAULT_DENSITIES: tuple[float, ...] = (0.1, 0.25, 0.5)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], Any], device: torch.device, repeats: int = 3, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in milliseconds over ``repeats`` calls, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def environment(device: torch.device) -> dict[str, Any]:
    """Versions and device description for a report."""
    import diffusers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return {
        "device": f"{device.type}: {name}",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
    }


def _bench_layout(
    configs: Sequence[SparseConfig],
    layout: VideoLayout,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    repeats: int,
    device: torch.device,
    backend: str,
    progress: Callable[[str], None] | None,
) -> list[dict[str, Any]]:
    """Rows of :func:`bench_attention` for one geometry (inputs already built)."""
    backend_name = resolve_backend(backend, device)
    rows = []
    dense_ms = time_ms(lambda: dense_sdpa(q, k, v), device, repeats)
    for config in configs:
        ctx = PlanContext(layer=0, step=0)
        start = time.perf_counter()
        plan = build_plan(config, q, k, layout, ctx)
        _sync(device)
        plan_first_ms = (time.perf_counter() - start) * 1000
        plan_ms = time_ms(lambda cfg=config, c=ctx: build_plan(cfg, q, k, layout, c), device, repeats, 0)
        start = time.perf_counter()
        block_sparse_attention(q, k, v, plan, backend=backend)  # compiles a new shape
        _sync(device)
        compile_s = time.perf_counter() - start
        attn_ms = time_ms(lambda p=plan: block_sparse_attention(q, k, v, p, backend=backend), device, repeats)
        # A second dense timing right after: the ratio uses the mean of the two, so drift in machine load during the
        # sparse timings does not bias it.
        dense_after = time_ms(lambda: dense_sdpa(q, k, v), device, repeats, 0)
        dense_pair = (dense_ms + dense_after) / 2
        density = plan.density()
        speedup = dense_pair / (plan_ms + attn_ms)
        rows.append(
            {
                "method": config.method,
                "config": config.to_dict(),
                "backend": backend_name,
                "geometry": list(layout.grid),
                "tokens": layout.seq_len,
                "heads": q.shape[2],
                "head_dim": q.shape[3],
                "density": density,
                "dense_ms": dense_pair,
                "plan_ms": plan_ms,
                "plan_first_ms": plan_first_ms,
                "attn_ms": attn_ms,
                "compile_s": compile_s,
                "speedup": speedup,
                "ideal": 1.0 / density,
                "efficiency": speedup * density,
            }
        )
        dense_ms = dense_after
        if progress:
            progress(
                f"{config.method:8s} {layout.seq_len:6d} tok  density {density:.3f}  dense {dense_pair:8.1f} ms"
                f"  plan {plan_ms:7.2f} ms  sparse {attn_ms:8.1f} ms  speed-up {speedup:5.2f}x"
                f" (ideal {1 / density:5.2f}x, efficiency {speedup * density:.2f})"
            )
    return rows


def dense_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Dense attention with torch SDPA on ``[B, S, H, D]`` inputs (the baseline every speed-up is measured against)."""
    out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def bench_attention(
    configs: Sequence[SparseConfig],
    geometries: Sequence[tuple[int, int, int]] = DEFAULT_GEOMETRIES,
    *,
    heads: int = 2,
    head_dim: int = 64,
    repeats: int = 3,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    backend: str = "auto",
    progress: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Time dense SDPA vs planning + sparse attention for every config at every geometry.

    Args:
        configs: Method configs (each with its density).
        geometries: Latent grids (T', H', W').
        heads, head_dim: Attention shape (B = 1).
        repeats: Timed calls per measurement (median).
        device, dtype: Where and in what precision to run.
        backend: Executor for the sparse calls.
        progress: Called with one line per result (None: silent).

    Returns:
        ``{"device", "torch", ..., "results": [{"method", "config", "density", "tokens", "dense_ms", "plan_ms",
        "plan_first_ms", "attn_ms", "compile_s", "speedup", "ideal", "efficiency"}, ...]}``.
    """
    device = torch.device(device)
    results: list[dict[str, Any]] = []
    for grid in geometries:
        layout = VideoLayout(*grid)
        q, k, v = (x.to(device=device, dtype=dtype) for x in synthetic_qkv(layout, heads=heads, head_dim=head_dim))
        with torch.no_grad():
            results.extend(_bench_layout(configs, layout, q, k, v, repeats, device, backend, progress))
    return {**environment(device), "dtype": str(dtype).replace("torch.", ""), "results": results}
