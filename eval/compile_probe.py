"""What ``torch.compile`` makes of a pipeline with vidsparse applied: graphs, graph breaks, compiles, recompiles.

For each method (and the stock pipeline), the tiny Wan pipeline is compiled two ways and run over two resolutions:

- ``regional``: ``transformer.compile_repeated_blocks(...)`` (diffusers' regional compilation: every transformer
  block compiled, the transformer's own forward and vidsparse's root hook left eager), the recommended way;
- ``whole``: ``transformer.compile(...)``: the whole forward, vidsparse's root hook included.

Counted with a backend that counts the graphs it is given, Dynamo's graph-break counter and its per-frame
compilation records (``torch._dynamo.utils.get_compilation_metrics``); ``fullgraph=True`` is tried as well, and the
compiled latents and statistics are compared with an eager run of the same generations. The README's
"torch.compile" table is this command's output::

    vidsparse study compile-probe

Method specs take options (``radial:dense_steps=1``); ``--executor gather`` runs every method on that executor.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

#: ``regional`` and ``whole`` (see the module docstring).
MODES = ("regional", "whole")
#: Two resolutions (frames, height, width): 5x8x12 = 480 and 5x8x8 = 320 latent tokens per self-attention call.
GEOMETRIES: tuple[tuple[int, int, int], ...] = ((17, 128, 192), (17, 128, 128))
#: The row of the pipeline without vidsparse.
STOCK = "stock"


@dataclass
class CompileCounts:
    """What Dynamo did during one run.

    Attributes:
        graphs: FX graphs handed to the backend (a graph break splits a frame's code into several).
        graph_breaks: Graph breaks met while tracing, over all traces (Dynamo's ``graph_break`` counter): a break in
            code traced three times (three compiles of its frame) counts three times.
        compiles: Frames compiled for the first time (Dynamo compile ids ``N/0``).
        recompiles: Later compiles of an already compiled frame (``N/1``, ``N/2``, ...: a guard failed).
        break_reasons: Graph-break reasons (first line) and how often each was met.
        recompile_reasons: The guard that failed, per recompile.
    """

    graphs: int = 0
    graph_breaks: int = 0
    compiles: int = 0
    recompiles: int = 0
    break_reasons: dict[str, int] = field(default_factory=dict)
    recompile_reasons: list[str] = field(default_factory=list)


def _short_reason(reason: str) -> str:
    """A graph-break reason's first line, with the function it names (``torch.compiler.disable``d ones)."""
    first = reason.strip().splitlines()[0]
    named = re.search(r"<function ([\w.<>]+) at 0x", reason)
    return f"{first} ({named.group(1)})" if named else first


class CompileCounter:
    """A ``torch.compile`` backend that counts graphs, and the Dynamo counters of one measured run.

    Use as a context manager: entering resets Dynamo (its caches are per code object, shared by every model of a
    class, so a count must start from nothing), leaving fills :attr:`counts`.

    Args:
        backend: The backend that compiles each counted graph: ``"eager"`` (run the FX graph as is: fast, the
            default) or any registered name (``"aot_eager"`` traces the backward too, ``"inductor"`` generates code).
    """

    def __init__(self, backend: str = "eager") -> None:
        self.backend_name = backend
        self.graphs = 0
        self.counts = CompileCounts()

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable:
        """The backend: count the graph, compile it with :attr:`backend_name`."""
        self.graphs += 1
        if self.backend_name == "eager":
            return gm.forward
        from torch._dynamo.backends.registry import lookup_backend

        return lookup_backend(self.backend_name)(gm, example_inputs)

    def __enter__(self) -> CompileCounter:
        from torch._dynamo import utils

        torch._dynamo.reset()
        utils.counters.clear()
        utils.clear_compilation_metrics()
        utils.set_compilation_metrics_limit(100_000)  # the default keeps the last 64 frames only
        self.graphs = 0
        return self

    def __exit__(self, *exc: Any) -> None:
        from torch._dynamo import utils

        breaks = Counter()
        for reason, n in utils.counters["graph_break"].items():
            breaks[_short_reason(reason)] += n
        counts = CompileCounts(graphs=self.graphs, graph_breaks=sum(breaks.values()), break_reasons=dict(breaks))
        for metrics in utils.get_compilation_metrics():
            # compile_id is "frame/compile" (with "_attempt" after a restart, e.g. "3/0_1"); "[...]" prefixes belong
            # to compiled autograd, which these runs do not use.
            frame_compile = str(metrics.compile_id).rsplit("/", 1)[-1].split("_")[0]
            if frame_compile == "0":
                counts.compiles += 1
            else:
                counts.recompiles += 1
                reason = (metrics.recompile_reason or "").strip().splitlines() or ["(no reason recorded)"]
                counts.recompile_reasons.append(reason[0][:200])
        self.counts = counts
        utils.set_compilation_metrics_limit(utils.DEFAULT_COMPILATION_METRICS_LIMIT)


def compile_regions(transformer: torch.nn.Module, **compile_kwargs: Any) -> None:
    """Regional compilation: compile every repeated block of ``transformer`` in place (its forward stays eager).

    ``compile_repeated_blocks`` where the installed diffusers has it, else ``block.compile()`` for every module whose
    class is in the model's ``_repeated_blocks``.
    """
    if hasattr(transformer, "compile_repeated_blocks"):
        transformer.compile_repeated_blocks(**compile_kwargs)
        return
    names = set(getattr(transformer, "_repeated_blocks", ()) or ())
    blocks = [m for m in transformer.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(f"{type(transformer).__name__} declares no _repeated_blocks to compile.")
    for block in blocks:
        block.compile(**compile_kwargs)


@dataclass
class ProbeResult:
    """One (method, mode) row.

    Attributes:
        method: Method spec, or ``"stock"`` (no vidsparse).
        mode: ``regional`` or ``whole``.
        counts: What the compiled run cost (``fullgraph=False``).
        fullgraph: Whether the same run compiles with ``fullgraph=True`` (None: not tried).
        fullgraph_error: First line of why not.
        max_abs_diff: Largest difference between the compiled and the eager latents, over all runs.
        stats_match: The compiled run's per-call statistics (``handle.stats()``, plan times aside) equal the eager
            run's (None for stock).
        seconds: Wall time of the compiled runs (compilation included).
    """

    method: str
    mode: str
    counts: CompileCounts
    fullgraph: bool | None = None
    fullgraph_error: str | None = None
    max_abs_diff: float = 0.0
    stats_match: bool | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly."""
        return dataclasses.asdict(self)


def _config(method: str, executor: str | None) -> Any:
    """The tiny pipelines' config of a method spec (``name`` or ``name:opt=value,...``), on ``executor``."""
    from vidsparse.methods import split_method_spec
    from vidsparse.pipelines.support import tiny_method_config

    name, options = split_method_spec(method)
    overrides = {key: value for key, value, _ in options}
    if executor is not None:
        overrides.setdefault("backend", executor)
    return tiny_method_config(name, **overrides)


@contextmanager
def _pipeline(method: str, executor: str | None, tiny: str) -> Iterator[tuple[Any, Any]]:
    """A fresh tiny pipeline with ``method`` applied (None handle for stock); removed afterwards.

    The geometry cache of static plans is emptied first: every run starts as in a new process, with plans (and what
    executors cache on them, such as ``gather``'s schedule) built during the run, not by an earlier one.
    """
    import vidsparse
    from vidsparse import methods
    from vidsparse.pipelines.offline import tiny as tiny_pipelines

    methods._STATIC_CACHE.clear()
    pipe = tiny_pipelines.build(tiny)
    pipe.set_progress_bar_config(disable=True)
    handle = None if method == STOCK else vidsparse.apply(pipe, _config(method, executor))
    try:
        yield pipe, handle
    finally:
        if handle is not None:
            handle.remove()


def _generate(pipe: Any, steps: int, geometry: tuple[int, int, int]) -> torch.Tensor:
    frames, height, width = geometry
    with torch.no_grad():
        return pipe(
            prompt="a red circle moves left",
            negative_prompt="",
            num_inference_steps=steps,
            guidance_scale=5.0,  # split classifier-free guidance: cond and uncond calls, as real pipelines run
            num_frames=frames,
            height=height,
            width=width,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
        ).frames


def comparable_stats(rows: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """Statistics rows without the planning time (a wall-clock measure), densities rounded: eager vs compiled."""
    if rows is None:
        return None
    return [{**{k: v for k, v in r.items() if k != "plan_ms"}, "density": round(float(r["density"]), 6)} for r in rows]


@dataclass
class Run:
    """One run of the generations: their latents, the handle's statistics, what compiling cost.

    Attributes:
        outputs: The latents of each geometry, in order.
        stats: ``handle.stats()`` after the runs (None for stock).
        counts: What Dynamo did (empty for an eager run).
        seconds: Wall time of the generations (compilation included).
    """

    outputs: list[torch.Tensor]
    stats: list[dict[str, Any]] | None
    counts: CompileCounts = field(default_factory=CompileCounts)
    seconds: float = 0.0


def run_eager(
    method: str = STOCK,
    *,
    executor: str | None = None,
    steps: int = 4,
    geometries: Sequence[tuple[int, int, int]] = GEOMETRIES,
    tiny: str = "wan",
) -> Run:
    """The generations of :func:`run_compiled`, uncompiled: the reference."""
    with _pipeline(method, executor, tiny) as (pipe, handle):
        start = time.perf_counter()
        outputs = [_generate(pipe, steps, g) for g in geometries]
        seconds = time.perf_counter() - start
        stats = handle.stats() if handle is not None else None
    return Run(outputs, stats, seconds=seconds)


def run_compiled(
    method: str = STOCK,
    mode: str = "regional",
    *,
    fullgraph: bool = False,
    backend: str = "eager",
    executor: str | None = None,
    steps: int = 4,
    geometries: Sequence[tuple[int, int, int]] = GEOMETRIES,
    tiny: str = "wan",
) -> Run:
    """Apply ``method`` to a fresh tiny pipeline, compile it in ``mode`` and run every geometry, counting.

    Args:
        method: A method spec (``"radial"``, ``"radial:dense_steps=1"``) or ``"stock"`` (no vidsparse).
        mode: ``"regional"`` (compile the repeated blocks) or ``"whole"`` (compile the transformer).
        fullgraph: ``torch.compile``'s: any graph break raises (the exception propagates).
        backend: The compiler backend each graph goes to (``"eager"``: Dynamo's tracing only).
        executor: The methods' ``backend=`` option (default: the tiny config's, ``auto``: ``cpp`` on CPU float32).
        steps: Denoising steps per generation (split classifier-free guidance: two transformer calls each).
        geometries: ``(frames, height, width)`` of the generations, in order (a second one costs a recompile).
        tiny: The tiny pipeline (a Wan layout).
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: expected one of {', '.join(MODES)}.")
    try:
        with _pipeline(method, executor, tiny) as (pipe, handle):
            counter = CompileCounter(backend)
            with counter:
                if mode == "regional":
                    compile_regions(pipe.transformer, backend=counter, fullgraph=fullgraph)
                else:
                    pipe.transformer.compile(backend=counter, fullgraph=fullgraph)
                start = time.perf_counter()
                outputs = [_generate(pipe, steps, g) for g in geometries]
                seconds = time.perf_counter() - start
            stats = handle.stats() if handle is not None else None
    finally:
        torch._dynamo.reset()  # the compiled code of these blocks would otherwise serve the next model's
    return Run(outputs, stats, counter.counts, seconds)


def probe(
    method: str = STOCK,
    mode: str = "regional",
    *,
    backend: str = "eager",
    executor: str | None = None,
    steps: int = 4,
    geometries: Sequence[tuple[int, int, int]] = GEOMETRIES,
    try_fullgraph: bool = True,
    tiny: str = "wan",
) -> ProbeResult:
    """Count what compiling the tiny pipeline costs with ``method`` applied (``"stock"``: without vidsparse).

    Runs the generations eagerly (the reference latents and statistics), then compiled in ``mode`` with
    ``fullgraph=False`` (the counts), then, with ``try_fullgraph``, once more with ``fullgraph=True``. The arguments
    are :func:`run_compiled`'s.
    """
    kw = dict(backend=backend, executor=executor, steps=steps, geometries=geometries, tiny=tiny)
    eager = run_eager(method, executor=executor, steps=steps, geometries=geometries, tiny=tiny)
    run = run_compiled(method, mode, **kw)
    result = ProbeResult(method, mode, run.counts, seconds=round(run.seconds, 2))
    result.max_abs_diff = max(float((a - b).abs().max()) for a, b in zip(run.outputs, eager.outputs, strict=True))
    if eager.stats is not None:
        result.stats_match = comparable_stats(run.stats) == comparable_stats(eager.stats)
    if try_fullgraph:
        try:
            run_compiled(method, mode, fullgraph=True, **kw)
            result.fullgraph = True
        except Exception as exc:  # fullgraph's refusal is a torch._dynamo.exc.Unsupported, wrapped variously
            result.fullgraph = False
            result.fullgraph_error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}"
    return result


def format_table(results: Sequence[ProbeResult]) -> str:
    """A markdown table: one row per method, the regional and the whole-transformer counts side by side."""
    by_method: dict[str, dict[str, ProbeResult]] = {}
    for r in results:
        by_method.setdefault(r.method, {})[r.mode] = r
    modes = [m for m in MODES if any(m in row for row in by_method.values())]
    header = ["method"]
    for m in modes:
        header += [f"{m}: graphs", "breaks", "compiles + recompiles", "fullgraph"]
    header += ["compiled = eager"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def yes_no(value: bool | None) -> str:
        return "-" if value is None else ("yes" if value else "no")

    for method, row in by_method.items():
        cells = [f"`{method}`"]
        same = True
        for m in modes:
            r = row.get(m)
            if r is None:
                cells += ["-"] * 4
                continue
            c = r.counts
            cells += [str(c.graphs), str(c.graph_breaks), f"{c.compiles} + {c.recompiles}", yes_no(r.fullgraph)]
            same = same and r.max_abs_diff <= 1e-5 and r.stats_match is not False
        cells.append("yes" if same else "no")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_details(results: Sequence[ProbeResult]) -> str:
    """Graph-break and recompile reasons of every row (what the table counts)."""
    out = []
    for r in results:
        c = r.counts
        out.append(f"{r.method} / {r.mode}: {c.graphs} graphs, {c.graph_breaks} breaks, {c.compiles} + {c.recompiles}")
        out += [f"  break x{n}: {reason}" for reason, n in c.break_reasons.items()]
        out += [f"  recompile: {reason}" for reason in c.recompile_reasons]
        if r.fullgraph_error:
            out.append(f"  fullgraph: {r.fullgraph_error}")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Command-line entry: ``vidsparse study compile-probe [--methods ...] [--modes ...] [--json F]``."""
    from vidsparse.methods import method_names

    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument(
        "--methods", nargs="+", default=[STOCK, *method_names()], help="method specs, and 'stock' (no vidsparse)"
    )
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--backend", default="eager", help="compiler backend (eager, aot_eager, inductor)")
    parser.add_argument("--executor", help="the methods' backend= option (default: auto)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument(
        "--geometries",
        nargs="+",
        default=[f"{f}x{h}x{w}" for f, h, w in GEOMETRIES],
        help="generations in order, FRAMESxHEIGHTxWIDTH in pixels (default: %(default)s)",
    )
    parser.add_argument("--no-fullgraph", action="store_true", help="skip the fullgraph=True runs")
    parser.add_argument("--details", action="store_true", help="print every graph-break and recompile reason")
    parser.add_argument("--json", help="write the rows to this JSON file")
    args = parser.parse_args(argv)
    geometries = [tuple(int(x) for x in g.lower().split("x")) for g in args.geometries]
    if any(len(g) != 3 for g in geometries):
        parser.error("--geometries: expected FRAMESxHEIGHTxWIDTH, e.g. 17x128x192")
    results = []
    for method in args.methods:
        for mode in args.modes:
            results.append(
                probe(
                    method,
                    mode,
                    backend=args.backend,
                    executor=args.executor,
                    steps=args.steps,
                    geometries=geometries,
                    try_fullgraph=not args.no_fullgraph,
                )
            )
    print(format_table(results))
    if args.details:
        print()
        print(format_details(results))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"rows": [r.to_dict() for r in results]}, fh, indent=2)
    return 0
