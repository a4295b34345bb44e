"""Radial attention: the faithful rule against the official numbers and a token-level oracle, ours' properties,
invariants, executors against ``reference``, the static cache and the ``vidsparse plan`` command."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import vidsparse
from vidsparse.config import resolve_step_count
from vidsparse.kernels.dispatch import block_sparse_attention
from vidsparse.layout import VideoLayout
from vidsparse.methods import _STATIC_CACHE, PlanContext, build_plan, get_method, parse_method_spec
from vidsparse.methods.radial import RadialConfig, decay_thresholds, faithful_block_mask
from vidsparse.plan import num_blocks


# ----------------------------------------------------------------------------------------------------- helpers
def token_level_faithful(layout: VideoLayout, block: int, decay: float, sink: bool) -> torch.Tensor:
    """The official rule spelled out token by token (slow; small geometries only): bool [Vb, Vb].

    Written from the rule in research/radial_draft.md §1.2, independently of the vectorised implementation.
    """
    frames, s = layout.frames, layout.tokens_per_frame
    vb = num_blocks(layout.num_video_tokens, block)
    out = torch.zeros(vb, vb, dtype=torch.bool)
    idx = torch.arange(s)
    ref_len = 2 ** s.bit_length()
    nb = -(-s // block)
    for i in range(frames):
        for j in range(frames):
            d = abs(i - j)
            if sink and j == 0:
                tile = torch.ones(s, s, dtype=torch.bool)
            else:
                width = s if d <= 1 else max(ref_len / 2 ** d.bit_length() * decay, block)
                tile = (idx[:, None] - idx[None, :]).abs() <= width
                base = ref_len / 2 ** d.bit_length()
                if base < 128 and d % int(128 / base) != 0:
                    tile = torch.zeros_like(tile)
            r0, c0 = (i * s) % block, (j * s) % block
            canvas = torch.zeros(r0 + nb * block, c0 + nb * block, dtype=torch.bool)
            canvas[r0 : r0 + s, c0 : c0 + s] = tile
            canvas = canvas[: nb * block, : nb * block].reshape(nb, block, nb, block)
            col_density = canvas.sum(1).float() / block  # [nb, nb, block]
            covered = (col_density > 0).sum(-1)
            high = (col_density > 1 / 3).sum(-1)
            blocks = high / (covered + 1e-9) > 0.6
            for a in range(nb):
                for b in range(nb):
                    row, col = (i * s) // block + a, (j * s) // block + b
                    if blocks[a, b] and row < vb and col < vb:
                        out[row, col] = True
    return out


def plan_of(config: RadialConfig, layout: VideoLayout) -> vidsparse.BlockPlan:
    return get_method("radial").plan(None, None, layout, config, PlanContext())


def video_mask(plan: vidsparse.BlockPlan, layout: VideoLayout) -> torch.Tensor:
    vb = num_blocks(layout.num_video_tokens, plan.block_size)
    return plan.block_mask()[0, 0, :vb, :vb]


# ----------------------------------------------------------------------------------------------- faithful
@pytest.mark.parametrize(
    ("grid", "decay", "sink", "sparsity"),
    [
        ((18, 48, 80), 0.2, True, 71.3),  # Wan 2.1 768x1280, 69 frames (issue #61)
        ((18, 48, 80), 0.01, True, 71.3),  # ... saturated: the decay no longer matters
        ((30, 48, 80), 0.95, False, 72.5),  # HunyuanVideo 768x1280, 117 frames
        ((128, 45, 80), 1.0, False, 89.1),  # HunyuanVideo 720p, 509 frames (paper: 88.3)
    ],
)
def test_faithful_reproduces_computed_sparsities(grid, decay, sink, sparsity):
    config = RadialConfig(faithful=True, decay=decay, sink=sink, block_size=128)
    mask = faithful_block_mask(VideoLayout(*grid), config)
    assert abs(100 * (1 - mask.float().mean().item()) - sparsity) < 0.5


@pytest.mark.parametrize(
    ("grid", "options", "density"),
    [
        ((18, 48, 80), {}, 0.2871),  # Wan 2.1 768x1280x69, upstream defaults (decay 0.2, sink), block 128
        ((30, 48, 80), {"decay": 0.95, "sink": False}, 0.2746),  # HunyuanVideo 768x1280x117, block 128
        ((18, 48, 80), {"block_size": 64}, 0.2608),  # Wan 2.2's processor block: the explicit size is kept
    ],
)
def test_faithful_defaults_to_upstream_block_size(grid, options, density):
    """``faithful=True`` alone reproduces upstream's densities (official code run on CPU, issue 28)."""
    config = vidsparse.make_config("radial", faithful=True, **options)
    assert config.block_size == options.get("block_size", 128)
    assert vidsparse.make_plan(config, None, None, VideoLayout(*grid)).density() == pytest.approx(density, abs=5e-5)


def test_block_size_default_follows_faithful():
    assert RadialConfig().block_size == 64 and RadialConfig(faithful=True).block_size == 128
    assert RadialConfig().replace(faithful=True).block_size == 128
    assert RadialConfig(faithful=True).replace(faithful=False).block_size == 64
    assert RadialConfig(block_size=64).replace(faithful=True).block_size == 64  # explicit: kept
    assert parse_method_spec("radial:faithful=true") == RadialConfig(faithful=True, block_size=128)


@settings(max_examples=12, deadline=None)
@given(
    frames=st.integers(2, 7),
    height=st.integers(1, 9),
    width=st.integers(3, 20),
    block=st.sampled_from([64, 128]),
    decay=st.sampled_from([0.05, 0.3, 1.0, 3.0]),
    sink=st.booleans(),
)
def test_faithful_matches_token_level_rule(frames, height, width, block, decay, sink):
    layout = VideoLayout(frames, height, width)
    config = RadialConfig(faithful=True, decay=decay, sink=sink, block_size=block, strict_tokens=False)
    expected = token_level_faithful(layout, block, decay, sink)
    assert torch.equal(faithful_block_mask(layout, config), expected)


def test_faithful_near_frames_dense_and_divisibility_error():
    layout = VideoLayout(4, 8, 16)  # 128 tokens per frame: frames are whole blocks
    mask = faithful_block_mask(layout, RadialConfig(faithful=True, block_size=64, sink=False))
    frame = torch.arange(mask.shape[0]) * 64 // 128
    near = (frame[:, None] - frame[None, :]).abs() <= 1
    assert mask[near].all()
    with pytest.raises(ValueError, match=r"14040 tokens.*multiple of 128"):
        plan_of(RadialConfig(faithful=True, block_size=128), VideoLayout(9, 30, 52))
    with pytest.raises(ValueError, match="density"):
        RadialConfig(faithful=True, density=0.3)


# ---------------------------------------------------------------------------------------------------- ours
@pytest.mark.parametrize("grid", [(9, 30, 52), (21, 30, 52), (5, 17, 23), (3, 45, 80)])
def test_ours_hits_target_density(grid):
    for target, sink in ((0.02, True), (0.05, False), (0.15, True), (0.3, False), (0.6, True), (0.9, False)):
        plan = plan_of(RadialConfig(density=target, sink=sink), VideoLayout(*grid))
        assert abs(plan.density() - target) <= 0.02, (target, sink)


def test_ours_density_extremes_and_default():
    layout = VideoLayout(5, 17, 23, text_len=9)
    assert plan_of(RadialConfig(density=1.0), layout).density() == pytest.approx(1.0)
    # Far below the sink's share, only the own-block diagonal is left (with text, the video block that shares
    # its tokens with the text is dense too: here there is none, 5*17*23 = 1955 ends inside a block).
    video_only = VideoLayout(5, 17, 23)
    floor = plan_of(RadialConfig(density=1e-4), video_only)
    assert floor.density() == pytest.approx(1 / num_blocks(video_only.num_video_tokens, 64))
    assert abs(plan_of(RadialConfig(), VideoLayout(9, 30, 52)).density() - 0.3) <= 0.02


def test_ours_decay_is_monotone_and_reaches_every_frame_pair():
    layout = VideoLayout(9, 16, 24)
    decays = (0.002, 0.01, 0.05, 0.2, 1.0)
    masks = [video_mask(plan_of(RadialConfig(decay=c, sink=False), layout), layout) for c in decays]
    for small, large in zip(masks, masks[1:]):
        assert bool((small <= large).all()) and small.sum() < large.sum()
    assert bool(masks[-1].all())


def test_ours_window_is_two_dimensional():
    # 16x16 frames with 8x8 tiles: the tile below and the tile to the right are equally far (raster order would
    # put the tile below 7 tiles away), and the diagonal tile is farther than both.
    layout = VideoLayout(1, 16, 16)
    thresholds, order = decay_thresholds(layout, RadialConfig(block_size=64, tile=(8, 8), sink=False))
    assert thresholds[0, 1] == thresholds[0, 2] < thresholds[0, 3]
    assert torch.equal(thresholds, thresholds.T)


def test_ours_sink_keeps_every_first_frame_key_block():
    layout = VideoLayout(7, 13, 19)
    plan = plan_of(RadialConfig(density=0.3, sink=True), layout)  # above the sink's own share (1/7)
    mask = video_mask(plan, layout)
    first_frame_blocks = torch.unique(plan.inv_perm[: layout.tokens_per_frame] // 64)
    assert mask[:, first_frame_blocks].all()


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="decay=-1"):
        RadialConfig(decay=-1)
    with pytest.raises(ValueError, match="density=0.3 and decay=0.2"):
        RadialConfig(density=0.3, decay=0.2)
    with pytest.raises(ValueError, match="tile"):
        RadialConfig(tile=(8, 0))
    with pytest.raises(ValueError, match="faithful"):
        RadialConfig(faithful="yes")
    with pytest.raises(ValueError, match="near_weight=5.*faithful=False"):
        RadialConfig(faithful=True, near_weight=5.0)
    with pytest.raises(ValueError, match="temporal_decay=-1"):
        RadialConfig(temporal_decay=-1)
    config = parse_method_spec("radial:density=0.2,tile=4/16,sink=true")
    assert (config.density, config.tile, config.sink) == (0.2, (4, 16), True)


def test_warm_up_defaults_follow_upstream():
    config = RadialConfig()
    assert resolve_step_count(config.dense_steps, 50) == 12
    assert config.dense_layers == 1 and config.dense_last_steps == 0


# ------------------------------------------------------------------------------------------- invariants
@settings(max_examples=15, deadline=None)
@given(
    frames=st.integers(1, 6),
    height=st.integers(1, 14),
    width=st.integers(1, 14),
    text_len=st.integers(0, 20),
    before=st.booleans(),
    block=st.sampled_from([64, 128]),
    faithful=st.booleans(),
    density=st.floats(0.01, 1.0),
)
def test_plan_invariants_any_token_count(frames, height, width, text_len, before, block, faithful, density):
    layout = VideoLayout(frames, height, width, text_len, "before" if before else "after")
    if faithful:
        config = RadialConfig(faithful=True, block_size=block, strict_tokens=False)
    else:
        config = RadialConfig(density=density, block_size=block)
    plan = plan_of(config, layout).validate()
    full = plan.to_dense_mask()[0, 0]
    text = torch.ones(layout.seq_len, dtype=torch.bool)
    text[layout.video_start : layout.video_start + layout.num_video_tokens] = False
    assert full[text].all() and full[:, text].all()  # text rows and columns dense
    assert full.diagonal().all()  # own block


@pytest.mark.parametrize("faithful", [False, True])
def test_flex_matches_reference(faithful):
    # 280 video + 20 text = 300 tokens, batch 2, 3 heads x 16: the shape test_executors.py compiles flex for.
    layout = VideoLayout(4, 7, 10, text_len=20, text_position="before")
    config = RadialConfig(faithful=True, strict_tokens=False) if faithful else RadialConfig(density=0.3)
    plan = plan_of(config, layout)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, layout.seq_len, 3, 16, generator=gen) for _ in range(3))
    ref = block_sparse_attention(q, k, v, plan, backend="reference")
    out = block_sparse_attention(q, k, v, plan, backend="flex")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    dense = block_sparse_attention(q, k, v, vidsparse.BlockPlan.full(layout.seq_len, 64), backend="reference")
    assert not torch.allclose(out, dense, atol=1e-3)  # the plan is really sparse


def test_static_cache_gives_each_resolution_its_own_plan():
    _STATIC_CACHE.clear()
    config = RadialConfig(density=0.3)
    small, large = VideoLayout(5, 12, 20), VideoLayout(5, 20, 36)
    first = build_plan(config, None, None, small)
    second = build_plan(config, None, None, large)
    assert first.seq_len == small.seq_len and second.seq_len == large.seq_len
    for layout, cached in ((small, first), (large, second)):
        fresh = plan_of(config, layout)
        assert torch.equal(cached.block_mask(), fresh.block_mask()) and torch.equal(cached.perm, fresh.perm)
    assert build_plan(config, None, None, small) is first  # cached, not rebuilt


# ------------------------------------------------------------------------------------------ plan command
def test_plan_command_prints_density_and_draws_png(tmp_path, capsys):
    from vidsparse.cli import main

    png = tmp_path / "mask.png"
    argv = ["plan", "radial", "--frames", "5", "--height", "12", "--width", "20", "--density", "0.3", "--png", str(png)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "5x12x20 video (1200 tokens)" in out
    density = float(out.split("density:")[1].split()[0])
    assert abs(density - 0.3) <= 0.02
    assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (
        main(["plan", "radial:faithful=true", "--frames", "4", "--height", "8", "--width", "16", "--opt", "decay=0.5"])
        == 0
    )
    assert "'rule': 'faithful'" in capsys.readouterr().out
    # Bad input: one clear line naming the problem, exit status 2.
    assert main(["plan", "radial", "--opt", "faithful=true", "--frames", "21"]) == 2
    assert "32760 tokens" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ pipelines
def test_apply_on_tiny_wan_uses_warm_up_and_hits_density():
    from vidsparse.pipelines.offline import tiny

    pipe = tiny.build("wan")
    pipe.set_progress_bar_config(disable=True)
    # 17 frames x 128 x 192 px -> 5 x 8 x 12 = 480 latent tokens (8 blocks, the last partial); 2 transformer blocks.
    with vidsparse.apply(pipe, "radial", density=0.3) as handle:  # dense_steps=0.24 -> step 0 of 4, layer 0 dense
        out = pipe(
            prompt="a red circle moves left",
            num_inference_steps=4,
            guidance_scale=1.0,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
            num_frames=17,
            height=128,
            width=192,
        ).frames
        rows = handle.stats()
    assert torch.isfinite(out).all()
    assert not any(r["sparse"] for r in rows if r["layer"] == 0)
    assert [r["sparse"] for r in rows if r["layer"] == 1] == [False, True, True, True]
    for r in rows:
        if r["sparse"]:
            assert r["tokens"] == 480 and abs(r["density"] - 0.3) <= 0.02, r
