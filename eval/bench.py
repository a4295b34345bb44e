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

import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from vidsparse.config import SparseConfig
from vidsparse.kernels.dispatch import block_sparse_attention, resolve_backend
from vidsparse.layout import VideoLayout
from vidsparse.methods import PlanContext, build_plan, get_method, method_names
from vidsparse.plan import BlockPlan

from .specs import canonical_spec
from .synthetic import synthetic_qkv
from .timing import synchronize

#: Default geometries (latent token grids): Wan 480p at 33 frames (14 040 tokens) and 81 frames (32 760 tokens).
DEFAULT_GEOMETRIES: tuple[tuple[int, int, int], ...] = ((9, 30, 52), (21, 30, 52))
DEFAULT_DENSITIES: tuple[float, ...] = (0.1, 0.25, 0.5)


def time_ms(fn: Callable[[], Any], device: torch.device, repeats: int = 3, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in milliseconds over ``repeats`` calls, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    return time_interleaved({"fn": fn}, device, repeats)["fn"]


def time_rounds(fns: dict[str, Callable[[], Any]], device: torch.device, repeats: int = 3) -> dict[str, list[float]]:
    """Wall times (ms) of each function in ``repeats`` rounds that call every function once, in order.

    On a shared machine the load drifts over seconds; timing A three times and then B three times lets a burst of
    load fall on one of them only, and the ratio A/B moves with it. Interleaved rounds spread any drift over all the
    functions alike, so their ratios hold, and the ratio within one round shows how much a burst moved it. No
    warm-up here: call each function once before.

    Returns:
        ``{name: [ms of round 0, round 1, ...]}``.
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append((time.perf_counter() - start) * 1000)
    return times


def time_interleaved(fns: dict[str, Callable[[], Any]], device: torch.device, repeats: int = 3) -> dict[str, float]:
    """Median wall time (ms) of each function over the interleaved rounds of :func:`time_rounds`."""
    return {name: statistics.median(values) for name, values in time_rounds(fns, device, repeats).items()}


def environment(device: torch.device) -> dict[str, Any]:
    """Versions, device and machine load for a benchmark report (the eval runs' record plus the load average)."""
    from .results import environment as run_environment

    env = run_environment(device)
    env["device"] = f"{device.type}: {env['device_name']}"
    env["load_average"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return env


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
    backend_name = resolve_backend(backend, device, q.dtype)
    rows = []
    dense_sdpa(q, k, v)  # warm-up
    for config in configs:
        ctx = PlanContext(layer=0, step=0)
        start = time.perf_counter()
        plan = build_plan(config, q, k, layout, ctx)
        synchronize(device)
        plan_first_ms = (time.perf_counter() - start) * 1000
        start = time.perf_counter()
        block_sparse_attention(q, k, v, plan, backend=backend)  # compiles a new shape
        synchronize(device)
        compile_s = time.perf_counter() - start
        if get_method(config.method).static:
            attend = lambda p=plan: block_sparse_attention(q, k, v, p, backend=backend)  # noqa: E731
        else:
            # A dynamic method makes a new plan every call: time the executor on a fresh copy each time, so work it
            # caches per plan object (the gather executor's schedule) is charged, as in a real run.
            attend = lambda p=plan: block_sparse_attention(q, k, v, fresh_copy(p), backend=backend)  # noqa: E731
        attend()  # warm-up of the timed path
        # Dense, planning and sparse attention timed in interleaved rounds, so load drift hits all three alike.
        rounds = time_rounds(
            {
                "dense": lambda: dense_sdpa(q, k, v),
                "plan": lambda cfg=config, c=ctx: build_plan(cfg, q, k, layout, c),
                "attn": attend,
            },
            device,
            repeats,
        )
        dense_ms, plan_ms, attn_ms = (statistics.median(rounds[name]) for name in ("dense", "plan", "attn"))
        density = plan.density()
        speedup = dense_ms / (plan_ms + attn_ms)
        rows.append(
            {
                "method": config.method,
                "spec": canonical_spec(config),
                "config": config.to_dict(),
                "backend": backend_name,
                "geometry": list(layout.grid),
                "tokens": layout.seq_len,
                "heads": q.shape[2],
                "head_dim": q.shape[3],
                "density": density,
                "dense_ms": dense_ms,
                "plan_ms": plan_ms,
                "plan_first_ms": plan_first_ms,
                "attn_ms": attn_ms,
                "compile_s": compile_s,
                "speedup": speedup,
                "ideal": 1.0 / density,
                "efficiency": speedup * density,
                # Each round's own dense / (plan + sparse) x density: the spread the load put on the median above.
                "efficiency_rounds": [
                    dense * density / (plan_t + attn_t)
                    for dense, plan_t, attn_t in zip(rounds["dense"], rounds["plan"], rounds["attn"], strict=True)
                ],
            }
        )
        if progress:
            progress(
                f"{config.method:8s} {layout.seq_len:6d} tok  density {density:.3f}  dense {dense_ms:8.1f} ms"
                f"  plan {plan_ms:7.2f} ms  sparse {attn_ms:8.1f} ms  speed-up {speedup:5.2f}x"
                f" (ideal {1 / density:5.2f}x, efficiency {speedup * density:.2f};"
                f" rounds {min(rows[-1]['efficiency_rounds']):.2f}-{max(rows[-1]['efficiency_rounds']):.2f})"
            )
    return rows


def fresh_copy(plan: BlockPlan) -> BlockPlan:
    """The same plan as a new object (same tensors): no executor state cached on the original carries over."""
    return BlockPlan(plan.kv_num, plan.kv_idx, plan.block_size, plan.seq_len, plan.perm, plan.video_range, plan.meta)


def default_bench_methods() -> list[str]:
    """Every registered method that plans to a density target (``MethodSpec.targets_density``), in registry order."""
    return [name for name in method_names() if get_method(name).targets_density]


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
        repeats: Timed rounds per config; each round times one dense call, one planning and one sparse call, in
            that order (:func:`time_interleaved`), and each is the median over the rounds.
        device, dtype: Where and in what precision to run.
        backend: Executor for the sparse calls.
        progress: Called with one line per result (None: silent).

    Returns:
        ``{"device", "torch", ..., "results": [{"method", "config", "density", "tokens", "dense_ms", "plan_ms",
        "plan_first_ms", "attn_ms", "compile_s", "speedup", "ideal", "efficiency", "efficiency_rounds"}, ...]}``;
        ``efficiency`` comes from the median times, ``efficiency_rounds`` from each round's own three timings (their
        spread is the noise of the run).
    """
    device = torch.device(device)
    results: list[dict[str, Any]] = []
    for grid in geometries:
        layout = VideoLayout(*grid)
        q, k, v = (x.to(device=device, dtype=dtype) for x in synthetic_qkv(layout, heads=heads, head_dim=head_dim))
        with torch.no_grad():
            results.extend(_bench_layout(configs, layout, q, k, v, repeats, device, backend, progress))
    return {**environment(device), "dtype": str(dtype).replace("torch.", ""), "results": results}


# ------------------------------------------------------------------------------------------------ end to end
#: Default model of :func:`bench_e2e`: Wan 2.1's block structure, narrow (2 heads x 64) and shallow, so that at a
#: long sequence the self-attention dominates the step time, as it does in the real 14B model at 720p.
E2E_MODEL: dict[str, Any] = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 2,
    "attention_head_dim": 64,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 64,
    "freq_dim": 64,
    "ffn_dim": 512,
    "num_layers": 2,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "rope_max_seq_len": 1024,
}
E2E_TEXT_TOKENS = 64


class _SelfAttentionTimer:
    """Times the dense self-attention kernel calls of a stock model by wrapping torch SDPA while active.

    Self-attention is recognised by equal query and key lengths (cross-attention attends the text). Only the kernel
    is timed, not the projections around it: that is the part a sparse executor replaces.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds = 0.0
        self.calls = 0
        self._original: Callable | None = None

    def __enter__(self) -> _SelfAttentionTimer:
        self._original = original = torch.nn.functional.scaled_dot_product_attention

        def timed(query, key, value, *args, **kwargs):
            if query.shape[-2] != key.shape[-2]:
                return original(query, key, value, *args, **kwargs)
            synchronize(self.device)
            start = time.perf_counter()
            out = original(query, key, value, *args, **kwargs)
            synchronize(self.device)
            self.seconds += time.perf_counter() - start
            self.calls += 1
            return out

        torch.nn.functional.scaled_dot_product_attention = timed
        return self

    def __exit__(self, *exc: Any) -> None:
        torch.nn.functional.scaled_dot_product_attention = self._original


def build_e2e_model(layers: int, heads: int, head_dim: int, seed: int = 0) -> torch.nn.Module:
    """A ``WanTransformer3DModel`` (the real diffusers class) from :data:`E2E_MODEL` with random weights."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    config = {**E2E_MODEL, "num_layers": layers, "num_attention_heads": heads, "attention_head_dim": head_dim}
    return WanTransformer3DModel(**config).eval()


def amdahl_bound(attention_share: float, effective_density: float) -> float:
    """End-to-end speed-up if only the attention kernel's share got faster, by exactly ``1 / effective_density``."""
    return 1.0 / ((1.0 - attention_share) + attention_share * effective_density)


def bench_e2e(
    configs: Sequence[SparseConfig],
    grid: tuple[int, int, int] = (9, 30, 52),
    *,
    layers: int = 2,
    heads: int = 2,
    head_dim: int = 64,
    steps: int = 4,
    repeats: int = 1,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """A few denoising steps of a real ``WanTransformer3DModel``, dense vs each method, against the Amdahl bound.

    The model (:func:`build_e2e_model`) runs ``steps`` forward passes per "generation" on latents of ``grid``
    (``T' x H' x W'`` tokens; the latent is ``T' x 2H' x 2W'`` before the 1x2x2 patchify), with a simple Euler update
    between steps so dynamic methods see q/k change. Each method runs through :func:`vidsparse.apply` with its
    default warm-up (dense steps/layers), which the bound accounts for through the measured effective density.

    Measurements, all in one process: a dense warm-up generation that also times the self-attention kernel calls
    (``attention_share`` = their time / the whole generation); then the median of ``repeats`` timed dense
    generations before the methods and after each one (the ratio uses the mean of the dense timings on either side);
    each method gets a warm-up generation (compiles, fills plan caches), then ``repeats`` timed ones.

    Returns:
        ``{"device", "torch", ..., "model", "tokens", "steps", "attention_share", "results": [{"method",
        "spec", "config", "density", "effective_density", "dense_s", "sparse_s", "speedup", "amdahl_bound",
        "fraction_of_bound", "sparse_calls", "calls"}, ...]}``; ``density`` is the mean over sparse calls,
        ``effective_density`` the mean over all self-attention calls (dense ones count 1).
    """
    import vidsparse

    device = torch.device(device)
    model = build_e2e_model(layers, heads, head_dim).to(device=device)
    if dtype != torch.float32:
        model = model.to(dtype=dtype)
    frames, height, width = grid
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 16, frames, 2 * height, 2 * width, generator=generator).to(device, dtype)
    text = torch.randn(1, E2E_TEXT_TOKENS, E2E_MODEL["text_dim"], generator=generator).to(device, dtype)
    timesteps = torch.linspace(999.0, 0.0, steps + 1)[:-1]

    def generate() -> None:
        x = latents
        for i, t in enumerate(timesteps):
            velocity = model(hidden_states=x, timestep=t.reshape(1).to(device), encoder_hidden_states=text)[0]
            x = x + (timesteps[i + 1] - t if i + 1 < steps else -t) / 1000.0 * velocity

    def timed_generations() -> float:
        return time_ms(generate, device, repeats, warmup=0) / 1000

    say = progress or (lambda _line: None)
    rows: list[dict[str, Any]] = []
    with torch.no_grad():
        with _SelfAttentionTimer(device) as attention:
            start = time.perf_counter()
            generate()
            synchronize(device)
            warmup_s = time.perf_counter() - start
        share = attention.seconds / warmup_s
        say(f"dense warm-up {warmup_s:.1f} s, self-attention {attention.seconds:.1f} s: attention share {share:.3f}")
        dense_s = timed_generations()
        say(f"dense {dense_s:.2f} s per {steps}-step generation")
        for config in configs:
            handle = vidsparse.apply(model, config, num_steps=steps)
            try:
                handle.reset()
                generate()  # warm-up: compiles, fills static plan caches
                handle.reset()
                handle.clear_stats()
                sparse_s = time_ms(lambda h=handle: (h.reset(), generate()), device, repeats, warmup=0) / 1000
                summary = handle.summary()
            finally:
                handle.remove()
            dense_after = timed_generations()
            dense_pair = (dense_s + dense_after) / 2
            effective = summary["overall_density"]
            speedup = dense_pair / sparse_s
            bound = amdahl_bound(share, effective)
            rows.append(
                {
                    "method": config.method,
                    "spec": canonical_spec(config),
                    "config": config.to_dict(),
                    "density": summary["sparse_density"],
                    "effective_density": effective,
                    "dense_s": dense_pair,
                    "sparse_s": sparse_s,
                    "speedup": speedup,
                    "amdahl_bound": bound,
                    "fraction_of_bound": speedup / bound,
                    "sparse_calls": summary["sparse_calls"] // repeats,
                    "calls": summary["calls"] // repeats,
                }
            )
            dense_s = dense_after
            say(
                f"{canonical_spec(config):28s} density {summary['sparse_density'] or 1.0:.3f} (effective "
                f"{effective:.3f})  dense {dense_pair:6.2f} s  sparse {sparse_s:6.2f} s  speed-up {speedup:5.2f}x  "
                f"bound {bound:5.2f}x  fraction {speedup / bound:.2f}"
            )
    return {
        **environment(device),
        "dtype": str(dtype).replace("torch.", ""),
        "model": {
            "class": "WanTransformer3DModel",
            **E2E_MODEL,
            "num_layers": layers,
            "num_attention_heads": heads,
            "attention_head_dim": head_dim,
        },
        "geometry": list(grid),
        "tokens": frames * height * width,
        "steps": steps,
        "repeats": repeats,
        "attention_share": share,
        "results": rows,
    }
