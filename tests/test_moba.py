"""Tests of the ``moba`` method (VMoBA): partitions, selection rules, plan expansion, executors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import vidsparse
from vidsparse.eval.synthetic import synthetic_qkv
from vidsparse.kernels.dispatch import block_sparse_attention
from vidsparse.layout import VideoLayout
from vidsparse.methods import PlanContext, build_plan, parse_method_spec
from vidsparse.methods.moba import (
    MoBAConfig,
    chunk_partition,
    chunk_scores,
    chunk_shape,
    normalize_scores,
    partition_kind,
    select_chunks,
    select_head_global,
    select_threshold,
    select_topk,
)
from vidsparse.pipelines.offline import tiny
from vidsparse.plan import BlockPlan

# A ragged geometry: 315 video tokens (5 blocks, the last partial); none of the chunk shapes below divide it.
RAGGED = VideoLayout(5, 7, 9)
SMALL_SHAPES = {"frames_1d": 2, "patch_2d": (3, 4), "cuboid_3d": (2, 3, 4)}
SMALL_SHAPES_CLI = {"frames_1d": 2, "patch_2d": "3/4", "cuboid_3d": "2/3/4"}


def small_config(**overrides) -> MoBAConfig:
    return MoBAConfig(**{**SMALL_SHAPES, **overrides})


def qkv(layout: VideoLayout, batch: int = 1, seed: int = 0):
    return synthetic_qkv(layout, heads=4, head_dim=16, batch=batch, seed=seed)


# ------------------------------------------------------------------------------------------------- partition
@pytest.mark.parametrize("kind", ["1d", "2d", "3d"])
def test_partition_makes_each_chunk_a_contiguous_tile(kind):
    cfg = small_config()
    tile = chunk_shape(RAGGED, cfg, kind)
    part = chunk_partition(RAGGED, tile, 64)
    n = RAGGED.num_video_tokens
    order = torch.arange(n) if part.video_order is None else part.video_order
    assert torch.equal(order.sort().values, torch.arange(n))
    chunk_along_plan = part.chunk_of_token[order]
    # Contiguous chunks: the chunk id never decreases along the plan order and every id appears.
    assert bool((chunk_along_plan[1:] >= chunk_along_plan[:-1]).all())
    assert int(chunk_along_plan.unique().numel()) == part.num_chunks
    # A chunk is exactly one tile of the grid: tokens share a chunk iff they share the tile coordinate.
    coords = RAGGED.token_coords()
    tile_coord = coords // torch.tensor(tile)
    pairs = torch.unique(torch.cat([part.chunk_of_token[:, None], tile_coord], 1), dim=0)
    assert pairs.shape[0] == part.num_chunks
    assert float(part.chunk_sizes.sum()) == n
    assert float(part.chunk_sizes.max()) == math.prod(min(a, b) for a, b in zip(tile, RAGGED.grid))


@pytest.mark.parametrize("kind", ["1d", "2d", "3d"])
def test_aligned_partition_is_whole_blocks(kind):
    """``align_chunks``: every block in exactly one chunk, chunks runs of whole blocks, each of its majority chunk."""
    layout = VideoLayout(9, 30, 52)
    tile = chunk_shape(layout, MoBAConfig(), kind)
    exact = chunk_partition(layout, tile, 64)
    part = chunk_partition(layout, tile, 64, align=True)
    assert bool((part.overlap.sum(-1) == 1).all())
    block_chunk = part.overlap.float().argmax(-1)
    assert bool((block_chunk[1:] >= block_chunk[:-1]).all()) and int(block_chunk[-1]) == part.num_chunks - 1
    assert torch.equal(part.chunk_of_token, block_chunk[part.block_of_token])
    # Each block's chunk is the exact tile holding most of its tokens (renumbered: tiles that win no block vanish).
    counts = torch.zeros(part.num_blocks, exact.num_chunks)
    counts.index_put_(
        (exact.block_of_token, exact.chunk_of_token), torch.ones(layout.num_video_tokens), accumulate=True
    )
    majority = counts.argmax(-1)
    assert torch.equal(torch.unique(majority, return_inverse=True)[1], block_chunk)


@pytest.mark.parametrize("layer", [1, 2])
def test_aligned_chunks_compute_exactly_the_selection(layer):
    """No superset: the plan's token pairs are the chunk selection's, and the density tracks the target (issue 28)."""
    layout = VideoLayout(9, 30, 52)
    q, k, _ = qkv(layout)
    cfg = MoBAConfig(selection="topk", density=0.25)
    ctx = PlanContext(layer=layer)
    sel = select_chunks(q, k, layout, cfg, ctx)
    torch.testing.assert_close(sel.block_token_density(), sel.token_density())
    plan = build_plan(cfg, q, k, layout, ctx).validate()
    # Ragged 3-D chunks (7 + 2 frames) differ in size, so k of C chunks is not exactly k / C of the blocks.
    assert plan.density() == pytest.approx(0.25, abs=0.02)  # 0.269 / 0.273 with chunks straddling blocks
    unaligned = build_plan(cfg.replace(align_chunks=False), q, k, layout, ctx)
    assert unaligned.density() > plan.density() + 0.015


def test_partition_orders_match_vmoba_on_divisible_grids():
    layout = VideoLayout(4, 6, 8)
    cfg = MoBAConfig(frames_1d=2, patch_2d=(3, 4), cuboid_3d=(2, 3, 4))
    raster = torch.arange(layout.num_video_tokens)
    assert chunk_partition(layout, chunk_shape(layout, cfg, "1d"), 64).video_order is None
    # 2-D: (nch ncw t ch cw); 3-D: (nct nch ncw ct ch cw), as the official process_moba_input.
    expected_2d = raster.view(4, 2, 3, 2, 4).permute(1, 3, 0, 2, 4).reshape(-1)
    expected_3d = raster.view(2, 2, 2, 3, 2, 4).permute(0, 2, 4, 1, 3, 5).reshape(-1)
    assert torch.equal(chunk_partition(layout, chunk_shape(layout, cfg, "2d"), 64).video_order, expected_2d)
    assert torch.equal(chunk_partition(layout, chunk_shape(layout, cfg, "3d"), 64).video_order, expected_3d)


@pytest.mark.parametrize("text_position", ["before", "after"])
@pytest.mark.parametrize("layer", [0, 1, 2])
def test_plan_permutation_round_trip(layer, text_position):
    layout = VideoLayout(5, 7, 9, text_len=11, text_position=text_position)
    q, k, _ = qkv(layout)
    plan = build_plan(small_config(), q, k, layout, PlanContext(layer=layer)).validate()
    assert plan.meta["partition"] == ("1d", "2d", "3d")[layer]
    if plan.perm is None:
        assert layer == 0 and text_position == "after"
        return
    x = torch.randn(2, layout.seq_len, 3, 4)
    assert torch.equal(x.index_select(1, plan.perm).index_select(1, plan.inv_perm), x)
    part = chunk_partition(layout, chunk_shape(layout, small_config(), plan.meta["partition"]), 64)
    order = torch.arange(layout.num_video_tokens) if part.video_order is None else part.video_order
    assert torch.equal(plan.perm[: layout.num_video_tokens], order + layout.video_start)


def test_layer_cycle_and_forced_partition():
    cfg = MoBAConfig()
    assert [partition_kind(cfg, layer) for layer in range(7)] == ["1d", "2d", "3d", "1d", "2d", "3d", "1d"]
    assert [partition_kind(cfg.replace(partition="2d"), layer) for layer in range(3)] == ["2d"] * 3


# ---------------------------------------------------------------------------------------------------- scores
def test_chunk_scores_are_block_mean_query_dot_chunk_mean_key():
    layout = VideoLayout(3, 5, 6, text_len=7, text_position="before")
    q, k, _ = qkv(layout)
    part = chunk_partition(layout, (2, 2, 4), 64)
    scores = chunk_scores(q, k, layout, part)
    video = slice(layout.video_start, layout.video_start + layout.num_video_tokens)
    qv, kv = q[0, video].double(), k[0, video].double()
    for block in range(part.num_blocks):
        q_mean = qv[part.block_of_token == block].mean(0)  # [H, D]
        for chunk in range(part.num_chunks):
            k_mean = kv[part.chunk_of_token == chunk].mean(0)
            expected = (q_mean * k_mean).sum(-1)
            torch.testing.assert_close(scores[0, :, block, chunk].double(), expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------- selection
def reference_threshold(weights: list[float], own: list[bool], tau: float, faithful: bool) -> set[int]:
    """The rule written out: own entries first, then others by descending weight until tau of the total."""
    total = sum(weights)
    if total <= 0 or tau >= 1:
        return set(range(len(weights)))
    kept = {i for i, o in enumerate(own) if o}
    acc = sum(weights[i] for i in kept)
    taken = 0
    for i in sorted((i for i, o in enumerate(own) if not o), key=lambda i: -weights[i]):
        if acc >= tau * total and not (faithful and taken == 0):
            break
        kept.add(i)
        acc += weights[i]
        taken += 1
    return kept


@settings(max_examples=150, deadline=None)
@given(
    data=st.data(),
    size=st.integers(1, 12),
    tau=st.floats(0.01, 1.0),
    faithful=st.booleans(),
)
def test_threshold_keeps_smallest_own_first_prefix_reaching_tau(data, size, tau, faithful):
    ints = data.draw(st.lists(st.integers(0, 1000), min_size=size, max_size=size, unique=True))
    own = data.draw(st.lists(st.booleans(), min_size=size, max_size=size))
    weights = [i / 1000 for i in ints]
    total = sum(weights)
    # Prefix sums exactly at the boundary are decided by float rounding: keep examples away from them.
    prefix = sum(w for w, o in zip(weights, own) if o)
    sums = [prefix] + [
        prefix + sum(sorted((w for w, o in zip(weights, own) if not o), reverse=True)[:j]) for j in range(1, size + 1)
    ]
    assume(all(abs(s - tau * total) > 1e-4 for s in sums))
    keep = select_threshold(torch.tensor([weights]), torch.tensor([own]), tau, at_least_one_other=faithful)[0]
    expected = reference_threshold(weights, own, tau, faithful)
    assert set(keep.nonzero().flatten().tolist()) == expected
    # The properties behind the rule, stated directly.
    kept_w = sum(weights[i] for i in expected)
    assert kept_w >= tau * total - 1e-9 or len(expected) == size
    others = [i for i in expected if not own[i]]
    if others and not (faithful and len(others) == 1):
        smallest = min(others, key=lambda i: weights[i])
        assert kept_w - weights[smallest] < tau * total  # one fewer other would not reach tau


def test_threshold_head_pool_and_real_scores_follow_the_rule():
    layout = VideoLayout(4, 6, 8)
    q, k, _ = qkv(layout)
    for pool in ("query", "head"):
        for faithful in (False, True):
            cfg = MoBAConfig(**SMALL_SHAPES, threshold_pool=pool, faithful=faithful, tau=0.3)
            sel = select_chunks(q, k, layout, cfg, PlanContext(layer=2))
            part = sel.partition
            weights = normalize_scores(chunk_scores(q, k, layout, part), "minmax", pool)
            own = part.overlap.expand_as(weights)
            for head in range(weights.shape[1]):
                if pool == "head":
                    w, o, kept = weights[0, head].flatten(), own[0, head].flatten(), sel.keep[0, head].flatten()
                    expected = reference_threshold(w.tolist(), o.tolist(), 0.3, faithful)
                    assert set(kept.nonzero().flatten().tolist()) == expected
                else:
                    for row in range(weights.shape[2]):
                        w, o = weights[0, head, row], own[0, head, row]
                        expected = reference_threshold(w.tolist(), o.tolist(), 0.3, faithful)
                        assert set(sel.keep[0, head, row].nonzero().flatten().tolist()) == expected


def test_minmax_normalisation_pools():
    scores = torch.randn(2, 3, 5, 7)
    per_query = normalize_scores(scores, "minmax", "query")
    torch.testing.assert_close(per_query.amin(-1), torch.zeros(2, 3, 5))
    torch.testing.assert_close(per_query.amax(-1), torch.ones(2, 3, 5))
    per_head = normalize_scores(scores, "minmax", "head")
    torch.testing.assert_close(per_head.amin((-1, -2)), torch.zeros(2, 3))
    torch.testing.assert_close(per_head.amax((-1, -2)), torch.ones(2, 3))
    soft = normalize_scores(scores, "softmax", "head", log_sizes=torch.zeros(7))
    torch.testing.assert_close(soft.sum(-1), torch.ones(2, 3, 5))


def test_faithful_quirk_adds_one_chunk_when_own_suffices():
    weights = torch.tensor([[1.0, 0.5, 0.2, 0.0]])
    own = torch.tensor([[True, False, False, False]])
    assert select_threshold(weights, own, 0.25).tolist() == [[True, False, False, False]]
    assert select_threshold(weights, own, 0.25, at_least_one_other=True).tolist() == [[True, True, False, False]]


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.integers(1, 9))
def test_topk_and_head_global_keep_own_plus_best(seed, k):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(2, 3, 6, 9, generator=gen)
    own = torch.zeros(6, 9, dtype=torch.bool)
    own[torch.arange(6), torch.arange(6)] = True
    own[2, 3] = True  # a query block straddling two chunks
    keep = select_topk(scores, own, k)
    assert bool((keep | ~own).all())
    assert torch.equal(keep.sum(-1), torch.maximum(torch.tensor(k), own.sum(-1)).expand(2, 3, 6))
    kept_other = torch.where(keep & ~own, scores, torch.inf).amin(-1)
    dropped = torch.where(~keep, scores, -torch.inf).amax(-1)
    assert bool((kept_other >= dropped).all())

    glob = select_head_global(scores, own, k)
    assert bool((glob | ~own).all())
    budget = max(k * 6, int(own.sum()))
    assert glob.sum((-1, -2)).tolist() == [[min(budget, 54)] * 3] * 2
    kept_other = torch.where(glob & ~own, scores, torch.inf).amin((-1, -2))
    dropped = torch.where(~glob, scores, -torch.inf).amax((-1, -2))
    assert bool((kept_other >= dropped).all())


# ------------------------------------------------------------------------------------------------------ plans
@pytest.mark.parametrize(
    "spec",
    [
        "selection=topk,density=0.3",
        "selection=head_global,density=0.3",
        "tau=0.25",
        "tau=0.5,threshold_pool=head",
        "tau=0.8,normalize=softmax",
        "faithful=true",
    ],
)
def test_plan_is_a_superset_of_the_chunk_selection(spec):
    layout = VideoLayout(5, 7, 9, text_len=13, text_position="before")
    q, k, _ = qkv(layout, batch=2)
    cfg = parse_method_spec("moba:" + ",".join(f"{a}={b}" for a, b in SMALL_SHAPES_CLI.items()) + "," + spec)
    for layer in range(3):
        ctx = PlanContext(layer=layer)
        plan = build_plan(cfg, q, k, layout, ctx).validate()
        assert plan.kv_num.shape[:2] == (2, 4)
        sel = select_chunks(q, k, layout, cfg, ctx)
        part = sel.partition
        dense = plan.to_dense_mask()  # [B, H, S, S], original order
        video = slice(layout.video_start, layout.video_start + layout.num_video_tokens)
        vv = dense[:, :, video, video]
        # Token-level chunk selection: query token in block i attends key token in chunk c iff keep[i, c].
        chunk_level = sel.keep[:, :, part.block_of_token][:, :, :, part.chunk_of_token]
        assert bool((vv | ~chunk_level).all())  # superset
        # Extra pairs only in key blocks shared by two chunks, or in the block video shares with text (dense as a
        # row and a column); exact elsewhere.
        shared = part.overlap.sum(-1) > 1
        with_text = torch.zeros_like(shared)
        with_text[-1] = layout.num_video_tokens % 64 != 0
        allowed = (shared | with_text)[part.block_of_token][None, :] | with_text[part.block_of_token][:, None]
        extra = vv & ~chunk_level
        assert bool(allowed.expand_as(extra)[extra].all())
        # Own chunk always attended; text rows and columns dense.
        own_level = part.overlap[part.block_of_token][:, part.chunk_of_token]
        assert bool((vv | ~own_level).all())
        text = torch.ones(layout.seq_len, dtype=torch.bool)
        text[video] = False
        assert bool(dense[:, :, text].all()) and bool(dense[:, :, :, text].all())
        plan_tokens = vv.float().mean((-1, -2))
        assert bool((plan_tokens >= sel.block_token_density() - 1e-6).all())
        assert bool((sel.block_token_density() >= sel.token_density() - 1e-6).all())


def test_full_budget_reproduces_dense_output():
    layout = RAGGED
    q, k, v = qkv(layout)
    dense = block_sparse_attention(q, k, v, BlockPlan.full(layout.seq_len), backend="reference")
    for cfg in (small_config(selection="topk", density=1.0), small_config(tau=1.0)):
        for layer in range(3):
            plan = build_plan(cfg, q, k, layout, PlanContext(layer=layer))
            assert plan.density() == 1.0
            out = block_sparse_attention(q, k, v, plan, backend="reference")
            torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-5)


def test_flex_matches_reference_on_moba_plans():
    # One shape (text after, batch 2, ragged grid, 3 partition types): the flex kernel compiles once.
    layout = VideoLayout(5, 7, 9, text_len=9, text_position="after")
    q, k, v = qkv(layout, batch=2, seed=3)
    for layer, cfg in enumerate([small_config(), small_config(selection="topk", density=0.3), small_config()]):
        plan = build_plan(cfg, q, k, layout, PlanContext(layer=layer))
        assert plan.density() < 1.0
        ref = block_sparse_attention(q, k, v, plan, backend="reference")
        flex = block_sparse_attention(q, k, v, plan, backend="flex")
        torch.testing.assert_close(flex, ref, rtol=1e-5, atol=1e-5)


def test_topk_density_tracks_the_target():
    layout = VideoLayout(6, 16, 16)  # chunks of 256 tokens = 4 blocks: no shared blocks, density is exact
    q, k, _ = qkv(layout)
    for density in (0.25, 0.5):
        cfg = MoBAConfig(selection="topk", density=density, partition="3d", cuboid_3d=(1, 16, 16))
        plan = build_plan(cfg, q, k, layout)
        assert plan.density() == pytest.approx(round(density * 6) / 6, abs=1e-6)


# ----------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"density": 0.3}, "density=0.3 is invalid with selection='threshold'"),
        ({"selection": "topk"}, "density=None is invalid with selection='topk'"),
        ({"selection": "nearest"}, "selection='nearest' is invalid"),
        ({"tau": 0.0}, "tau=0.0 is invalid"),
        ({"patch_2d": (3,)}, "patch_2d=(3,) is invalid"),
        ({"cuboid_3d": (2, 0, 4)}, "cuboid_3d=(2, 0, 4) is invalid"),
        ({"frames_1d": 0}, "frames_1d=0 is invalid"),
        ({"partition": "4d"}, "partition='4d' is invalid"),
        ({"faithful": True, "normalize": "softmax"}, "normalize='softmax' is invalid with faithful=True"),
    ],
)
def test_config_errors_name_the_field(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        MoBAConfig(**overrides)


def test_defaults_are_the_papers():
    cfg = MoBAConfig()
    assert (cfg.selection, cfg.tau, cfg.dense_steps) == ("threshold", 0.25, 0.25)
    assert (cfg.frames_1d, cfg.patch_2d, cfg.cuboid_3d) == (3, (5, 13), (7, 5, 13))
    assert parse_method_spec("moba:selection=topk,density=0.2,patch_2d=5/13").patch_2d == (5, 13)


# ------------------------------------------------------------------------------------------------ pipelines
def test_apply_on_tiny_wan_runs_with_warmup_and_target_density():
    pipe = tiny.build("wan")
    pipe.set_progress_bar_config(disable=True)
    # 17 frames x 128 x 192 px -> 5 x 8 x 12 = 480 latent tokens; 2 blocks: layer 0 cuts 1-D chunks, layer 1 2-D.
    options = dict(selection="topk", density=0.4, frames_1d=1, patch_2d=(4, 4), cuboid_3d=(2, 4, 4))
    with vidsparse.apply(pipe, "moba", **options) as handle:  # default dense_steps=0.25: step 0 of 4 dense
        out = pipe(
            prompt="a red circle moves left",
            num_inference_steps=4,
            guidance_scale=1.0,  # one forward per step keeps the test short
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
            num_frames=17,
            height=128,
            width=192,
        ).frames
        rows = handle.stats()
    assert torch.isfinite(out).all()
    assert [r["sparse"] for r in rows if r["context"] == "cond" and r["layer"] == 0] == [False, True, True, True]
    sparse = [r for r in rows if r["sparse"]]
    assert {r["layer"] for r in sparse} == {0, 1} and all(r["tokens"] == 480 for r in sparse)
    # k = round(0.4 x 5) = 2 of 5 one-frame chunks, 2 of 6 patches: about 0.4 / 0.33 of the blocks, plus the blocks
    # shared by two chunks (96-token frames and 80-token patches do not fall on 64-token block edges).
    for r in sparse:
        assert 0.33 <= r["density"] <= 0.55, r
