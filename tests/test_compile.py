"""torch.compile on the tiny Wan pipeline: graphs, graph breaks and recompiles per method, against stock diffusers.

Counted with :mod:`vidsparse.eval.compile_probe` (a counting backend, Dynamo's graph-break counter and its per-frame
compilation records), Dynamo tracing only (``backend="eager"``), over two resolutions. Every compiled run is also
checked against the eager run of the same generations: same latents, same per-call statistics (the root hook
records the calls of compiled processors).

- Regional compilation (``compile_repeated_blocks``, the recommended way): the static methods compile with
  ``fullgraph=True``, to as many graphs and recompiles as stock diffusers; the dynamic methods break only where
  they plan (``SparseRuntime.plan``, data-dependent Python).
- Whole-transformer compilation: the root hook's ``pre_forward``/``post_forward`` (step counting, Python state) are
  the only breaks for a static method.
"""

from __future__ import annotations

import pytest
import torch

from vidsparse.eval.compile_probe import (
    CompileCounter,
    Run,
    comparable_stats,
    compile_regions,
    run_compiled,
    run_eager,
)
from vidsparse.kernels.dispatch import block_sparse_attention
from vidsparse.layout import VideoLayout
from vidsparse.methods import build_plan, get_method, make_config, method_names

STATIC = [m for m in method_names() if get_method(m).static]  # dense, window, radial
DYNAMIC = [m for m in method_names() if not get_method(m).static]  # moba, draft, cached
STEPS = 2


def assert_same_as_eager(compiled: Run, eager: Run) -> None:
    for a, b in zip(compiled.outputs, eager.outputs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert comparable_stats(compiled.stats) == comparable_stats(eager.stats)


@pytest.fixture(scope="module")
def stock_regional():
    return run_compiled("stock", "regional", steps=STEPS).counts


def test_stock_regional_baseline(stock_regional):
    """What the comparisons below are relative to: one graph per resolution, no break, one recompile."""
    assert stock_regional.graph_breaks == 0
    assert stock_regional.graphs == 2 and stock_regional.compiles == 1 and stock_regional.recompiles == 1


@pytest.mark.parametrize("method", STATIC)
def test_static_methods_compile_fullgraph_regionally_like_stock(method, stock_regional):
    eager = run_eager(method, steps=STEPS)
    compiled = run_compiled(method, "regional", fullgraph=True, steps=STEPS)  # any graph break would raise
    counts = compiled.counts
    assert counts.graph_breaks == 0
    assert counts.graphs == stock_regional.graphs
    assert counts.compiles == stock_regional.compiles
    assert counts.recompiles <= stock_regional.recompiles  # the second resolution, nothing per step or layer
    assert all(r["sparse"] for r in compiled.stats)
    assert_same_as_eager(compiled, eager)


def test_warmup_switch_is_one_recompile_and_recorded():
    """dense_steps: the dense warm-up and the sparse steps are two graphs of the same code, switched by a guard on
    the prepared decision (a bool), never on the step counter itself."""
    method = "radial:dense_steps=1,dense_last_steps=1"
    geometry = [(17, 128, 192)]
    eager = run_eager(method, steps=4, geometries=geometry)
    compiled = run_compiled(method, "regional", fullgraph=True, steps=4, geometries=geometry)
    assert compiled.counts.graph_breaks == 0
    assert compiled.counts.compiles == 1 and compiled.counts.recompiles == 1  # dense, then sparse; dense reused
    reasons = [r["reason"] for r in compiled.stats if r["layer"] == 0 and r["context"] == "cond"]
    assert reasons == ["dense_steps", "sparse", "sparse", "dense_last_steps"]
    assert_same_as_eager(compiled, eager)


@pytest.mark.slow
@pytest.mark.parametrize("method", DYNAMIC)
def test_dynamic_methods_break_only_where_they_plan(method):
    eager = run_eager(method, steps=STEPS)
    compiled = run_compiled(method, "regional", steps=STEPS)
    reasons = compiled.counts.break_reasons
    assert reasons and all("SparseRuntime.plan" in reason for reason in reasons), reasons
    assert_same_as_eager(compiled, eager)


@pytest.mark.slow
def test_whole_transformer_compile_breaks_only_at_the_root_hook():
    stock = run_compiled("stock", "whole", steps=STEPS).counts
    eager = run_eager("radial", steps=STEPS)
    compiled = run_compiled("radial", "whole", steps=STEPS)
    counts = compiled.counts
    assert stock.graph_breaks == 0
    hook = ("VidSparseRootHook.pre_forward", "VidSparseRootHook.post_forward")
    assert counts.break_reasons and all(any(h in r for h in hook) for r in counts.break_reasons), counts.break_reasons
    assert counts.graphs == stock.graphs  # the forward itself is one graph per resolution, as stock
    assert counts.recompiles <= 2 * stock.recompiles  # the frame before pre_forward and the one after it
    assert_same_as_eager(compiled, eager)


def test_executor_dispatch_traces_without_breaks():
    """``auto`` resolved while tracing, the executor looked up without an import, the permutation's inverse
    computed in the graph: the dispatcher compiles fullgraph for a plan with a permutation (radial's tiles)."""
    layout = VideoLayout(5, 8, 12)
    plan = build_plan(make_config("radial", density=0.5), None, None, layout)
    assert plan.perm is not None
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, layout.seq_len, 2, 16, generator=gen) for _ in range(3))

    def attend(q, k, v):
        return block_sparse_attention(q, k, v, plan, backend="auto")

    with CompileCounter() as counter:
        out = torch.compile(attend, backend=counter, fullgraph=True)(q, k, v)
    assert counter.counts.graphs == 1 and counter.counts.graph_breaks == 0
    torch.testing.assert_close(out, block_sparse_attention(q, k, v, plan, backend="reference"))


def test_compile_regions_without_compile_repeated_blocks():
    """Older diffusers: every module of a class in ``_repeated_blocks`` is compiled, nothing else."""

    class Block(torch.nn.Linear):
        pass

    class Model(torch.nn.Module):
        _repeated_blocks = ["Block"]

        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([Block(4, 4), Block(4, 4)])
            self.head = torch.nn.Linear(4, 4)

    model = Model()
    compile_regions(model, backend="eager")
    assert all(b._compiled_call_impl is not None for b in model.blocks)
    assert model.head._compiled_call_impl is None and model._compiled_call_impl is None
    with pytest.raises(ValueError, match="no _repeated_blocks"):
        compile_regions(torch.nn.Linear(2, 2))


def test_gather_executor_compiles_fullgraph_too():
    """gather's schedule (host synchronisations) is built by the root hook with the static plan, before the blocks
    run: a compiled processor finds it cached on the plan."""
    eager = run_eager("radial", executor="gather", steps=STEPS)
    compiled = run_compiled("radial", "regional", fullgraph=True, executor="gather", steps=STEPS)
    assert compiled.counts.graph_breaks == 0 and compiled.counts.graphs == 2
    assert_same_as_eager(compiled, eager)


@pytest.mark.slow
def test_flex_executor_is_a_graph_break_by_design():
    """FlexAttention traced into the caller's graph would be compiled by the caller's backend, and every backend
    but inductor runs it eagerly, dense: the executor runs its own compiled FlexAttention, as a graph break."""
    geometry = [(17, 128, 192)]
    eager = run_eager("radial", executor="flex", steps=1, geometries=geometry)
    compiled = run_compiled("radial", "regional", executor="flex", steps=1, geometries=geometry)
    reasons = compiled.counts.break_reasons
    assert reasons and all("flex_block_sparse_attention" in r for r in reasons), reasons
    assert_same_as_eager(compiled, eager)
