"""DraftAttention: region order, draft map, selection rules, plan invariants, executors vs reference."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import vidsparse
from vidsparse.eval.synthetic import output_error, synthetic_qkv
from vidsparse.kernels.dispatch import block_sparse_attention
from vidsparse.layout import VideoLayout
from vidsparse.methods import PlanContext, build_plan, parse_method_spec
from vidsparse.methods.draft import (
    DraftConfig,
    default_region_rows,
    draft_map,
    faithful_config,
    pool_regions,
    region_order,
    region_stats,
    select_faithful,
    select_ours,
)
from vidsparse.plan import BlockPlan, num_blocks

CTX = PlanContext()

geometry = st.tuples(st.integers(1, 4), st.integers(1, 13), st.integers(2, 19))


def random_qkv(layout: VideoLayout, *, heads: int = 2, head_dim: int = 8, batch: int = 1, seed: int = 0):
    """Unstructured q/k/v ``[B, S, H, D]``: enough for invariants, much cheaper than the synthetic fields."""
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, layout.seq_len, heads, head_dim, generator=gen) for _ in range(3))


def region_of_token(layout: VideoLayout, plan: BlockPlan) -> torch.Tensor:
    """Region (= plan block) of each video token, indexed by raster video position."""
    nv = layout.num_video_tokens
    inv = plan.inv_perm[layout.video_start : layout.video_start + nv]
    return inv // plan.block_size


# ------------------------------------------------------------------------------------------------ region order
@settings(max_examples=40, deadline=None)
@given(grid=geometry, rows=st.integers(1, 10))
def test_region_order_is_a_permutation(grid, rows):
    layout = VideoLayout(*grid)
    order = region_order(layout, rows)
    assert order.dtype == torch.int64
    assert torch.equal(order.sort().values, torch.arange(layout.num_video_tokens))


@settings(max_examples=25, deadline=None)
@given(
    grid=geometry,
    text_len=st.integers(0, 9),
    before=st.booleans(),
    block_size=st.sampled_from([64, 128]),
)
def test_permutation_round_trip_is_exact(grid, text_len, before, block_size):
    layout = VideoLayout(*grid, text_len=text_len, text_position="before" if before else "after")
    q, k, _ = random_qkv(layout)
    plan = build_plan(DraftConfig(block_size=block_size), q, k, layout, CTX)
    x = torch.randn(1, layout.seq_len, 3)
    there = x.index_select(1, plan.perm)
    assert torch.equal(there.index_select(1, plan.inv_perm), x)
    # Plan order: video first (in region order), then text in its original order.
    vs = layout.video_start
    assert torch.equal(plan.perm[: layout.num_video_tokens] - vs, region_order(layout, plan.meta["region_rows"]))
    text = plan.perm[layout.num_video_tokens :]
    expected_text = torch.arange(layout.text_len) + (0 if before else layout.num_video_tokens)
    assert torch.equal(text, expected_text)


def test_regions_are_upstream_windows_when_the_geometry_divides():
    # Upstream's geometry rule: H' % 8 == 0, W' % 16 == 0, 128-token blocks -> every block is one 8x16 window.
    layout = VideoLayout(3, 16, 32)
    order = region_order(layout, 8)
    coords = layout.token_coords()[order].view(-1, 128, 3)  # [blocks, 128, (t, h, w)]
    window = coords[..., 0] * 100 + (coords[..., 1] // 8) * 10 + coords[..., 2] // 16
    assert bool((window == window[:, :1]).all()), "a block mixes two 8x16 windows"
    assert window[:, 0].unique().numel() == coords.shape[0]  # every window exactly once
    stats = region_stats(layout, 128)
    assert stats["two_bands"] == 0 and stats["two_frames"] == 0
    assert (stats["bbox_h"], stats["bbox_w"]) == (8.0, 16.0)


@settings(max_examples=30, deadline=None)
@given(grid=st.tuples(st.integers(2, 5), st.integers(9, 40), st.integers(9, 60)), block_size=st.sampled_from([64, 128]))
def test_regions_stay_compact_for_any_geometry(grid, block_size):
    layout = VideoLayout(*grid)
    rows = default_region_rows(layout.height, layout.width, block_size)
    order = region_order(layout, rows)
    coords = layout.token_coords()[order]
    block = torch.arange(coords.shape[0]) // block_size
    vb = num_blocks(coords.shape[0], block_size)

    def spread(values):
        low = torch.full((vb,), 10**9).scatter_reduce(0, block, values, "amin")
        return torch.full((vb,), -1).scatter_reduce(0, block, values, "amax") - low

    # A block spans at most two consecutive frames (frames hold >= 81 tokens here).
    if layout.tokens_per_frame >= block_size:
        assert int(spread(coords[:, 0]).max()) <= 1
    # Serpentine bands: when every band holds a block, a block's rows stay within two adjacent bands.
    n_bands = math.ceil(layout.height / rows)
    if (layout.height // n_bands) * layout.width >= block_size:
        assert int(spread(coords[:, 1]).max()) < 2 * math.ceil(layout.height / n_bands)


# ------------------------------------------------------------------------------------------------- draft map
def test_pooling_is_the_mean_over_each_block_in_plan_order():
    layout = VideoLayout(2, 5, 7, text_len=3, text_position="before")  # 70 video tokens, blocks of 64: 64 + 6
    x = torch.randn(2, layout.seq_len, 3, 4, dtype=torch.float64)
    order = region_order(layout, 3)
    video = x[:, 3:][:, order]
    for scatter in (True, False):  # index_add_ (CPU default) and gather + segment sums (CUDA default)
        mean, square = pool_regions(x, layout, order, 64, second_moment=True, scatter=scatter)
        for i, (lo, hi) in enumerate([(0, 64), (64, 70)]):
            torch.testing.assert_close(mean[:, :, i], video[:, lo:hi].mean(1).float())
            torch.testing.assert_close(square[:, :, i], (video[:, lo:hi] ** 2).mean(1).float())


def test_draft_map_is_row_stochastic_and_key_variance_favours_strong_outliers():
    layout = VideoLayout(1, 8, 32)  # two regions of 128 tokens at block 128
    d = 16
    q = torch.zeros(1, 256, 1, d)
    k = torch.zeros(1, 256, 1, d)
    order = region_order(layout, 8)
    q[0, :, 0, 0] = 1.0
    # Region 0: all keys 1. Region 1: same mean, but four very strong keys and the rest slightly negative.
    k[0, order[:128], 0, 0] = 1.0
    strong = torch.full((128,), -0.5)
    strong[:4] = 1.0 + 1.5 * 124 / 4
    k[0, order[128:], 0, 0] = strong
    plain = draft_map(q, k, layout, order, 128)
    corrected = draft_map(q, k, layout, order, 128, key_variance=True)
    torch.testing.assert_close(plain.sum(-1), torch.ones(1, 1, 2))
    torch.testing.assert_close(corrected.sum(-1), torch.ones(1, 1, 2))
    assert plain[0, 0, 0, 0] == pytest.approx(0.5, abs=1e-6)  # equal means: pooling sees no difference
    true_mass = torch.softmax(q[0, 0, 0] @ k[0, :, 0].T / math.sqrt(d), -1)
    assert float(true_mass[order[128:]].sum()) > 0.5  # the outlier region really draws more attention
    assert corrected[0, 0, 0, 1] > 0.5  # ... and the variance term sees it


# ------------------------------------------------------------------------------------------------- selection
@settings(max_examples=25, deadline=None)
@given(vb=st.integers(1, 30), density=st.floats(0.02, 1.0), seed=st.integers(0, 1000))
def test_faithful_selection_is_one_global_cut_per_head(vb, density, seed):
    probs = torch.rand(2, 3, vb, vb, generator=torch.Generator().manual_seed(seed)).softmax(-1)
    mask = select_faithful(probs, density)
    budget = max(1, round(density * vb * vb))
    assert bool((mask.sum((-1, -2)) == budget).all())
    kept = probs.masked_fill(~mask, float("inf")).flatten(-2).min(-1).values
    dropped = probs.masked_fill(mask, float("-inf")).flatten(-2).max(-1).values
    assert bool((kept >= dropped).all())


@settings(max_examples=25, deadline=None)
@given(
    vb=st.integers(1, 30),
    density=st.floats(0.02, 1.0),
    share=st.floats(0.0, 1.0),
    sink=st.integers(0, 3),
    seed=st.integers(0, 1000),
)
def test_our_selection_forces_own_row_minimum_and_sink_within_the_budget(vb, density, share, sink, seed):
    sink = min(sink, vb)
    probs = torch.rand(2, 3, vb, vb, generator=torch.Generator().manual_seed(seed)).softmax(-1)
    mask = select_ours(probs, density, share, sink)
    assert bool(mask.diagonal(dim1=-2, dim2=-1).all())
    assert bool(mask[..., :sink].all())
    per_row = min(vb, math.ceil(share * density * vb))
    if per_row:
        best = probs.topk(per_row, dim=-1).indices
        assert bool(mask.gather(-1, best).all())
    forced = torch.eye(vb, dtype=torch.bool).expand_as(mask).clone()
    forced[..., :sink] = True
    if per_row:
        forced.scatter_(-1, probs.topk(per_row, dim=-1).indices, True)
    budget = max(1, round(density * vb * vb))
    expected = torch.maximum(forced.sum((-1, -2)), torch.tensor(budget))
    assert torch.equal(mask.sum((-1, -2)), expected)


# ------------------------------------------------------------------------------------------------------ plans
@settings(max_examples=25, deadline=None)
@given(
    grid=geometry,
    text_len=st.integers(0, 9),
    before=st.booleans(),
    batch=st.integers(1, 2),
    faithful=st.booleans(),
    density=st.sampled_from([0.1, 0.25, 0.5, 1.0]),
    block_size=st.sampled_from([64, 128]),
)
def test_plan_invariants_for_any_geometry(grid, text_len, before, batch, faithful, density, block_size):
    layout = VideoLayout(*grid, text_len=text_len, text_position="before" if before else "after")
    q, k, _ = random_qkv(layout, heads=3, batch=batch)
    cfg = DraftConfig(density=density, block_size=block_size, faithful=faithful)
    plan = build_plan(cfg, q, k, layout, CTX).validate()
    assert tuple(plan.kv_num.shape[:2]) == (batch, 3)
    bm = plan.block_mask()
    first_text = layout.num_video_tokens // block_size
    if text_len:
        assert bool(bm[:, :, first_text:].all()) and bool(bm[:, :, :, first_text:].all())
    # Density: ours hits the budget exactly when the forced entries fit (no text block inflates it).
    vb = num_blocks(layout.num_video_tokens, block_size)
    budget = max(1, round(density * vb * vb)) / (vb * vb)
    dens = plan.density_per_head()
    if not faithful and (not text_len or layout.num_video_tokens % block_size == 0):
        forced = vb + vb * min(vb, math.ceil(0.5 * density * vb))
        if forced <= budget * vb * vb:
            torch.testing.assert_close(dens, torch.full_like(dens, budget))
    assert bool((dens >= budget - 1e-6).all())


@settings(max_examples=15, deadline=None)
@given(grid=geometry, text_len=st.integers(0, 5), before=st.booleans(), faithful=st.booleans())
def test_token_mask_is_the_region_mask(grid, text_len, before, faithful):
    """Independent of the executors: token (n, m) is attended iff region(n) keeps region(m) (video) or text."""
    layout = VideoLayout(*grid, text_len=text_len, text_position="before" if before else "after")
    q, k, _ = random_qkv(layout)
    cfg = DraftConfig(density=0.3, block_size=64, faithful=faithful)
    plan = build_plan(cfg, q, k, layout, CTX)
    order = region_order(layout, plan.meta["region_rows"])
    probs = draft_map(q, k, layout, order, 64, key_variance=not faithful)
    sel = select_faithful(probs, 0.3) if faithful else select_ours(probs, 0.3, 0.5)
    vb = sel.shape[-1]
    sel = sel | torch.eye(vb, dtype=torch.bool)
    region = region_of_token(layout, plan)
    token_mask = plan.to_dense_mask(original_order=True)
    vs, nv = layout.video_start, layout.num_video_tokens
    video_part = token_mask[0, :, vs : vs + nv, vs : vs + nv]
    expected = sel[0][:, region][:, :, region]
    if text_len and nv % 64:
        # The last video region shares its block with text: that block row/column is dense.
        last = region == vb - 1
        expected[:, last, :] = True
        expected[:, :, last] = True
    assert torch.equal(video_part, expected)
    if text_len:
        text = torch.ones(layout.seq_len, dtype=torch.bool)
        text[vs : vs + nv] = False
        assert bool(token_mask[..., text, :].all()) and bool(token_mask[..., :, text].all())


@pytest.mark.parametrize(
    "layout",
    [VideoLayout(3, 7, 11, text_len=5, text_position="before"), VideoLayout(5, 9, 13, text_len=7)],
    ids=["3x7x11+text-before", "5x9x13+text-after"],
)
def test_flex_matches_reference_with_the_same_plan(layout):
    q, k, v = synthetic_qkv(layout, heads=2, head_dim=16, batch=2, seed=3)
    for cfg in (DraftConfig(block_size=64), DraftConfig(block_size=64, faithful=True, density=0.1)):
        plan = build_plan(cfg, q, k, layout, CTX)
        assert plan.density() < 1.0
        ref = block_sparse_attention(q, k, v, plan, backend="reference")
        out = block_sparse_attention(q, k, v, plan, backend="flex")
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_batched_cfg_gives_per_sample_plans():
    layout = VideoLayout(3, 12, 20)
    cfg = DraftConfig(block_size=64)
    q0, k0, _ = synthetic_qkv(layout, heads=2, head_dim=16, seed=1)
    q1, k1, _ = synthetic_qkv(layout, heads=2, head_dim=16, seed=2)
    q, k = torch.cat([q0, q1]), torch.cat([k0, k1])
    plan = build_plan(cfg, q, k, layout, CTX).validate()
    assert plan.kv_num.shape[0] == 2
    masks = plan.block_mask()
    assert not torch.equal(masks[0], masks[1]), "two different samples got the same plan"
    for i, (qi, ki) in enumerate(((q0, k0), (q1, k1))):
        alone = build_plan(cfg, qi, ki, layout, CTX).block_mask()[0]
        assert torch.equal(masks[i], alone)


def test_ours_is_at_least_as_accurate_as_faithful_on_structured_inputs():
    layout = VideoLayout(5, 16, 24)
    q, k, v = synthetic_qkv(layout, heads=4, head_dim=32, seed=0)
    dense = block_sparse_attention(q, k, v, BlockPlan.full(layout.seq_len), backend="reference")
    errors = {}
    for faithful in (True, False):
        plan = build_plan(DraftConfig(density=0.25, block_size=64, faithful=faithful), q, k, layout, CTX)
        out = block_sparse_attention(q, k, v, plan, backend="reference")
        errors[faithful] = (plan.density(), output_error(out, dense)["rel_l2"])
    assert errors[False][0] <= errors[True][0] + 1e-6
    assert errors[False][1] <= errors[True][1]


# ------------------------------------------------------------------------------------------------ config, API
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("density", 0.0),
        ("density", None),
        ("faithful", 1),
        ("sink", "yes"),
        ("key_variance", None),
        ("region_rows", 0),
        ("min_row_share", 1.5),
        ("block_size", 96),
    ],
)
def test_bad_config_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        DraftConfig(**{field: value})


def test_faithful_presets():
    wan = faithful_config("wan")
    assert (wan.faithful, wan.density, wan.dense_above_timestep, wan.dense_layers, wan.dense_steps) == (
        True,
        0.25,
        925,
        1,
        0,
    )
    hunyuan = faithful_config("hunyuan", block_size=64)
    assert (hunyuan.density, hunyuan.dense_above_timestep, hunyuan.dense_layers, hunyuan.block_size) == (
        0.1,
        945,
        2,
        64,
    )
    with pytest.raises(ValueError, match="model"):
        faithful_config("mochi")


def test_registered_and_reachable_from_the_public_api():
    cfg = parse_method_spec("draft:faithful=true,density=0.1,region_rows=4")
    assert isinstance(cfg, DraftConfig) and cfg.faithful and cfg.region_rows == 4
    layout = VideoLayout(2, 6, 10)
    q, k, _ = synthetic_qkv(layout, heads=2, head_dim=8)
    plan = vidsparse.make_plan("draft", q, k, layout, density=0.5, block_size=64)
    assert plan.meta["method"] == "draft" and plan.validate() is plan
    with pytest.raises(ValueError, match="dynamic"):
        vidsparse.make_plan("draft", None, None, layout)


# ------------------------------------------------------------------------------------------------ integration
def test_apply_on_tiny_wan_runs_draft_with_its_warm_up():
    from vidsparse.pipelines.offline import tiny

    pipe = tiny.build("wan")
    pipe.set_progress_bar_config(disable=True)
    # The reference executor: the flex path is covered above, and compiling it for this shape costs ~20 s.
    call = dict(
        prompt="a red circle moves left",
        negative_prompt="",
        num_inference_steps=3,
        guidance_scale=5.0,
        output_type="latent",
        num_frames=17,  # latent 5 x 8 x 12 = 480 tokens: 8 regions of 64
        height=128,
        width=192,
    )
    with vidsparse.apply(pipe, "draft", density=0.25, block_size=64, backend="reference") as handle:
        out = pipe(generator=torch.Generator().manual_seed(0), **call).frames
        rows = handle.stats()
    assert torch.isfinite(out).all()
    # Our warm-up: dense_steps=0.25 of 3 steps -> step 0 dense; dense_layers=1 -> layer 0 dense (of 2 layers).
    reasons = {(r["step"], r["layer"]): r["reason"] for r in rows}
    assert reasons[(0, 0)] == "dense_layers" and reasons[(0, 1)] == "dense_steps"
    sparse = [r for r in rows if r["sparse"]]
    assert len(sparse) == 2 * 2  # steps 1-2 x (cond, uncond), layer 1
    assert all(r["density"] == pytest.approx(0.25) for r in sparse)

    with vidsparse.apply(pipe, faithful_config("wan", block_size=64, backend="reference")) as handle:
        pipe(generator=torch.Generator().manual_seed(0), **call)
        rows = handle.stats()
    # The tiny scheduler's timesteps are 1000, 751, 9: only step 0 is above 925.
    assert {r["reason"] for r in rows if r["step"] == 0 and r["layer"] == 1} == {"dense_above_timestep"}
    sparse = [r for r in rows if r["sparse"]]
    assert {r["step"] for r in sparse} == {1, 2} and all(0.25 <= r["density"] < 1 for r in sparse)


def test_plan_cost_measures_plan_against_dense():
    from vidsparse.eval.plan_cost import format_table, measure_plan_cost

    rows = measure_plan_cost(
        [DraftConfig(block_size=64), faithful_config(block_size=64)],
        VideoLayout(2, 8, 12),
        heads=2,
        head_dim=16,
        repeats=1,
        warmup=1,
        backend="reference",
    )
    assert [r["config"]["faithful"] for r in rows] == [False, True]
    for r in rows:
        assert r["plan_ms"] > 0 and r["dense_sdpa_ms"] > 0 and r["sparse_ms"] > 0
        assert r["plan_over_dense_sdpa"] == pytest.approx(r["plan_ms"] / r["dense_sdpa_ms"])
        assert 0 < r["density"] < 1
    assert format_table(rows).count("\n") == 3
