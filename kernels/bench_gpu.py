"""Benchmark the Triton block-sparse kernel against dense attention and compiled FlexAttention on one GPU, in a budget.

For every (token count, model head shape) the same q/k/v (B=1) are attended:

- dense baselines: ``scaled_dot_product_attention`` restricted to the flash backend (``sdpa_flash``) and to cuDNN
  (``sdpa_cudnn``), and ``torch.compile(flex_attention)`` without a mask (``flex_dense``);
- every registered method (:func:`vidsparse.method_names`): its plan is built from these q/k (``plan_ms``), then run by
  compiled FlexAttention (``flex``) and by :func:`vidsparse.kernels.block_sparse_attn.block_sparse_attn`
  (``triton``); their outputs must agree within the dtype's rounding (:data:`MAX_OUTPUT_DIFF`).

Token counts are real latent grids (21 latent frames: 480p = 21 x 30 x 52 = 32 760, 720p = 21 x 45 x 80 = 75 600);
head shapes are Wan 2.1 1.3B (12 x 128) and HunyuanVideo (24 x 128). FLOPs count the two matrix products of the
attended pairs only, ``4 * D * (query, key) pairs`` (dense: ``4 * B * H * D * S^2``), so sparse and dense TFLOP/s are
comparable; ``fraction_of_ideal`` = speed-up over flash / (1 / density).

Budget: ``--budget-s`` (default 200 s) is checked before every case; a case that would probably not finish in what is
left (its estimate is the longest case so far) is skipped, with the reason, in the JSON's ``skipped`` list. The JSON
is rewritten after every case, so a run stopped from outside keeps what it finished.

Timing: ``triton.testing.do_bench`` (warm-up, then the median of repeated runs, CUDA events) on CUDA. ``--smoke``
runs a tiny version of every case on whatever device there is (the Triton kernel interpreted on CPU, FlexAttention
eager, SDPA's math backend standing in for flash and cuDNN, wall-clock times): it checks the script end to end, its
numbers mean nothing.

    python -m vidsparse.kernels.bench_gpu --json bench.json          # GPU: the full grid, under --budget-s
    python -m vidsparse.kernels.bench_gpu --smoke --json /tmp/b.json # anywhere, under a minute

The JSON goes to ``--json PATH``, else ``$OUT/bench_gpu.json`` when ``OUT`` is set, else ``samples/bench/``.
"""

from __future__ import annotations

import os
import sys

import torch

# Without CUDA the kernel can only run interpreted, and Triton reads TRITON_INTERPRET when it is first imported (its
# own jit helpers such as tl.zeros and tl.sum are decorated then): so it is set here, before anything imports triton.
# main() checks that it took effect.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from vidsparse.layout import VideoLayout  # noqa: E402
from vidsparse.plan import BlockPlan, num_blocks  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
#: Largest |triton - flex| output difference accepted per dtype: the same plan and work, but the two executors round
#: P and the output differently; one bf16 rounding step of values near 1 is 4-8e-3, fp32 differs by summation order.
MAX_OUTPUT_DIFF = {"bf16": 2e-2, "fp16": 5e-3, "fp32": 1e-4}
#: Model head shapes (heads, head dim) of the benchmark.
MODELS = {"wan2.1-1.3b": (12, 128), "hunyuanvideo": (24, 128)}
#: Token count -> latent grid (frames, height, width) of the full run.
GRIDS = {32_760: (21, 30, 52), 75_600: (21, 45, 80)}
#: The smoke run's tiny version: two grids (one partial last block), two heads of dimension 32 per model.
SMOKE_GRIDS = {128: (2, 8, 8), 150: (3, 5, 10)}
SMOKE_HEADS = (2, 32)
DENSE_BASELINES = ("sdpa_flash", "sdpa_cudnn", "flex_dense")


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


def attended_pairs(plan: BlockPlan, heads: int | None = None) -> int:
    """(query, key) token pairs the plan computes, summed over batch and ``heads`` (default: the plan's heads).

    The partial last block counts its real tokens; a plan with one head serves ``heads`` heads.
    """
    qb = plan.num_q_blocks
    tokens = torch.full((qb,), plan.block_size, dtype=torch.float64, device=plan.device)
    tokens[-1] = plan.seq_len - (qb - 1) * plan.block_size
    pairs = torch.einsum("bhij,i,j->", plan.block_mask().to(torch.float64), tokens, tokens)
    broadcast = 1 if heads is None else heads // plan.kv_num.shape[1]  # a plan of 1 head serves them all
    return int(pairs.item()) * broadcast


def time_ms(fn: Callable[[], Any], device: torch.device, *, smoke: bool) -> float:
    """Median time of ``fn`` in milliseconds: do_bench on CUDA, else the median of a few wall times.

    Callers have run ``fn`` once before (output checks), so compilation and autotuning are not timed.
    """
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    runs = []
    for _ in range(1 if smoke else 5):
        start = time.perf_counter()
        fn()
        runs.append((time.perf_counter() - start) * 1e3)
    return statistics.median(runs)


def _sdpa_fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, name: str) -> Callable[[], torch.Tensor]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # CPU (smoke): neither flash nor cuDNN exists there; the math backend keeps the mechanics (meta says so).
    backend = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION}[name]
    backend = backend if q.is_cuda else SDPBackend.MATH

    def run() -> torch.Tensor:
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    return run


def _flex_dense_fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Callable[[], torch.Tensor]:
    from torch.nn.attention.flex_attention import flex_attention

    if q.is_cuda:
        from .flex import compiled_flex_attention

        flex = compiled_flex_attention()
        return lambda: flex(q, k, v)
    return lambda: flex_attention(q, k, v)  # smoke: eager (compiling would dominate the run)


def _flex_fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: BlockPlan) -> Callable[[], torch.Tensor]:
    if q.is_cuda:
        from .flex import flex_block_sparse_attention

        return lambda: flex_block_sparse_attention(q, k, v, plan)[0]
    # Smoke on CPU: eager FlexAttention (compiling it would dominate the smoke run's time). Eager flex evaluates only
    # the mask_mod and skips the BlockMask's block lists, so the plan must be spelled out as a mask_mod here.
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    blocks = plan.block_mask()
    size = plan.block_size
    ph, heads = blocks.shape[1], q.shape[1]

    def in_plan(b, h, q_idx, kv_idx):
        return blocks[0, h % ph, q_idx // size, kv_idx // size]

    block_mask = create_block_mask(in_plan, 1, heads, plan.seq_len, plan.seq_len, device="cpu", BLOCK_SIZE=size)
    return lambda: flex_attention(q, k, v, block_mask=block_mask)


def _triton_fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: BlockPlan) -> Callable[[], torch.Tensor]:
    from .block_sparse_attn import block_sparse_attn

    return lambda: block_sparse_attn(q, k, v, plan.kv_num, plan.kv_idx, block_size=plan.block_size)[0]


def _tflops(flops: float, ms: float) -> float:
    """TFLOP/s to 4 significant digits (smoke runs on CPU are far below 0.01)."""
    return float(f"{flops / (ms * 1e-3) / 1e12:.4g}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Budget:
    """Wall-clock budget of the run: a case starts only when its estimate (the longest case so far) still fits."""

    seconds: float
    start: float
    longest: float = 0.0

    def elapsed(self) -> float:
        """Seconds since the run started."""
        return time.perf_counter() - self.start

    def allows(self) -> bool:
        """True when the next case is expected to finish within the budget."""
        return self.elapsed() + self.longest <= self.seconds

    def record(self, case_seconds: float) -> None:
        """Remember how long a finished case took."""
        self.longest = max(self.longest, case_seconds)


class Runner:
    """Runs named cases under the budget, appending their rows (or the skip reason) to the report and saving it."""

    def __init__(self, report: dict[str, Any], budget: Budget, save: Callable[[], None]) -> None:
        self.report, self.budget, self.save = report, budget, save

    def run(self, name: str, case: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
        """Run ``case()`` if the budget allows; its row gets ``name`` and ``case_s``; errors are recorded."""
        if not self.budget.allows():
            reason = (
                f"budget: {self.budget.elapsed():.0f} s of {self.budget.seconds:.0f} s used, the longest case took "
                f"{self.budget.longest:.0f} s"
            )
            self.report["skipped"].append({"case": name, "reason": reason})
            self.save()
            print(f"{name}: skipped ({reason})", flush=True)
            return None
        start = time.perf_counter()
        try:
            row = {"case": name, **case()}
        except Exception as exc:  # one failing case must not lose the others; the exit status reports it
            row = {"case": name, "error": f"{type(exc).__name__}: {exc}"}
        row["case_s"] = round(time.perf_counter() - start, 2)
        self.budget.record(row["case_s"])
        self.report["cases"].append(row)
        self.save()
        print(json.dumps(row), flush=True)
        return row


def _method_options(name: str, density: float) -> dict[str, Any]:
    """The overrides that make ``name`` plan to ``density`` when it can (its spec's density options)."""
    from vidsparse.methods import get_method

    spec = get_method(name)
    return {**spec.density_options, "density": density} if spec.targets_density else {}


def bench_shape(
    runner: Runner, args: argparse.Namespace, device: torch.device, tokens: int, grid: tuple[int, int, int], model: str
) -> None:
    """The dense baselines and every method's plan (flex vs triton) at one token count and head shape."""
    import vidsparse

    heads, head_dim = SMOKE_HEADS if args.smoke else MODELS[model]
    dtype = DTYPES[args.dtype]
    gen = torch.Generator(device=device).manual_seed(args.seed + tokens + heads)
    # [B, H, S, D] contiguous, as attention kernels read it; the planners get the diffusers view [B, S, H, D].
    q, k, v = (torch.randn(1, heads, tokens, head_dim, generator=gen, device=device).to(dtype) for _ in range(3))
    layout = VideoLayout(*grid)
    base = {"tokens": tokens, "grid": list(grid), "model": model, "heads": heads, "head_dim": head_dim}
    dense_flops = 4.0 * heads * head_dim * tokens * tokens
    reference: dict[str, Any] = {}

    def dense_case(name: str) -> Callable[[], dict[str, Any]]:
        def case() -> dict[str, Any]:
            fn = _sdpa_fn(q, k, v, name) if name.startswith("sdpa") else _flex_dense_fn(q, k, v)
            out = fn()  # compiles/warms up, and is checked against flash
            ms = time_ms(fn, device, smoke=args.smoke)
            if name == "sdpa_flash":
                reference["out"], reference["ms"] = out, ms
            diff = (out.float() - reference["out"].float()).abs().max().item() if "out" in reference else None
            return {**base, "kind": "dense", "executor": name, "ms": round(ms, 4), "tflops": _tflops(dense_flops, ms),
                    "max_abs_diff_vs_flash": diff}  # fmt: skip

        return case

    for name in DENSE_BASELINES:
        runner.run(f"{tokens}/{model}/dense/{name}", dense_case(name))

    def method_case(method: str) -> Callable[[], dict[str, Any]]:
        def case() -> dict[str, Any]:
            options = _method_options(method, args.density)
            _sync(device)
            start = time.perf_counter()
            plan = vidsparse.make_plan(method, q.transpose(1, 2), k.transpose(1, 2), layout, **options)
            _sync(device)
            plan_ms = (time.perf_counter() - start) * 1e3  # first call: includes any one-time compilation
            plan = plan.to(device)
            flops = 4.0 * head_dim * attended_pairs(plan, heads)
            flex, tri = _flex_fn(q, k, v, plan), _triton_fn(q, k, v, plan)
            # Same plan, two executors: their outputs must agree, or the timings compare different work.
            max_diff = (flex().float() - tri().float()).abs().max().item()
            flex_ms = time_ms(flex, device, smoke=args.smoke)
            triton_ms = time_ms(tri, device, smoke=args.smoke)
            density = plan.density()
            row = {**base, "kind": "sparse", "method": method, "options": options, "block_size": plan.block_size,
                   "density": round(density, 4), "flop_density": round(flops / dense_flops, 4),
                   "kmax": plan.kv_idx.shape[-1], "plan_ms": round(plan_ms, 3), "flex_ms": round(flex_ms, 4),
                   "triton_ms": round(triton_ms, 4), "flex_tflops": _tflops(flops, flex_ms),
                   "triton_tflops": _tflops(flops, triton_ms), "max_abs_diff_triton_vs_flex": max_diff}  # fmt: skip
            if "ms" in reference:
                speedup = reference["ms"] / triton_ms
                row.update(
                    speedup_vs_flash=round(speedup, 3),
                    flex_speedup_vs_flash=round(reference["ms"] / flex_ms, 3),
                    fraction_of_ideal=round(speedup * density, 3),
                )
            return row

        return case

    for method in vidsparse.method_names():
        runner.run(f"{tokens}/{model}/sparse/{method}", method_case(method))


def bench_planning(runner: Runner, args: argparse.Namespace, device: torch.device, tokens: int) -> None:
    """Planning helpers, torch vs Triton: block means of k and the LUT from a mask (HunyuanVideo heads, block 64)."""
    from .planning import block_mask_to_lut, block_means

    heads, head_dim = SMOKE_HEADS if args.smoke else MODELS["hunyuanvideo"]
    block_size = 64
    gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    k = torch.randn(1, heads, tokens, head_dim, generator=gen, device=device).to(DTYPES[args.dtype])
    qb = num_blocks(tokens, block_size)
    mask = torch.rand(1, heads, qb, qb, generator=gen, device=device) < 0.25
    for name, fn in (
        ("block_means", lambda backend: block_means(k, block_size, backend=backend)),
        ("block_mask_to_lut", lambda backend: block_mask_to_lut(mask, backend=backend)),
    ):

        def case(fn=fn, name=name) -> dict[str, Any]:
            same = _outputs_match(fn("torch"), fn("triton"))
            torch_ms = time_ms(lambda: fn("torch"), device, smoke=args.smoke)
            triton_ms = time_ms(lambda: fn("triton"), device, smoke=args.smoke)
            return {"kind": "planning", "op": name, "tokens": tokens, "block_size": block_size,
                    "torch_ms": round(torch_ms, 4), "triton_ms": round(triton_ms, 4),
                    "speedup": round(torch_ms / triton_ms, 3), "outputs_match": bool(same)}  # fmt: skip

        runner.run(f"{tokens}/planning/{name}", case)


def _outputs_match(a: torch.Tensor | tuple[torch.Tensor, ...], b: torch.Tensor | tuple[torch.Tensor, ...]) -> bool:
    """Index tensors must be equal; float results equal up to summation order."""
    if isinstance(a, tuple):
        return all(torch.equal(x, y) for x, y in zip(a, b))
    return torch.allclose(a.float(), b.float(), atol=1e-2 if a.dtype == torch.bfloat16 else 1e-4, rtol=1e-3)


def expected_cases(smoke: bool, planning: bool = True) -> list[str]:
    """The names of every case a run attempts, in order (a complete run has each in ``cases`` or ``skipped``)."""
    import vidsparse

    grids = SMOKE_GRIDS if smoke else GRIDS
    names = []
    for tokens in grids:
        for model in MODELS:
            names += [f"{tokens}/{model}/dense/{b}" for b in DENSE_BASELINES]
            names += [f"{tokens}/{model}/sparse/{m}" for m in vidsparse.method_names()]
    if planning:
        names += [f"{max(grids)}/planning/{op}" for op in ("block_means", "block_mask_to_lut")]
    return names


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(prog="python -m vidsparse.kernels.bench_gpu", description=__doc__.split("\n")[0])
    p.add_argument("--json", type=Path, default=None, help="output file (default: $OUT/ or samples/bench/)")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--density", type=float, default=0.25, help="target of the methods that plan to a density")
    p.add_argument("--budget-s", type=float, default=200.0, help="wall-clock budget; cases that do not fit are skipped")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-planning", action="store_true", help="skip the planning-helper cases")
    p.add_argument("--smoke", action="store_true", help="a tiny version of every case on any device: a dry run")
    args = p.parse_args(argv)
    if not 0.0 < args.density <= 1.0:
        p.error(f"--density {args.density} is invalid: expected a number in (0, 1].")
    if not args.budget_s > 0:
        p.error(f"--budget-s {args.budget_s} is invalid: expected seconds > 0.")
    return args


def default_json_path() -> Path:
    """``$OUT/bench_gpu.json`` when the ``OUT`` folder variable is set, else ``samples/bench/bench_gpu.json``."""
    out = os.environ.get("OUT")
    return (Path(out) if out else Path("samples") / "bench") / "bench_gpu.json"


def _check_interpreter(device: torch.device) -> str | None:
    """Why the Triton kernel cannot run on ``device`` in this process (None when it can)."""
    if device.type == "cuda":
        return None
    try:
        from .block_sparse_attn import is_interpreted
    except ImportError as exc:  # the kernel module refuses a half-interpreted Triton with a clear message
        return str(exc)
    if not is_interpreted():
        return "no CUDA device and TRITON_INTERPRET is not 1: set TRITON_INTERPRET=1 before Python starts."
    return None


def failures(report: dict[str, Any]) -> list[str]:
    """Why the run's numbers are not worth reporting: case errors, executors that disagree, planning mismatches."""
    tol = MAX_OUTPUT_DIFF[report["meta"]["dtype"]]
    bad = []
    for row in report["cases"]:
        if "error" in row:
            bad.append(f"{row['case']}: {row['error']}")
        diff = row.get("max_abs_diff_triton_vs_flex", row.get("max_abs_diff_vs_flash"))
        if diff is not None and not (math.isfinite(diff) and diff <= tol):
            bad.append(f"{row['case']}: outputs differ by {diff:.3g} > {tol:g}")
        if row.get("outputs_match") is False:
            bad.append(f"{row['case']}: Triton and torch outputs differ")
    return bad


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print one line per case, write the JSON; returns the exit status."""
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        print("bench_gpu: no CUDA device; only --smoke runs without one.", file=sys.stderr)
        return 2
    problem = _check_interpreter(device)
    if problem:
        print(f"bench_gpu: {problem}", file=sys.stderr)
        return 2
    import triton

    path = args.json or default_json_path()
    t0 = time.perf_counter()
    cuda = device.type == "cuda"
    report: dict[str, Any] = {
        "meta": {
            "command": " ".join(["python -m vidsparse.kernels.bench_gpu", *(sys.argv[1:] if argv is None else argv)]),
            "smoke": args.smoke,
            "complete": False,
            "budget_s": args.budget_s,
            "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
            "python": platform.python_version(),
            "torch": torch.__version__,
            "triton": triton.__version__,
            "cuda": torch.version.cuda,
            "dtype": args.dtype,
            "batch": 1,
            "models": {m: list(SMOKE_HEADS if args.smoke else hd) for m, hd in MODELS.items()},
            "max_output_diff": MAX_OUTPUT_DIFF[args.dtype],
            "flops": "4 * D * attended (query, key) pairs; dense 4 * B * H * D * S^2",
            "timing": "triton.testing.do_bench median (CUDA)" if cuda else "wall-clock (CPU smoke)",
            "dense_backends": "SDPA flash, SDPA cuDNN, compiled flex" if cuda else "SDPA math x2, eager flex (smoke)",
        },
        "cases": [],
        "skipped": [],
    }
    path.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        # Rewritten after every case: a run stopped by a time limit still leaves the cases it finished.
        report["meta"]["wall_s"] = round(time.perf_counter() - t0, 1)
        path.write_text(json.dumps(report, indent=2) + "\n")

    runner = Runner(report, Budget(args.budget_s, t0), save)
    grids = SMOKE_GRIDS if args.smoke else GRIDS
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager FlexAttention on CPU warns on every call in smoke mode
        for tokens, grid in grids.items():
            for model in MODELS:
                bench_shape(runner, args, device, tokens, grid, model)
                if cuda:
                    torch.cuda.empty_cache()  # this shape's q/k/v are freed; the next one is larger
        if not args.no_planning:
            bench_planning(runner, args, device, max(grids))
    report["meta"]["complete"] = not report["skipped"]
    save()
    print(f"wrote {path} ({len(report['cases'])} cases, {len(report['skipped'])} skipped)")
    bad = failures(report)
    for line in bad:
        print(f"bench_gpu: {line}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
