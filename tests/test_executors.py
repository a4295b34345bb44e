import pytest
import torch
from helpers import cpu_executors, has_cxx_compiler, qkv, random_plan
from hypothesis import given, settings
from hypothesis import strategies as st

import vidsparse
from vidsparse.kernels.dispatch import block_sparse_attention
from vidsparse.plan import BlockPlan

# Fixed shapes: flex compiles once per shape (tests vary plan *data*, never shapes, to stay fast).
B, S, H, D = 2, 300, 3, 16

#: The fast executors that run on CPU (from the registry); each must match the reference exactly (float32 tolerance).
#: cpp needs a C++ compiler (this project's machines have one; without one auto falls back to gather, tested below).
CPU_BACKENDS = cpu_executors()
needs_compiler = pytest.mark.skipif(not has_cxx_compiler(), reason="no C++ compiler: the cpp kernel cannot be built")


def test_reference_full_plan_equals_sdpa():
    q, k, v = qkv(B, S, H, D)
    out = block_sparse_attention(q, k, v, BlockPlan.full(S, 64), backend="reference")
    sdpa = torch.nn.functional.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v))).transpose(1, 2)
    torch.testing.assert_close(out, sdpa, atol=1e-5, rtol=1e-5)


def test_reference_matches_explicit_masked_softmax():
    q, k, v = qkv(1, 130, 1, 8, seed=1)
    plan = random_plan(130, 64, density=0.3, seed=2)
    mask = plan.to_dense_mask()[0, 0]
    scores = (q[0, :, 0] @ k[0, :, 0].T) / 8**0.5
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1)
    expected = probs @ v[0, :, 0]
    out, lse = block_sparse_attention(q, k, v, plan, backend="reference", return_lse=True)
    torch.testing.assert_close(out[0, :, 0], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse[0, 0], torch.logsumexp(scores.masked_fill(~mask, float("-inf")), -1))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@settings(max_examples=12, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    density=st.floats(0.0, 1.0),
    per_head=st.booleans(),
    perm=st.booleans(),
    block_size=st.sampled_from([64, 128]),
)
def test_fast_executor_matches_reference_on_random_plans(backend, seed, density, per_head, perm, block_size):
    q, k, v = qkv(B, S, H, D, seed=seed)
    plan = random_plan(
        S, block_size, b=B if per_head else 1, h=H if per_head else 1, density=density, seed=seed, perm=perm
    ).validate()
    ref = block_sparse_attention(q, k, v, plan, backend="reference")
    out = block_sparse_attention(q, k, v, plan, backend=backend)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_key_padding_mask_is_anded(backend):
    q, k, v = qkv(B, S, H, D, seed=5)
    plan = random_plan(S, 64, density=0.5, seed=5)
    keep = torch.ones(B, S, dtype=torch.bool)
    keep[0, 250:] = False  # padded keys of sample 0 (like padded text)
    keep[1, 290:] = False
    ref = block_sparse_attention(q, k, v, plan, backend="reference", key_padding_mask=keep)
    out = block_sparse_attention(q, k, v, plan, backend=backend, key_padding_mask=keep)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # and the padding really changed the result
    assert (ref - block_sparse_attention(q, k, v, plan, backend="reference")).abs().max() > 1e-3


def test_flex_lse_on_cpu_falls_back_with_warning():
    q, k, v = qkv(B, S, H, D, seed=6)
    plan = random_plan(S, 64, density=0.5, seed=6, perm=True)
    _, ref_lse = block_sparse_attention(q, k, v, plan, backend="reference", return_lse=True)
    _, lse = block_sparse_attention(q, k, v, plan, backend="flex", return_lse=True)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)


def test_flex_does_not_recompile_for_new_plan_data():
    from torch._dynamo.utils import counters

    q, k, v = qkv(B, S, H, D, seed=7)
    block_sparse_attention(q, k, v, random_plan(S, 64, density=0.2, seed=0), backend="flex")  # compiled (maybe)
    before = counters["stats"]["unique_graphs"]
    for seed in range(1, 5):
        block_sparse_attention(q, k, v, random_plan(S, 64, density=0.2 * seed, seed=seed), backend="flex")
    assert counters["stats"]["unique_graphs"] == before


@pytest.mark.parametrize("backend", ["auto", *cpu_executors(dtype=torch.bfloat16)])  # auto hands bf16 to gather
def test_bf16_close_to_fp32_reference(backend):
    q, k, v = qkv(B, S, H, D, seed=8)
    plan = random_plan(S, 64, density=0.4, seed=8)
    ref = block_sparse_attention(q, k, v, plan, backend="reference")
    out = block_sparse_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), plan, backend=backend)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)


def test_cpp_refuses_other_dtypes_by_name():
    q, k, v = (x.bfloat16() for x in qkv(1, 100, 2, 8))
    with pytest.raises(ValueError, match=r"backend='cpp' runs float32.*dtype=torch.bfloat16"):
        block_sparse_attention(q, k, v, random_plan(100, 64, density=0.5, seed=0), backend="cpp")


@needs_compiler
def test_auto_on_cpu_is_the_cpp_kernel_for_float32():
    """Where a C++ compiler exists (this project's machines and CI), auto must get the kernel, not fall back."""
    from vidsparse.kernels.dispatch import resolve_backend

    assert resolve_backend("auto", torch.device("cpu"), torch.float32) == "cpp"
    assert resolve_backend("auto", torch.device("cpu"), torch.bfloat16) == "gather"


def test_auto_falls_back_to_gather_when_the_kernel_cannot_be_built(monkeypatch):
    """No compiler (or a failed build): auto warns once and uses gather; an explicit cpp says why it cannot run."""
    import vidsparse.kernels.dispatch as kernels
    from vidsparse.kernels import cpp

    def broken_build():
        raise RuntimeError("the cpp executor's kernel could not be built: no compiler")

    monkeypatch.setattr(cpp, "load_cpp_kernel", broken_build)
    monkeypatch.setattr(cpp, "cpp_kernel_available", lambda: False)
    monkeypatch.setattr(kernels, "_warned", set())
    q, k, v = qkv(1, 130, 2, 8, seed=12)
    plan = random_plan(130, 64, density=0.5, seed=12)
    ref = block_sparse_attention(q, k, v, plan, backend="reference")
    with pytest.warns(UserWarning, match="cpp CPU kernel could not be built"):
        assert kernels.resolve_backend("auto", torch.device("cpu"), torch.float32) == "gather"
    torch.testing.assert_close(block_sparse_attention(q, k, v, plan, backend="auto"), ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="could not be built: no compiler"):
        block_sparse_attention(q, k, v, plan, backend="cpp")


def test_a_slow_kernel_build_says_it_is_compiling(monkeypatch, capsys):
    """A first build takes about 30 s: the user is told, instead of a silent pause (a cached load says nothing)."""
    import time

    import torch.utils.cpp_extension

    from vidsparse.kernels import cpp

    monkeypatch.setattr(cpp, "COMPILE_NOTICE_AFTER_S", 0.05)
    monkeypatch.setattr(torch.utils.cpp_extension, "load", lambda **kwargs: time.sleep(0.3) or "module")
    assert cpp.load_cpp_kernel.__wrapped__() == "module"
    assert "compiling the cpp CPU kernel" in capsys.readouterr().err
    monkeypatch.setattr(torch.utils.cpp_extension, "load", lambda **kwargs: "module")
    assert cpp.load_cpp_kernel.__wrapped__() == "module"
    assert capsys.readouterr().err == ""


@needs_compiler
def test_cpp_empty_rows_and_tail_block_match_reference():
    """Rows that keep nothing get zeros / LSE -inf; a tail block of one token; batch 2 with per-head plans."""
    s = 129  # two blocks of 64 and a partial block of one token
    q, k, v = qkv(2, s, 3, 8, seed=11)
    plan = random_plan(s, 64, b=2, h=3, density=0.5, seed=11).validate()
    plan.kv_num[0, 0, 1] = 0  # a query block that keeps no key block
    ref, ref_lse = block_sparse_attention(q, k, v, plan, backend="reference", return_lse=True)
    out, lse = block_sparse_attention(q, k, v, plan, backend="cpp", return_lse=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)
    assert bool(torch.isinf(lse[0, 0, 64:128]).all()) and bool((out[0, 64:128, 0] == 0).all())


def test_public_attention_and_errors():
    q, k, v = qkv(1, 100, 2, 8)
    plan = BlockPlan.full(100, 64)
    out = vidsparse.attention(q, k, v, plan, backend="reference")
    assert out.shape == q.shape
    with pytest.raises(ValueError, match="seq_len=100"):
        vidsparse.attention(q[:, :90], k[:, :90], v[:, :90], plan, backend="reference")
    with pytest.raises(ValueError, match="backend='cuda'"):
        vidsparse.attention(q, k, v, plan, backend="cuda")
    bad = random_plan(100, 64, b=3, seed=1)
    with pytest.raises(ValueError, match="broadcast"):
        vidsparse.attention(q, k, v, bad, backend="reference")


def test_flex_never_falls_back_to_eager_after_many_shapes():
    """Dynamo runs a function eagerly once its recompile limit is hit, and eager FlexAttention ignores the block
    lists (dense result). The flex executor raises the limit for its own calls: with a global limit of 1, a second
    shape must still be computed sparse, not silently dense."""
    with torch._dynamo.config.patch(recompile_limit=1):
        for seq_len in (130, 194):  # two new shapes: the second would exceed a limit of 1
            q, k, v = qkv(1, seq_len, 1, 16, seed=seq_len)
            plan = random_plan(seq_len, 64, density=0.3, seed=seq_len)
            ref = block_sparse_attention(q, k, v, plan, backend="reference")
            out = block_sparse_attention(q, k, v, plan, backend="flex")
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_gather_lse_matches_reference():
    q, k, v = qkv(B, S, H, D, seed=9)
    plan = random_plan(S, 64, b=B, h=H, density=0.4, seed=9, perm=True)
    keep = torch.ones(B, S, dtype=torch.bool)
    keep[1, 280:] = False
    ref, ref_lse = block_sparse_attention(q, k, v, plan, backend="reference", return_lse=True, key_padding_mask=keep)
    out, lse = block_sparse_attention(q, k, v, plan, backend="gather", return_lse=True, key_padding_mask=keep)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk_tokens", [64, 1 << 16])
def test_gather_chunking_and_shared_key_lists(chunk_tokens):
    """Query blocks that share a key list are computed as one group; chunks of one group per call (64 tokens)
    or all groups at once give the same exact result, text tokens and the partial tail block included."""
    from vidsparse.kernels.gather import gather_block_sparse_attention, gather_schedule
    from vidsparse.layout import VideoLayout
    from vidsparse.methods import build_plan, parse_method_spec

    layout = VideoLayout(4, 6, 9, text_len=11)  # 227 tokens: 4 blocks of 64, the last one partial
    q, k, v = qkv(2, layout.seq_len, 2, D, seed=10)
    plan = build_plan(parse_method_spec("window:window=1"), q, k, layout)
    assert any(bucket.q_blocks.shape[1] > 1 for bucket in gather_schedule(plan, 2, 2))  # groups really formed
    ref = block_sparse_attention(q, k, v, plan, backend="reference")
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))
    out, _ = gather_block_sparse_attention(qh, kh, vh, plan, chunk_tokens=chunk_tokens)
    torch.testing.assert_close(out.transpose(1, 2), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_split_windows_equal_reference(dtype):
    """Windows of neighbouring query blocks computed against their shared keys, the rest merged by LSE: exact,
    with a partial tail block, per-head plans, padded keys, block-causal groups and the LSE."""
    from vidsparse.kernels.gather import gather_block_sparse_attention, gather_schedule
    from vidsparse.layout import VideoLayout
    from vidsparse.methods import build_plan, parse_method_spec

    layout = VideoLayout(7, 12, 16, text_len=13)  # 1357 tokens: 22 blocks of 64, the last one partial
    q, k, v = qkv(2, layout.seq_len, 2, D, seed=11)
    plan = build_plan(parse_method_spec("radial:density=0.35"), q, k, layout)
    plan = BlockPlan(plan.kv_num, plan.kv_idx, plan.block_size, plan.seq_len)  # its blocks, in token order
    schedule = gather_schedule(plan, 2, 2, split=True)
    assert any(bucket.merge for bucket in schedule)  # the split really happens on a banded plan
    assert any(bucket.q_blocks.shape[1] >= 4 and not bucket.merge for bucket in schedule)
    keep = torch.ones(2, plan.seq_len, dtype=torch.bool)
    keep[1, -40:] = False
    groups = (torch.arange(plan.seq_len) // 100)[None]  # block-causal groups of 100 tokens
    q, k, v = (x.to(dtype) for x in (q, k, v))
    kwargs = {"return_lse": True, "key_padding_mask": keep, "causal_groups": groups}
    ref, ref_lse = block_sparse_attention(q, k, v, plan, backend="reference", **kwargs)
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    for split in (True, False):
        out, lse = gather_block_sparse_attention(qh, kh, vh, plan, split=split, **kwargs)
        torch.testing.assert_close(out.transpose(1, 2), ref, **tol)
        torch.testing.assert_close(lse, ref_lse, atol=1e-4 if dtype == torch.float32 else 2e-2, rtol=1e-4)


def test_merge_partials_is_attention_over_the_union():
    from vidsparse.kernels.gather import merge_partials

    torch.manual_seed(0)
    q, k, v = torch.randn(3, 5, 8), torch.randn(3, 20, 8), torch.randn(3, 20, 8)
    scores = q @ k.transpose(1, 2)

    def attend(cols):
        lse = torch.logsumexp(scores[..., cols], dim=-1)
        return torch.softmax(scores[..., cols], dim=-1) @ v[:, cols], lse

    out, lse = merge_partials(*attend(slice(0, 7)), *attend(slice(7, 20)))
    full, full_lse = attend(slice(0, 20))
    torch.testing.assert_close(out, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, full_lse, atol=1e-5, rtol=1e-5)
    none = torch.full((3, 5), float("-inf"))  # a query that saw no key in either part: zeros, as the reference
    out, lse = merge_partials(torch.zeros(3, 5, 8), none, torch.zeros(3, 5, 8), none)
    assert torch.equal(out, torch.zeros(3, 5, 8)) and torch.isinf(lse).all()


def test_similar_windows_pair_blocks_by_shared_keys():
    """Windows are built from the blocks that share the most key blocks, wherever they are in the sequence; they
    nest (2 inside 4 inside 8), never mix (batch, head) rows, and leave out non-candidates and blocks that share
    nothing."""
    from vidsparse.kernels.gather import _similar_windows

    qb, heads = 8, 2
    keeps = torch.zeros(heads * qb, qb, dtype=torch.bool)
    # Head 0: blocks 0 and 5 keep {0, 1, 2}, blocks 1 and 6 keep {3, 4, 5}; 2 and 3 keep {6} and {7} (share nothing).
    for row, cols in {0: [0, 1, 2], 5: [0, 1, 2, 7], 1: [3, 4, 5], 6: [3, 4, 5, 6], 2: [6], 3: [7], 4: [0, 3]}.items():
        keeps[row, cols] = True
    keeps[7, [1, 4]] = True
    keeps[qb:] = keeps[:qb]  # head 1: the same lists, but block 5 is not a candidate
    candidate = torch.ones(heads * qb, dtype=torch.bool)
    candidate[qb + 5] = False
    windows = _similar_windows(keeps, candidate, heads, qb)
    pairs = windows[2]
    assert pairs[0] == pairs[5] and pairs[1] == pairs[6]  # best partners, far apart
    assert pairs[0] != pairs[1] and pairs[2] != pairs[3]
    assert pairs[qb + 1] == pairs[qb + 6] and pairs[qb + 0] != pairs[qb + 5]  # a non-candidate joins nothing
    assert bool((windows[2] // qb == torch.arange(heads * qb) // qb).all())  # ids stay in their head's rows
    for small, large in ((2, 4), (4, 8)):
        for row in range(heads * qb):  # members of one small window share their large window
            same = windows[small] == windows[small][row]
            assert bool((windows[large][same] == windows[large][row]).all())
    assert int(torch.bincount(windows[8][:qb]).max()) <= 8


def test_draft_plans_run_mostly_in_multi_block_calls():
    """Draft's blocks pick their keys by content; the matched windows still put most of its kept pairs into calls of
    two or more query blocks (position windows left 0.80 of them in single-block calls at this geometry)."""
    from vidsparse.eval.synthetic import synthetic_qkv
    from vidsparse.kernels.gather import gather_schedule
    from vidsparse.layout import VideoLayout
    from vidsparse.methods import PlanContext, build_plan, parse_method_spec

    layout = VideoLayout(9, 30, 52)  # Wan 480p, 14 040 tokens
    q, k, _ = synthetic_qkv(layout, heads=2, head_dim=64)
    plan = build_plan(parse_method_spec("draft:density=0.25"), q, k, layout, PlanContext(layer=0, step=0))
    pairs_by_width: dict[int, int] = {}
    for bucket in gather_schedule(plan, 1, 2, split=True):
        rows, width = bucket.q_blocks.shape
        pairs_by_width[width] = pairs_by_width.get(width, 0) + rows * width * bucket.kv_blocks.shape[1]
    single = pairs_by_width.get(1, 0) / sum(pairs_by_width.values())
    assert single < 0.45, pairs_by_width
    assert max(pairs_by_width) >= 4


def test_registry_drives_config_auto_and_cli(monkeypatch):
    """A new executor is one file with an ``EXECUTOR`` entry plus one registry line: configs accept its name, the
    dispatcher runs it (in plan order), ``auto`` picks it where it is preferred and fits, and the CLI offers it."""
    import sys
    import types

    from vidsparse.commands.common import add_backend_arg
    from vidsparse.kernels import registry
    from vidsparse.kernels.dispatch import resolve_backend
    from vidsparse.kernels.reference import reference_attention
    from vidsparse.methods import make_config

    calls = []

    def fake_run(q, k, v, plan, **kwargs):
        calls.append(q.shape)
        plain = BlockPlan(plan.kv_num, plan.kv_idx, plan.block_size, plan.seq_len)  # inputs arrive in plan order
        return reference_attention(q, k, v, plain, **kwargs)

    module = types.ModuleType("fake_executor")
    module.EXECUTOR = registry.Executor("fake", fake_run, "test", devices=("cpu",), dtypes=(torch.float64,))
    monkeypatch.setitem(sys.modules, "fake_executor", module)
    with pytest.raises(ValueError, match="backend='fake' is invalid"):
        make_config("radial", backend="fake")
    monkeypatch.setattr(registry, "_EXECUTOR_MODULES", {"fake": "fake_executor", **registry._EXECUTOR_MODULES})
    assert make_config("radial", backend="fake").backend == "fake"
    assert resolve_backend("auto", torch.device("cpu"), torch.float64) == "fake"  # first in order, fits
    assert resolve_backend("auto", torch.device("cpu"), torch.float32) != "fake"  # not its dtype
    q, k, v = (x.double() for x in qkv(1, 130, 2, 8, seed=13))
    plan = random_plan(130, 64, density=0.5, seed=13, perm=True)
    out = block_sparse_attention(q, k, v, plan, backend="fake")
    assert calls == [(1, 2, 130, 8)]  # [B, H, S, D]
    # Equal to the reference only if the dispatcher applied the permutation (the fake ignores plan.perm).
    torch.testing.assert_close(out, block_sparse_attention(q, k, v, plan, backend="reference"))
    import argparse

    parser = argparse.ArgumentParser()
    add_backend_arg(parser)
    assert parser.parse_args(["--backend", "fake"]).backend == "fake"
    assert "fake" in parser.format_help()


def test_registry_entries_are_consistent():
    from vidsparse.config import SparseConfig
    from vidsparse.kernels.registry import backend_names, executor_names, executors

    assert backend_names() == ("auto", *executor_names())
    assert [spec.name for spec in executors()] == list(executor_names())
    for name in backend_names():
        assert SparseConfig(backend=name).backend == name
    with pytest.raises(ValueError, match=r"backend='cuda' is invalid: expected one of 'auto', 'triton'"):
        SparseConfig(backend="cuda")
