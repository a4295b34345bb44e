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

import gc
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


def with_backward(fn: Callable[..., torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """A call of ``fn(q, k, v) -> out [B, S, H, D]`` forward and backward (a fixed output gradient), for timing.

    The inputs are fresh leaves that require gradients; their ``.grad`` is reset before each call, so every call
    does the same work. Runs with gradients on even under an outer ``torch.no_grad``.
    """
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(0)).to(q)

    def run() -> None:
        for x in leaves:
            x.grad = None
        with torch.enable_grad():
            fn(*leaves).backward(grad)

    return run


def peak_rss_delta_bytes(fn: Callable[[], Any], interval_s: float = 0.0005) -> int:
    """Peak resident memory of the process during ``fn()`` above its resident memory just before, in bytes.

    Measured by sampling ``psutil``'s RSS from a thread every ``interval_s`` (torch's CPU allocator keeps no peak
    statistics and ``tracemalloc`` does not see it). So that freed buffers leave the RSS instead of being reused from
    glibc's heap (which would hide them), glibc's mmap threshold is pinned to 64 KiB first (``mallopt``; large
    tensors are then mapped and unmapped one by one) and its free heap trimmed. Elsewhere than glibc the number is a
    lower bound.
    """
    import ctypes
    import threading

    import psutil

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD: fixed, no dynamic growth
        libc.malloc_trim(0)  # give back the free heap: what the call touches again shows in the RSS
    except (OSError, AttributeError):
        pass

    process = psutil.Process()
    gc.collect()
    before = process.memory_info().rss
    peak = before
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, process.memory_info().rss)
            time.sleep(interval_s)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    return max(peak, process.memory_info().rss) - before


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
    backward: bool = False,
) -> list[dict[str, Any]]:
    """Rows of :func:`bench_attention` for one geometry (inputs already built)."""
    backend_name = resolve_backend(backend, device, q.dtype, needs_grad=backward)
    rows = []
    dense = with_backward(dense_sdpa, q, k, v) if backward else lambda: dense_sdpa(q, k, v)
    dense()  # warm-up
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
        static = get_method(config.method).static

        def sparse(q, k, v, p=plan, static=static):
            # A dynamic method makes a new plan every call: time the executor on a fresh copy each time, so work it
            # caches per plan object (the gather schedule, cpp's transposed index) is charged, as in a real run.
            return block_sparse_attention(q, k, v, p if static else fresh_copy(p), backend=backend)

        attend = with_backward(sparse, q, k, v) if backward else lambda: sparse(q, k, v)
        attend()  # warm-up of the timed path
        # Dense, planning and sparse attention timed in interleaved rounds, so load drift hits all three alike.
        rounds = time_rounds(
            {
                "dense": dense,
                "plan": lambda cfg=config, c=ctx: build_plan(cfg, q, k, layout, c),
                "attn": attend,
            },
            device,
            repeats,
        )
        dense_ms, plan_ms, attn_ms = (statistics.median(rounds[name]) for name in ("dense", "plan", "attn"))
        density = plan.density()
        speedup = dense_ms / (plan_ms + attn_ms)
        memory = {}
        if backward and device.type == "cpu":
            memory = {
                "dense_peak_rss_bytes": peak_rss_delta_bytes(dense),
                "attn_peak_rss_bytes": peak_rss_delta_bytes(attend),
            }
        rows.append(
            {
                "method": config.method,
                "backward": backward,
                **memory,
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
    backward: bool = False,
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
        backward: Time forward + backward (a fixed output gradient) of dense SDPA and of the sparse executor
            instead of the forward; planning stays a forward (plans are built without gradients). Rows then also
            hold ``dense_peak_rss_bytes`` / ``attn_peak_rss_bytes`` on the CPU (:func:`peak_rss_delta_bytes`).

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
            results.extend(_bench_layout(configs, layout, q, k, v, repeats, device, backend, progress, backward))
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
            "kind": "synthetic (Wan 2.1 blocks, narrow and shallow; not a real checkpoint's widths)",
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


# ---------------------------------------------------------------------------------- end to end at a real model shape
#: Densities the Amdahl bound is reported at by :func:`bench_e2e_config` (besides each measured density).
BOUND_DENSITIES: tuple[float, ...] = (0.1, 0.25, 0.5)


def schedule_effective_density(
    config: SparseConfig, density: float, *, depth: int, steps: int, timesteps: Sequence[float], tokens: int
) -> float:
    """Mean density of the self-attention calls of a whole generation under ``config``'s dense warm-up.

    The same rules as the runtime's dense/sparse decision (:meth:`vidsparse.hooks.SparseRuntime.dense_reason`),
    applied to a schedule instead of a live call: dense steps first and last, the first ``dense_layers`` of the
    model's ``depth`` layers, steps whose timestep is above ``dense_above_timestep``, and every call when the video
    has fewer than ``min_tokens`` tokens. Dense calls count 1, sparse calls ``density``.

    Args:
        timesteps: The schedule's timesteps (one per step, 0..1000).
    """
    from vidsparse.config import resolve_step_count

    first = resolve_step_count(config.dense_steps, steps)
    last = resolve_step_count(config.dense_last_steps, steps)
    sparse_layers = max(0, depth - config.dense_layers) if tokens >= config.min_tokens else 0
    total = 0.0
    for step, t in enumerate(timesteps):
        dense_step = step < first or step >= steps - last
        if config.dense_above_timestep is not None and t > config.dense_above_timestep:
            dense_step = True
        total += depth if dense_step else (depth - sparse_layers) + sparse_layers * density
    return total / (steps * depth)


def all_sparse(config: SparseConfig) -> SparseConfig:
    """``config`` without its dense warm-up: every call sparse (what one measured sparse step needs)."""
    return config.replace(dense_steps=0, dense_last_steps=0, dense_layers=0, dense_above_timestep=None, min_tokens=0)


def bench_e2e_config(
    shape_name: str,
    configs: Sequence[SparseConfig],
    *,
    layers: int = 2,
    grid: tuple[int, int, int] | None = None,
    schedule_steps: int | None = None,
    bound_densities: Sequence[float] = BOUND_DENSITIES,
    repeats: int = 1,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """One denoiser step of a real checkpoint's transformer, dense vs each method, and what a generation can gain.

    The model is the checkpoint's diffusers class with every width of its published config
    (:mod:`vidsparse.eval.model_shapes`) and ``layers`` blocks; the inputs have the published shape's token count
    (or ``grid``). Measured at that shape, in one process:

    - ``attention_share``: time in the self-attention kernel (torch SDPA with equal query and key lengths: joint
      text included, cross-attention not) / time of the whole denoiser call, over ``repeats`` dense calls after a
      warm-up;
    - per method: ``repeats`` rounds of (one dense step, apply the method with every call sparse, one untimed
      sparse step that compiles and searches cached patterns, one timed sparse step), so load drift hits both;
      ``step_speedup`` = median dense / median sparse, against ``step_bound`` = Amdahl at the measured density;
      ``fraction_of_bound`` = their ratio.

    Counted, not measured: the **schedule** (``steps`` of the checkpoint's pipeline, e.g. 50, with its flow shift):
    the method's own dense warm-up (dense steps, dense layers of the full depth, timestep rule) gives the
    generation's effective density and ``schedule_bound``; ``predicted_speedup`` = ``fraction_of_bound`` x
    ``schedule_bound``, which assumes the dense steps run as fast as the dense step measured here. ``bounds``
    holds the schedule bound at each of ``bound_densities``. ``schedule_steps`` replaces the pipeline's step count.

    Returns:
        ``{..., "model": {...}, "tokens", "attention_share", "bounds": [{"method", "density",
        "effective_density", "schedule_bound", "step_bound"}], "results": [{"method", "spec", "config", "density",
        "dense_ms", "sparse_ms", "step_speedup", "step_bound", "fraction_of_bound", "schedule_effective_density",
        "schedule_bound", "predicted_speedup", "sparse_calls", "calls"}]}``.
    """
    import vidsparse

    from .model_shapes import build_model, forward_inputs, get_shape, schedule_timesteps

    shape = get_shape(shape_name)
    device = torch.device(device)
    grid = tuple(grid or shape.grid)
    tokens = grid[0] * grid[1] * grid[2]
    model = build_model(shape, layers).to(device=device)
    if dtype != torch.float32:  # diffusers warns on any dtype cast, float32 included
        model = model.to(dtype=dtype)
    inputs = forward_inputs(shape, model, grid, device=device, dtype=dtype)
    steps = schedule_steps or shape.steps
    timesteps = schedule_timesteps(steps, shape.shift)
    say = progress or (lambda _line: None)

    def step() -> None:
        model(**inputs, return_dict=False)

    rows: list[dict[str, Any]] = []
    with torch.no_grad():
        step()  # warm-up
        with _SelfAttentionTimer(device) as attention:
            start = time.perf_counter()
            for _ in range(repeats):
                step()
            synchronize(device)
            total_s = time.perf_counter() - start
        share = attention.seconds / total_s
        say(f"{shape.name}: {tokens} tokens, {layers} of {shape.depth} layers, attention share {share:.3f}")
        bounds = []
        for config in configs:
            for density in bound_densities:
                effective = schedule_effective_density(
                    config, density, depth=shape.depth, steps=steps, timesteps=timesteps, tokens=tokens
                )
                bounds.append(
                    {
                        "method": config.method,
                        "density": density,
                        "effective_density": effective,
                        "schedule_bound": amdahl_bound(share, effective),
                        "step_bound": amdahl_bound(share, density),
                    }
                )
        for config in configs:
            dense_times, sparse_times, summary = [], [], {}
            for _ in range(repeats):
                dense_times.append(time_ms(step, device, repeats=1, warmup=0))
                handle = vidsparse.apply(model, all_sparse(config))
                try:
                    step()  # untimed: compiles, fills the static plan cache, searches a cached pattern
                    handle.clear_stats()
                    sparse_times.append(time_ms(step, device, repeats=1, warmup=0))
                    summary = handle.summary()
                finally:
                    handle.remove()
            dense_ms, sparse_ms = statistics.median(dense_times), statistics.median(sparse_times)
            density = summary["sparse_density"] or 1.0
            step_speedup = dense_ms / sparse_ms
            step_bound = amdahl_bound(share, density)
            fraction = step_speedup / step_bound
            effective = schedule_effective_density(
                config, density, depth=shape.depth, steps=steps, timesteps=timesteps, tokens=tokens
            )
            schedule_bound = amdahl_bound(share, effective)
            rows.append(
                {
                    "method": config.method,
                    "spec": canonical_spec(config),
                    "config": config.to_dict(),
                    "density": density,
                    "dense_ms": dense_ms,
                    "sparse_ms": sparse_ms,
                    "step_speedup": step_speedup,
                    "step_bound": step_bound,
                    "fraction_of_bound": fraction,
                    "schedule_effective_density": effective,
                    "schedule_bound": schedule_bound,
                    "predicted_speedup": fraction * schedule_bound,
                    "sparse_calls": summary["sparse_calls"],
                    "calls": summary["calls"],
                }
            )
            say(
                f"{canonical_spec(config):28s} density {density:.3f}  dense {dense_ms:8.1f} ms  sparse {sparse_ms:8.1f}"
                f" ms  step speed-up {step_speedup:5.2f}x (bound {step_bound:5.2f}x, fraction {fraction:.2f});"
                f" {steps}-step schedule: effective density {effective:.3f}, bound {schedule_bound:5.2f}x"
            )
    return {
        **environment(device),
        "dtype": str(dtype).replace("torch.", ""),
        "model": {
            "kind": "real checkpoint config, random weights",
            "name": shape.name,
            "source": shape.source,
            "class": shape.model_class,
            "config": shape.config_with_layers(layers),
            "layers": layers,
            "depth": shape.depth,
            "published_shape": shape.resolution,
            "published_grid": list(shape.grid),
            "notes": list(shape.notes),
        },
        "geometry": list(grid),
        "tokens": tokens,
        "text_tokens": shape.text_tokens,
        "schedule": {"steps": steps, "shift": shape.shift},
        "repeats": repeats,
        "attention_share": share,
        "bounds": bounds,
        "results": rows,
    }


# ------------------------------------------------------------------------------------------------ scaling with length
#: Default token counts of :func:`bench_scaling` (each rounded to whole frames of the frame grid).
SCALING_TOKENS: tuple[int, ...] = (8192, 16384, 32768, 65536, 131072)


def plan_memory(plan: BlockPlan) -> dict[str, Any]:
    """Bytes a plan holds and how much of its index list is padding (every row is padded to the longest, Kmax).

    Returns:
        ``{"bytes", "kv_idx_bytes", "kmax", "index_fill"}``; ``index_fill`` = used entries / allocated entries.
    """
    tensors = [plan.kv_num, plan.kv_idx] + ([plan.perm] if plan.perm is not None else [])
    used = int(plan.kv_num.expand(plan.kv_idx.shape[:3]).sum())
    return {
        "bytes": sum(t.numel() * t.element_size() for t in tensors),
        "kv_idx_bytes": plan.kv_idx.numel() * plan.kv_idx.element_size(),
        "kmax": plan.kv_idx.shape[-1],
        "index_fill": used / max(1, plan.kv_idx.numel()),
    }


def fitted_exponent(tokens: Sequence[float], times: Sequence[float]) -> float | None:
    """Slope of log(time) against log(tokens) by least squares (time ~ tokens^slope); None for fewer than 2 points."""
    import math

    if len(tokens) < 2:
        return None
    xs = [math.log(n) for n in tokens]
    ys = [math.log(t) for t in times]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if sxx else None


def bench_scaling(
    configs: Sequence[SparseConfig],
    tokens: Sequence[int] = SCALING_TOKENS,
    *,
    frame_grid: tuple[int, int] = (30, 52),
    heads: int = 2,
    head_dim: int = 64,
    repeats: int = 3,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    backend: str = "auto",
    progress: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Attention time of dense SDPA and of each method as the video grows, with the fitted exponent of each curve.

    Each token count becomes ``frames x H' x W'`` with the frame grid fixed (Wan 480p: 30 x 52) and frames =
    round(tokens / (H' W')), so length grows along time, as longer videos do. At each length the rows of
    :func:`bench_attention` (interleaved rounds of dense, planning, sparse) are measured with fewer rounds as the
    length grows (``ceil(repeats x shortest / length)``, at least 1), plus each plan's memory (:func:`plan_memory`)
    and, on CUDA, the executor's peak memory per call above its inputs.

    Returns:
        ``{..., "results": [bench_attention rows + "plan_memory", "executor_peak_bytes"], "curves": [{"name",
        "tokens", "ms", "exponent"}]}``; the dense curve is the median of the dense timings at each length, a
        method's curve is plan + sparse attention time.
    """
    import math

    device = torch.device(device)
    lengths = sorted({max(1, round(n / (frame_grid[0] * frame_grid[1]))) for n in tokens})
    results: list[dict[str, Any]] = []
    for frames in lengths:
        layout = VideoLayout(frames, *frame_grid)
        reps = max(1, math.ceil(repeats * lengths[0] / frames))
        q, k, v = (x.to(device=device, dtype=dtype) for x in synthetic_qkv(layout, heads=heads, head_dim=head_dim))
        with torch.no_grad():
            rows = _bench_layout(configs, layout, q, k, v, reps, device, backend, progress)
            for config, row in zip(configs, rows, strict=True):
                plan = build_plan(config, q, k, layout, PlanContext())
                row["plan_memory"] = plan_memory(plan)
                row["repeats"] = reps
                row["executor_peak_bytes"] = _executor_peak_bytes(q, k, v, plan, backend, device)
        results.extend(rows)
    curves = []
    dense_by_length: dict[int, list[float]] = {}
    for r in results:
        dense_by_length.setdefault(r["tokens"], []).append(r["dense_ms"])
    names = ["dense"] + [canonical_spec(c) for c in configs]
    for name in names:
        if name == "dense":
            points = [(n, statistics.median(ms)) for n, ms in sorted(dense_by_length.items())]
        else:
            points = [(r["tokens"], r["plan_ms"] + r["attn_ms"]) for r in results if r["spec"] == name]
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        curves.append({"name": name, "tokens": xs, "ms": ys, "exponent": fitted_exponent(xs, ys)})
    return {
        **environment(device),
        "dtype": str(dtype).replace("torch.", ""),
        "frame_grid": list(frame_grid),
        "heads": heads,
        "head_dim": head_dim,
        "results": results,
        "curves": curves,
    }


def _executor_peak_bytes(q, k, v, plan: BlockPlan, backend: str, device: torch.device) -> int | None:
    """Peak CUDA memory of one executor call above what was allocated before it (None off CUDA: not measured)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    block_sparse_attention(q, k, v, plan, backend=backend)
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def write_scaling_plot(report: dict[str, Any], path: str) -> None:
    """Log-log plot of the :func:`bench_scaling` curves (time vs tokens, fitted exponent in the legend) to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for curve in report["curves"]:
        exponent = curve["exponent"]
        label = curve["name"] + ("" if exponent is None else f" (slope {exponent:.2f})")
        ax.loglog(
            curve["tokens"], curve["ms"], marker="o", label=label, linestyle="--" if curve["name"] == "dense" else "-"
        )
    ax.set_xlabel("video tokens per attention call")
    ax.set_ylabel("attention time per call (ms)")
    ax.set_title(f"{report['heads']} heads x {report['head_dim']}, {report['device']}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
