"""Benchmark the Triton block-sparse kernel against dense SDPA and compiled FlexAttention on one GPU.

For every sequence length the same q/k/v (B=1, bf16) are attended three ways:

- ``dense``: ``scaled_dot_product_attention`` restricted to the flash backend (``torch.nn.attention.sdpa_kernel``);
- ``flex``: ``torch.compile(flex_attention)`` with the plan's ``BlockMask`` (:mod:`vidsparse.kernels.flex`);
- ``triton``: :func:`vidsparse.kernels.block_sparse_attn.block_sparse_attn` over the same plan.

Plans look like the ones methods emit: per head and per query block a random choice of key blocks, always including
the block itself, ``round(density * Qb)`` per row. FLOPs count the two matrix products of the attended pairs only,
``4 * D * (query, key) pairs`` (dense: ``4 * B * H * D * S^2``), so sparse and dense TFLOP/s are comparable.
``fraction_of_ideal`` = speed-up over dense / (1 / density): 1.0 would mean sparse attention costs exactly its share.

Timing: ``triton.testing.do_bench`` (warm-up, then the median of repeated runs, CUDA events) on CUDA. ``--smoke``
runs tiny shapes on whatever device there is (the Triton kernel interpreted on CPU, FlexAttention eager, wall-clock
medians): it checks the script end to end, its numbers mean nothing.

    python -m vidsparse.kernels.bench_gpu --json bench.json          # GPU, the full grid (a few minutes on an H200)
    python -m vidsparse.kernels.bench_gpu --smoke --json /tmp/b.json # anywhere, seconds

The JSON goes to ``--json PATH``, else ``$OUT/bench_gpu.json`` when ``OUT`` is set, else ``samples/bench/``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from vidsparse.plan import BlockPlan, num_blocks

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
#: Largest |triton - flex| output difference accepted (bf16 outputs of the same plan; rounding differs, work does not).
MAX_OUTPUT_DIFF = 0.05


def random_plan(
    heads: int, seq_len: int, block_size: int, density: float, *, generator: torch.Generator, device: torch.device
) -> BlockPlan:
    """A per-head plan (B=1): every query block keeps itself plus random other blocks, ``round(density*Qb)`` in all.

    Args:
        heads: H of the plan ``[1, H, Qb]``.
        density: Target fraction of key blocks per row, in (0, 1].
    """
    qb = num_blocks(seq_len, block_size)
    keep = max(1, min(qb, round(density * qb)))
    scores = torch.rand(1, heads, qb, qb, generator=generator, device=device)
    diag = torch.arange(qb, device=device)
    scores[..., diag, diag] = 2.0  # above any random score: the own block is always among the top
    chosen = scores.topk(keep, dim=-1).indices
    mask = torch.zeros(1, heads, qb, qb, dtype=torch.bool, device=device).scatter_(-1, chosen, True)
    return BlockPlan.from_block_mask(mask, block_size=block_size, seq_len=seq_len, meta={"method": "random"})


def attended_pairs(plan: BlockPlan) -> int:
    """Number of (query, key) token pairs the plan computes, summed over batch and heads (tail block counted)."""
    qb = plan.num_q_blocks
    tokens = torch.full((qb,), plan.block_size, dtype=torch.float64, device=plan.device)
    tokens[-1] = plan.seq_len - (qb - 1) * plan.block_size
    pairs = torch.einsum("bhij,i,j->", plan.block_mask().to(torch.float64), tokens, tokens)
    return int(pairs.item())


def time_ms(fn: Callable[[], Any], device: torch.device, *, smoke: bool) -> float:
    """Median time of ``fn`` in milliseconds: do_bench on CUDA, else a warm-up and the median of a few wall times.

    Callers have run ``fn`` once before (output checks), so compilation and autotuning are not timed.
    """
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    if not smoke:
        fn()
    runs = []
    for _ in range(1 if smoke else 5):
        start = time.perf_counter()
        fn()
        runs.append((time.perf_counter() - start) * 1e3)
    return statistics.median(runs)


def _dense_fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Callable[[], torch.Tensor]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = SDPBackend.FLASH_ATTENTION if q.is_cuda else SDPBackend.MATH

    def run() -> torch.Tensor:
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    return run


def _flex_fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: BlockPlan) -> Callable[[], torch.Tensor]:
    if q.is_cuda:
        from .flex import flex_block_sparse_attention

        return lambda: flex_block_sparse_attention(q, k, v, plan)[0]
    # Smoke on CPU: eager FlexAttention (compiling it would dominate the smoke run's time). Eager flex evaluates only
    # the mask_mod and skips the BlockMask's block lists, so the plan must be spelled out as a mask_mod here.
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    blocks = plan.block_mask()
    size = plan.block_size

    def in_plan(b, h, q_idx, kv_idx):
        return blocks[0, h, q_idx // size, kv_idx // size]

    block_mask = create_block_mask(in_plan, 1, q.shape[1], plan.seq_len, plan.seq_len, device="cpu", BLOCK_SIZE=size)
    return lambda: flex_attention(q, k, v, block_mask=block_mask)


def _triton_fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: BlockPlan) -> Callable[[], torch.Tensor]:
    from .block_sparse_attn import block_sparse_attn

    return lambda: block_sparse_attn(q, k, v, plan.kv_num, plan.kv_idx, block_size=plan.block_size)[0]


def _tflops(flops: float, ms: float) -> float:
    """TFLOP/s to 4 significant digits (smoke runs on CPU are far below 0.01)."""
    return float(f"{flops / (ms * 1e-3) / 1e12:.4g}")


def bench_attention(
    args: argparse.Namespace, device: torch.device, cases: list[dict[str, Any]], save: Callable[[], None]
) -> None:
    """All (tokens, block size, density) cases, appended to ``cases`` (``save()`` after each one).

    One dense timing per token count, shared by its block sizes and densities.
    """
    dtype = DTYPES[args.dtype]
    gen = torch.Generator(device=device).manual_seed(args.seed)
    for tokens in args.tokens:
        shape = (1, args.heads, tokens, args.head_dim)
        q, k, v = (torch.randn(shape, generator=gen, device=device).to(dtype) for _ in range(3))
        dense_ms = time_ms(_dense_fn(q, k, v), device, smoke=args.smoke)
        dense_flops = 4.0 * args.heads * args.head_dim * tokens * tokens
        for block_size in args.block_sizes:
            for density in args.densities:
                plan = random_plan(args.heads, tokens, block_size, density, generator=gen, device=device)
                flops = 4.0 * args.head_dim * attended_pairs(plan)
                flex, tri = _flex_fn(q, k, v, plan), _triton_fn(q, k, v, plan)
                # Same plan, two executors: their outputs must agree, or the timings compare different work.
                max_diff = (flex().float() - tri().float()).abs().max().item()
                flex_ms = time_ms(flex, device, smoke=args.smoke)
                triton_ms = time_ms(tri, device, smoke=args.smoke)
                plan_density = plan.density()
                speedup = dense_ms / triton_ms
                case = {
                    "tokens": tokens,
                    "block_size": block_size,
                    "density": round(plan_density, 4),
                    "flop_density": round(flops / dense_flops, 4),
                    "dense_ms": round(dense_ms, 4),
                    "flex_ms": round(flex_ms, 4),
                    "triton_ms": round(triton_ms, 4),
                    "dense_tflops": _tflops(dense_flops, dense_ms),
                    "flex_tflops": _tflops(flops, flex_ms),
                    "triton_tflops": _tflops(flops, triton_ms),
                    "speedup_vs_dense": round(speedup, 3),
                    "flex_speedup_vs_dense": round(dense_ms / flex_ms, 3),
                    "fraction_of_ideal": round(speedup * plan_density, 3),
                    "max_abs_diff_triton_vs_flex": max_diff,
                }
                cases.append(case)
                save()
                print(
                    f"S={tokens:6d} block={block_size:3d} density={plan_density:.3f}  dense {dense_ms:9.3f} ms  "
                    f"flex {flex_ms:9.3f} ms  triton {triton_ms:9.3f} ms ({case['triton_tflops']:.0f} TFLOP/s)  "
                    f"x{speedup:.2f} = {case['fraction_of_ideal']:.2f} of ideal  |diff| {max_diff:.2e}",
                    flush=True,
                )
                del plan, flex, tri
        del q, k, v
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return cases


def bench_planning(
    args: argparse.Namespace, device: torch.device, rows: list[dict[str, Any]], save: Callable[[], None]
) -> None:
    """Planning helpers, torch vs Triton, at the largest token count: block means of k and the LUT from a mask."""
    from .planning import block_mask_to_lut, block_means

    tokens, block_size = max(args.tokens), min(args.block_sizes)
    dtype = DTYPES[args.dtype]
    gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    k = torch.randn(1, args.heads, tokens, args.head_dim, generator=gen, device=device).to(dtype)
    qb = num_blocks(tokens, block_size)
    mask = torch.rand(1, args.heads, qb, qb, generator=gen, device=device) < 0.25
    for name, run in (
        ("block_means", lambda backend: block_means(k, block_size, backend=backend)),
        ("block_mask_to_lut", lambda backend: block_mask_to_lut(mask, backend=backend)),
    ):
        same = _outputs_match(run("torch"), run("triton"))
        torch_ms = time_ms(lambda run=run: run("torch"), device, smoke=args.smoke)
        triton_ms = time_ms(lambda run=run: run("triton"), device, smoke=args.smoke)
        rows.append(
            {
                "op": name,
                "tokens": tokens,
                "block_size": block_size,
                "torch_ms": round(torch_ms, 4),
                "triton_ms": round(triton_ms, 4),
                "speedup": round(torch_ms / triton_ms, 3),
                "outputs_match": bool(same),
            }
        )
        save()
        print(f"{name:18s} torch {torch_ms:8.3f} ms  triton {triton_ms:8.3f} ms  match={same}", flush=True)


def _outputs_match(a: torch.Tensor | tuple[torch.Tensor, ...], b: torch.Tensor | tuple[torch.Tensor, ...]) -> bool:
    """Index tensors must be equal; float results equal up to summation order."""
    if isinstance(a, tuple):
        return all(torch.equal(x, y) for x, y in zip(a, b))
    return torch.allclose(a, b, atol=1e-4, rtol=1e-4)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options; ``--smoke`` replaces the sizes with tiny ones."""
    p = argparse.ArgumentParser(prog="python -m vidsparse.kernels.bench_gpu", description=__doc__.split("\n")[0])
    p.add_argument("--json", type=Path, default=None, help="output file (default: $OUT/ or samples/bench/)")
    p.add_argument("--tokens", type=int, nargs="+", default=[16_384, 32_768, 75_600])
    p.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.25, 0.5])
    p.add_argument("--block-sizes", type=int, nargs="+", default=[64, 128], choices=[64, 128])
    p.add_argument("--heads", type=int, default=24)
    p.add_argument("--head-dim", type=int, default=128, choices=[16, 32, 64, 128])
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-planning", action="store_true", help="skip the planning-helper benchmark")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on any device (interpreter on CPU): a dry run")
    args = p.parse_args(argv)
    for d in args.densities:
        if not 0.0 < d <= 1.0:
            p.error(f"--densities {d} is invalid: expected numbers in (0, 1].")
    if min(args.tokens) < 1 or args.heads < 1:
        p.error("--tokens and --heads must be >= 1.")
    if args.smoke:
        args.tokens, args.densities, args.block_sizes, args.heads = [256], [0.25, 0.5], [64], 2
        args.head_dim = 32
        if not torch.cuda.is_available():
            args.dtype = "fp32"  # CPU: no flash backend for 16-bit SDPA, and the interpreter is exact in fp32
    return args


def default_json_path() -> Path:
    """``$OUT/bench_gpu.json`` when the ``OUT`` folder variable is set, else ``samples/bench/bench_gpu.json``."""
    out = os.environ.get("OUT")
    return (Path(out) if out else Path("samples") / "bench") / "bench_gpu.json"


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print one line per case, write the JSON; returns the exit status."""
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda":
        if not args.smoke:
            print("bench_gpu: no CUDA device; only --smoke runs without one.", file=sys.stderr)
            return 2
        # Must precede the first import of triton's JIT decorators (the kernel module is imported lazily below).
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import triton

    path = args.json or default_json_path()
    t0 = time.perf_counter()
    report: dict[str, Any] = {
        "meta": {
            "command": " ".join(["python -m vidsparse.kernels.bench_gpu", *(sys.argv[1:] if argv is None else argv)]),
            "smoke": args.smoke,
            "complete": False,
            "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__,
            "triton": triton.__version__,
            "cuda": torch.version.cuda,
            "dtype": args.dtype,
            "batch": 1,
            "heads": args.heads,
            "head_dim": args.head_dim,
            "plan": "random per-row key blocks, own block kept, round(density*Qb) per row, per head",
            "flops": "4 * D * attended (query, key) pairs; dense 4 * B * H * D * S^2",
            "timing": "triton.testing.do_bench median (CUDA)" if device.type == "cuda" else "wall-clock median (CPU)",
            "dense_backend": "SDPA flash" if device.type == "cuda" else "SDPA math",
        },
        "cases": [],
        "planning": [],
    }
    path.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        # Rewritten after every case: a run stopped by a time limit still leaves the cases it finished.
        report["meta"]["wall_s"] = round(time.perf_counter() - t0, 1)
        path.write_text(json.dumps(report, indent=2) + "\n")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager FlexAttention on CPU warns on every call in smoke mode
        bench_attention(args, device, report["cases"], save)
        if not args.no_planning:
            bench_planning(args, device, report["planning"], save)
    report["meta"]["complete"] = True
    save()
    print(f"wrote {path}")
    cases, planning = report["cases"], report["planning"]
    # Numbers are only worth reporting when the executors computed the same thing.
    diffs = [c["max_abs_diff_triton_vs_flex"] for c in cases]
    if any(not math.isfinite(d) or d > MAX_OUTPUT_DIFF for d in diffs):
        print(f"bench_gpu: triton and flex outputs differ by more than {MAX_OUTPUT_DIFF}: {diffs}", file=sys.stderr)
        return 1
    if not all(r["outputs_match"] for r in planning):
        print("bench_gpu: a planning helper's Triton and torch outputs differ.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
