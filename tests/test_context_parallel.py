"""diffusers context parallelism (Ulysses) with vidsparse: 2 processes on CPU/gloo must give 1 process's output.

The 2-process run is ``tests/cp_worker.py`` under torchrun (started first, in the background); the single-process
outputs are computed here meanwhile with the same code. Also single-process checks of the CP helpers.
"""

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import cp_worker
import pytest
import torch
from diffusers import ContextParallelConfig, ParallelConfig

import vidsparse
from vidsparse.pipelines.parallel import check_context_parallel, local_sequence_length

WORKER = Path(__file__).with_name("cp_worker.py")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("cp") / "cp.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER)]
    proc = subprocess.Popen([*cmd, str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        single = cp_worker.single_process()
        log, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, log[-6000:]
    return torch.load(out, weights_only=False), single


@pytest.mark.parametrize(
    "name, reference",
    [
        ("moba", "moba"),  # enable_parallelism, then apply; per-head plans from each rank's own head
        ("headwise_adopted", "headwise"),  # set_attn_processor after enable_parallelism: config adopted
        ("headwise", "headwise"),  # apply, then enable_parallelism; a plan for every head, cut per rank
        ("stock", "stock"),  # after handle.remove() (enable_parallelism first)
        ("stock_b", "stock"),  # after handle.remove() (enable_parallelism after apply: config handed back)
    ],
)
def test_ulysses_two_processes_equal_one(runs, name, reference):
    cp, single = runs
    torch.testing.assert_close(cp[name], single[reference], atol=1e-5, rtol=0)


def test_sparse_path_really_ran_on_the_full_sequence(runs):
    cp, single = runs
    # Sparse attention changes the output, so equality above is not the dense path in disguise.
    assert (single["moba"] - single["stock"]).abs().max() > 1e-3
    assert (single["headwise"] - single["stock"]).abs().max() > 1e-3
    for rank in cp["per_rank"]:
        rows = rank["moba_stats"]
        assert len(rows) == 8  # 2 steps x (cond, uncond) x 2 layers
        assert [r["sparse"] for r in rows] == [r["layer"] == 1 for r in rows]  # layer 0: dense_layers=1
        assert {r["tokens"] for r in rows} == {480}  # the full grid, not the 240-token shard
        assert all(r["density"] < 1 for r in rows if r["sparse"])
    # headwise: head 0 keeps its own blocks (1/8), head 1 everything; each rank planned its own head.
    densities = [{r["density"] for r in rank["headwise_stats"]} for rank in cp["per_rank"]]
    assert densities == [{0.125}, {1.0}]


def test_order_of_apply_and_enable_parallelism(runs):
    cp, _ = runs
    assert cp["b_reached"]  # enable_parallelism after apply reached the vidsparse processors
    assert cp["adopt_before"] and cp["adopt_after"]  # installed later: adopted the transformer's config
    assert cp["stock_restored"]


def test_ring_attention_is_refused_in_either_order(runs):
    cp, _ = runs
    for key in ("ring_apply_error", "ring_call_error"):
        message = cp[key]
        assert message is not None and "ring_degree=2" in message and "ulysses_degree=2" in message, key


def test_ulysses_forward_op_head_offsets_and_padding(runs):
    cp, _ = runs
    # (head offset, local heads, sequence) seen by each rank's forward op.
    even = [rank["ulysses_even"] for rank in cp["per_rank"]]
    assert [e["seen"] for e in even] == [[(0, 1, 256)], [(1, 1, 256)]]
    anything = [rank["ulysses_anything"] for rank in cp["per_rank"]]  # 3 heads, 131 tokens over 2 ranks
    assert [a["seen"] for a in anything] == [[(0, 2, 131)], [(2, 1, 131)]]
    assert all(r["max_diff"] < 1e-5 for r in even + anything)


def _cp(world, rank, anything=False):
    mesh = SimpleNamespace(get_local_rank=lambda: rank)
    return SimpleNamespace(ulysses_degree=world, ulysses_anything=anything, _flattened_mesh=mesh)


def test_local_sequence_length():
    assert [local_sequence_length(480, _cp(2, r)) for r in (0, 1)] == [240, 240]
    assert local_sequence_length(105, _cp(2, 0)) is None  # plain Ulysses cannot split it
    assert [local_sequence_length(105, _cp(2, r, anything=True)) for r in (0, 1)] == [53, 52]
    assert [local_sequence_length(10, _cp(4, r, anything=True)) for r in range(4)] == [3, 3, 2, 2]


def test_ring_refused_at_apply_without_processes():
    check_context_parallel(ContextParallelConfig(ulysses_degree=4))  # Ulysses is fine
    with pytest.raises(ValueError, match=r"ring_degree=2, ulysses_degree=2\).*ulysses_degree=4"):
        check_context_parallel(ContextParallelConfig(ring_degree=2, ulysses_degree=2))
    pipe = cp_worker.build_pipe()
    pipe.transformer._parallel_config = ParallelConfig(context_parallel_config=ContextParallelConfig(ring_degree=2))
    before = dict(pipe.transformer.attn_processors)
    with pytest.raises(ValueError, match="ring attention"):
        vidsparse.apply(pipe, "window")
    assert all(pipe.transformer.attn_processors[k] is v for k, v in before.items())  # nothing was touched
    assert not hasattr(pipe.transformer, "_vidsparse_handle")
