"""The ``cached`` method, offline mode: pattern types, calibration, the pattern file, ``vidsparse calibrate``."""

import json
import os

import pytest
import torch

import vidsparse
from vidsparse.cli import main
from vidsparse.eval.synthetic import synthetic_qkv
from vidsparse.integration import describe_models, model_fingerprint
from vidsparse.layout import VideoLayout
from vidsparse.methods import PlanContext, build_plan
from vidsparse.methods.cached import CachedConfig, block_attention_mass, kept_recall, video_qk
from vidsparse.methods.cached_patterns import (
    DENSE,
    PATTERN_NAMES,
    SINK,
    SPATIAL,
    STRIPE,
    TEMPORAL,
    WINDOW,
    PatternFile,
    PatternRecorder,
    load_patterns,
    pattern_masks,
)
from vidsparse.pipelines.offline import tiny
from vidsparse.pipelines.wan import WanSparseAttnProcessor
from vidsparse.plan import finalize_plan

GRID = VideoLayout(4, 16, 16)  # 4 blocks of 64 tokens (4 token rows each) per frame, 16 blocks
PIPE_GEOMETRY = dict(num_frames=17, height=128, width=192)  # latent 5 x 8 x 12 = 480 tokens, 8 blocks
# Pipeline tests check plans and state, not executors (flex vs reference is compared in test_cached.py): the
# reference executor spares them FlexAttention compiles for per-head plan shapes.
BACKEND = "reference"


@pytest.fixture(scope="module")
def pipe():
    p = tiny.build("wan")
    p.set_progress_bar_config(disable=True)
    return p


def _generate(pipe, steps=2, **geometry):
    return pipe(
        prompt="a red circle moves left",
        negative_prompt="",
        num_inference_steps=steps,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
        **(geometry or PIPE_GEOMETRY),
    ).frames


# --------------------------------------------------------------------------------------------- pattern types


def test_geometric_masks_follow_the_grid():
    kinds = torch.tensor([DENSE, WINDOW, SPATIAL, TEMPORAL, SINK, WINDOW])
    params = torch.tensor([[0, 0], [0, 0], [0, 4], [0, 0], [1, 0], [1, 0]])
    masks = pattern_masks(kinds, params, GRID, 64)
    frame = torch.arange(16) // 4  # frame of each block
    band = torch.arange(16) % 4  # which 4-row band of its frame
    same_frame = frame[:, None] == frame[None, :]
    assert masks[0].all()
    assert torch.equal(masks[1], same_frame)
    # rows 4b..4b+3 vs 4c..4c+3 are at most 4 rows apart iff |b - c| <= 1
    assert torch.equal(masks[2], same_frame & ((band[:, None] - band[None, :]).abs() <= 1))
    assert torch.equal(masks[3], band[:, None] == band[None, :])  # same place, every frame
    assert torch.equal(masks[4], same_frame | (frame[None, :] == 0).expand(16, 16))  # + first-frame stripe
    assert torch.equal(masks[5], (frame[:, None] - frame[None, :]).abs() <= 1)


def test_stripe_needs_its_columns():
    with pytest.raises(ValueError, match="stripe patterns need columns"):
        pattern_masks(torch.tensor([STRIPE]), torch.tensor([[2, 0]]), GRID, 64)
    columns = torch.zeros(1, 16, dtype=torch.bool)
    columns[0, [0, 5]] = True
    mask = pattern_masks(torch.tensor([STRIPE]), torch.tensor([[2, 0]]), GRID, 64, columns=columns)
    assert torch.equal(mask[0], columns.expand(16, 16))


# ----------------------------------------------------------------------------------------------- calibration


def _sharp_mass(layout, head_types, seed=0, sharpen=4.0):
    """Exact block masses of synthetic heads made more peaked (q scaled), as real heads often are."""
    q, k, _ = synthetic_qkv(layout, heads=len(head_types), head_dim=32, head_types=head_types, seed=seed)
    return block_attention_mass(*video_qk(q * sharpen, k, layout, None), 64)


def test_recorded_recalls_are_exact():
    mass = _sharp_mass(GRID, ("spatial", "temporal"))
    with PatternRecorder() as rec:
        rec.record(0, 0, mass, GRID, block_size=64, tile=None)
        rec.record(0, 0, mass, GRID, block_size=64, tile=None)  # averaged over calls
        stats = rec.stats[(0, 0)]
        masks = pattern_masks(rec.candidates[:, 0], rec.candidates[:, 1:], GRID, 64) | torch.eye(16, dtype=torch.bool)
        direct = torch.stack([kept_recall(m[None, None], mass)[0] for m in masks], -1)  # [H, C]
        torch.testing.assert_close((stats.recall / stats.calls).float(), direct, atol=1e-5, rtol=0)
        recall, density, cols = rec._stripes(stats)
        for f in range(cols.shape[1]):
            for h in range(2):
                stripe = cols[h, f].expand(16, 16) | torch.eye(16, dtype=torch.bool)
                assert float(recall[h, f]) == pytest.approx(float(kept_recall(stripe[None, None], mass[:, h : h + 1])))
                assert float(density[h, f]) == pytest.approx(float(stripe.float().mean()))


def test_classification_picks_the_cheapest_pattern_that_reaches_the_recall(pipe):
    layout = VideoLayout(8, 16, 16)
    with PatternRecorder() as rec:
        for seed in range(2):
            mass = _sharp_mass(layout, ("temporal", "spatial", "global"), seed=seed)
            rec.record(0, 1, mass, layout, block_size=64, tile=None)
        patterns = rec.classify(describe_models([pipe.transformer]), recall=0.9, max_density=0.6)
        strict = rec.classify(describe_models([pipe.transformer]), recall=0.999, max_density=0.3)
    assert patterns.shape == (1, 2, 3)
    assert PATTERN_NAMES[int(patterns.kinds[0, 1, 0])] == "temporal"  # the same place across frames
    chosen = patterns.kinds[0, 1] != DENSE
    assert (patterns.recall[0, 1][chosen] >= 0.9).all() and (patterns.density[0, 1][chosen] <= 0.6).all()
    assert (patterns.kinds[0, 0] == DENSE).all()  # layer 0 was never recorded
    assert (strict.kinds == DENSE).all()  # nothing keeps 99.9 % at density <= 0.3
    # Re-derived masks have the calibrated density on the calibration grid.
    masks = patterns.video_mask(0, 1, layout)[0] | torch.eye(32, dtype=torch.bool)
    torch.testing.assert_close(masks.float().mean((-1, -2)), patterns.density[0, 1], atol=1e-6, rtol=0)


def test_recorder_refuses_mixed_geometries_and_inactive_keys():
    with PatternRecorder() as rec:
        rec.record(0, 0, _sharp_mass(GRID, ("spatial",)), GRID, block_size=64, tile=None)
        with pytest.raises(ValueError, match="one geometry"):
            other = VideoLayout(2, 16, 16)
            rec.record(0, 0, _sharp_mass(other, ("spatial",)), other, block_size=64, tile=None)
    q, k, _ = synthetic_qkv(GRID, heads=1, head_dim=16)
    with pytest.raises(ValueError, match="not an active PatternRecorder"):
        build_plan(CachedConfig(calibration=rec), q, k, GRID, PlanContext())


def test_calibration_takes_the_recorder_itself():
    with pytest.raises(ValueError, match="calibration='recorder-1234' is invalid: expected a PatternRecorder"):
        CachedConfig(calibration="recorder-1234")
    with PatternRecorder() as rec:
        config = CachedConfig(calibration=rec)
        assert config.to_dict()["calibration"] is rec  # copies of the config share the one live recorder
        assert config.replace(density=None).calibration is rec
    assert "inactive" in repr(rec)


# ----------------------------------------------------------------------------------------------- the file


def _file_for(transformer, kinds, params, grid=(5, 8, 12), columns=None):
    """A PatternFile for ``transformer`` with the given [L, H] kinds and [L, H, 2] params."""
    layers, heads = kinds.shape
    vb = -(-(grid[0] * grid[1] * grid[2]) // 64)
    cols = torch.zeros(1, layers, heads, vb, dtype=torch.bool) if columns is None else columns[None]
    return PatternFile(
        kinds[None].int(),
        params[None].int(),
        cols,
        torch.ones(1, layers, heads),
        torch.full((1, layers, heads), 0.5),
        (type(transformer).__name__,),
        (model_fingerprint(transformer),),
        grid,
        64,
        info={"note": "test"},
    )


def test_round_trip_gives_the_same_plans(pipe, tmp_path):
    layout = VideoLayout(5, 8, 12)
    columns = torch.zeros(2, 2, 8, dtype=torch.bool)
    columns[1, 1, [0, 3]] = True
    original = _file_for(
        pipe.transformer,
        torch.tensor([[WINDOW, TEMPORAL], [SPATIAL, STRIPE]]),
        torch.tensor([[[0, 0], [1, 0]], [[1, 2], [2, 0]]]),
        columns=columns,
    )
    path = original.save(tmp_path / "p.safetensors")
    loaded = PatternFile.load(path)
    for name in ("kinds", "params", "columns", "recall", "density"):
        assert torch.equal(getattr(loaded, name), getattr(original, name)), name
    assert (loaded.grid, loaded.block_size, loaded.tile, loaded.info) == ((5, 8, 12), 64, None, {"note": "test"})
    assert loaded.model_classes == ("WanTransformer3DModel",)
    q, k, _ = synthetic_qkv(layout, heads=2, head_dim=16)
    for layer in range(2):
        ctx = PlanContext(layer=layer)
        plan = vidsparse.make_plan("cached", q, k, layout, patterns=str(path), ctx=ctx)
        plan.validate()
        expected = finalize_plan(original.video_mask(0, layer, layout), layout, 64)
        assert torch.equal(plan.block_mask(), expected.block_mask())
        assert vidsparse.make_plan("cached", q, k, layout, patterns=str(path), ctx=ctx) is plan  # built once


def test_save_is_atomic_and_never_overwrites_unasked(pipe, tmp_path):
    patterns = _file_for(pipe.transformer, torch.zeros(2, 2), torch.zeros(2, 2, 2))
    path = tmp_path / "p.safetensors"
    path.write_bytes(b"precious")
    with pytest.raises(ValueError, match="exists; pass --force"):
        patterns.save(path)
    assert path.read_bytes() == b"precious"
    patterns.save(path, force=True)
    assert PatternFile.load(path).shape == (1, 2, 2)
    assert sorted(os.listdir(tmp_path)) == ["p.safetensors"]  # no temporary file left behind
    with pytest.raises(ValueError, match="does not exist"):
        patterns.save(tmp_path / "missing" / "p.safetensors")


def _rewrite(path, out, *, metadata=None, drop=None):
    """Copy a pattern file with changed metadata entries or a dropped tensor."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {name: f.get_tensor(name) for name in f.keys() if name != drop}
    meta.update(metadata or {})
    save_file(tensors, str(out), metadata=meta)
    return out


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("truncated", "not a readable safetensors file.*corrupted"),
        ("garbage", "not a readable safetensors file"),
        ("format", "not a vidsparse pattern file"),
        ("version", "format version '99'"),
        ("drop", "lacks pattern_params"),
        ("ids", "pattern_ids outside"),
        ("grid", "not of the form TxHxW"),
    ],
)
def test_corrupted_files_give_clear_errors(pipe, tmp_path, change, message):
    good = _file_for(pipe.transformer, torch.zeros(2, 2), torch.zeros(2, 2, 2)).save(tmp_path / "good.safetensors")
    bad = tmp_path / "bad.safetensors"
    if change == "truncated":
        bad.write_bytes(good.read_bytes()[:-40])
    elif change == "garbage":
        bad.write_bytes(b"\x00" * 64)
    elif change == "format":
        _rewrite(good, bad, metadata={"format": "something-else"})
    elif change == "version":
        _rewrite(good, bad, metadata={"format_version": "99"})
    elif change == "drop":
        _rewrite(good, bad, drop="pattern_params")
    elif change == "grid":
        _rewrite(good, bad, metadata={"grid": "5x8"})
    else:
        broken = _file_for(pipe.transformer, torch.zeros(2, 2), torch.zeros(2, 2, 2))
        broken.kinds[0, 0, 0] = 42
        from safetensors.torch import save_file

        save_file(
            {
                "pattern_ids": broken.kinds,
                "pattern_params": broken.params,
                "stripe_columns": broken.columns.to(torch.uint8),
                "recall": broken.recall,
                "density": broken.density,
            },
            str(bad),
            metadata=broken.metadata(),
        )
    before = bad.read_bytes()
    with pytest.raises(ValueError, match=message):
        PatternFile.load(bad)
    with pytest.raises(ValueError, match=message):
        vidsparse.apply(pipe, "cached", patterns=str(bad))
    assert bad.read_bytes() == before
    assert not isinstance(pipe.transformer.blocks[0].attn1.processor, WanSparseAttnProcessor)  # nothing installed


def test_other_model_is_refused_before_anything_is_installed(pipe, tmp_path):
    path = _file_for(pipe.transformer, torch.zeros(2, 2), torch.zeros(2, 2, 2)).save(tmp_path / "p.safetensors")
    two_experts = tiny.build("wan2.2")
    with pytest.raises(ValueError, match=r"calibrated for 1 transformer\(s\).*this pipeline has 2"):
        vidsparse.apply(two_experts, "cached", patterns=str(path))
    from diffusers import WanTransformer3DModel

    bigger = WanTransformer3DModel(**{**dict(pipe.transformer.config), "num_layers": 3})
    with pytest.raises(ValueError, match="another WanTransformer3DModel configuration.*fingerprint"):
        vidsparse.apply(bigger, "cached", patterns=str(path))
    assert not isinstance(bigger.blocks[0].attn1.processor, WanSparseAttnProcessor)
    assert not hasattr(bigger, "_vidsparse_handle")
    linear_file = _file_for(torch.nn.Linear(2, 2), torch.zeros(2, 2), torch.zeros(2, 2, 2))
    with pytest.raises(ValueError, match="calibrated for a Linear"):
        linear_file.check_model(describe_models([pipe.transformer]))


def test_other_grid_rederived_for_geometric_types_refused_for_stripes(pipe, tmp_path):
    geometric = _file_for(
        pipe.transformer, torch.tensor([[WINDOW, TEMPORAL], [SPATIAL, SINK]]), torch.tensor([[[0, 0], [1, 0]]] * 2)
    )
    other = VideoLayout(3, 8, 12)  # 3 frames instead of 5
    q, k, _ = synthetic_qkv(other, heads=2, head_dim=16)
    path = geometric.save(tmp_path / "geo.safetensors")
    plan = vidsparse.make_plan("cached", q, k, other, patterns=str(path), ctx=PlanContext(layer=0))
    plan.validate()
    expected = pattern_masks(geometric.kinds[0, 0], geometric.params[0, 0], other, 64)
    assert torch.equal(plan.block_mask()[0], expected | torch.eye(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="block_size=64; the config has block_size=128"):
        vidsparse.make_plan("cached", q, k, other, patterns=str(path), block_size=128, ctx=PlanContext())
    with pytest.raises(ValueError, match="calibrated for 2 heads"):
        q3, k3, _ = synthetic_qkv(other, heads=3, head_dim=16)
        vidsparse.make_plan("cached", q3, k3, other, patterns=str(path), ctx=PlanContext())
    with pytest.raises(ValueError, match="covers 1 model.*layer 5"):
        vidsparse.make_plan("cached", q, k, other, patterns=str(path), ctx=PlanContext(layer=5))
    with_stripe = _file_for(pipe.transformer, torch.tensor([[STRIPE, DENSE], [DENSE, DENSE]]), torch.zeros(2, 2, 2))
    path = with_stripe.save(tmp_path / "stripe.safetensors")
    with pytest.raises(ValueError, match="1 heads use the data-derived 'stripe' type.*calibrate again"):
        vidsparse.make_plan("cached", q, k, other, patterns=str(path), ctx=PlanContext())


def test_apply_with_a_pattern_file_runs_the_calibrated_plans(pipe, tmp_path):
    patterns = _file_for(
        pipe.transformer, torch.tensor([[WINDOW, TEMPORAL], [DENSE, SINK]]), torch.tensor([[[0, 0], [0, 0]]] * 2)
    )
    path = patterns.save(tmp_path / "p.safetensors")
    layout = VideoLayout(5, 8, 12)
    expected = {}
    for layer in range(2):
        masks = patterns.video_mask(0, layer, layout)[0] | torch.eye(8, dtype=torch.bool)
        expected[layer] = float(masks.float().mean())
    with vidsparse.apply(pipe, "cached", patterns=str(path), dense_steps=1, backend=BACKEND) as handle:
        out = _generate(pipe, steps=3)
        rows = handle.stats()
    assert torch.isfinite(out).all()
    sparse = [r for r in rows if r["sparse"]]
    assert len(sparse) == 2 * 2 * 2  # steps 1-2, cond + uncond, 2 layers
    for r in sparse:
        assert r["density"] == pytest.approx(expected[r["layer"]])
    assert expected[0] < 0.7  # the window/temporal heads of layer 0 really are sparse


def test_two_expert_file_gives_each_expert_its_patterns(tmp_path):
    p = tiny.build("wan2.2")
    p.set_progress_bar_config(disable=True)
    layout = VideoLayout(5, 8, 12)
    t1, t2 = p.transformer, p.transformer_2
    kinds = torch.tensor([[[WINDOW, WINDOW], [WINDOW, WINDOW]], [[DENSE, DENSE], [DENSE, DENSE]]], dtype=torch.int32)
    patterns = PatternFile(
        kinds,
        torch.zeros(2, 2, 2, 2, dtype=torch.int32),
        torch.zeros(2, 2, 2, 8, dtype=torch.bool),
        torch.ones(2, 2, 2),
        torch.ones(2, 2, 2),
        (type(t1).__name__, type(t2).__name__),
        (model_fingerprint(t1), model_fingerprint(t2)),
        layout.grid,
        64,
    )
    path = patterns.save(tmp_path / "experts.safetensors")
    window = float((patterns.video_mask(0, 0, layout)[0] | torch.eye(8, dtype=torch.bool)).float().mean())
    with vidsparse.apply(p, "cached", patterns=str(path), dense_steps=0, backend=BACKEND) as handle:
        _generate(p, steps=4)
        rows = [r for r in handle.stats() if r["sparse"]]
    assert {r["model"] for r in rows} == {0, 1}
    for r in rows:
        assert r["density"] == pytest.approx(window if r["model"] == 0 else 1.0)


def test_patterns_path_from_the_command_line_syntax(tmp_path, pipe):
    from vidsparse.methods import parse_method_spec

    path = _file_for(pipe.transformer, torch.zeros(2, 2), torch.zeros(2, 2, 2)).save(tmp_path / "p.safetensors")
    assert parse_method_spec(f"cached:patterns={path}").patterns == str(path)  # "a/b/c" is not split into a tuple
    with pytest.raises(ValueError, match="tile=.*cannot be combined with patterns"):
        CachedConfig(patterns=str(path), tile=(1, 8, 8))


# ------------------------------------------------------------------------------------------- the command


def test_calibrate_command_writes_refuses_and_loads(pipe, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# calibration prompts\na red circle moves left\n\n")
    out = tmp_path / "tiny.safetensors"
    args = ["calibrate", "--model", "tiny-wan", "--prompts", str(prompts), "--out", str(out), "--steps", "2"]
    args += ["--frames", "17", "--height", "128", "--width", "192", "--device", "cpu"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "1 transformer(s) x 2 layers x 2 heads, latent grid 5x8x12" in printed and "wrote" in printed
    patterns = load_patterns(out)
    assert patterns.shape == (1, 2, 2) and patterns.grid == (5, 8, 12)
    assert patterns.info["prompts"] == 1 and patterns.info["calls_per_layer"] == 2 * 2  # 2 steps x cond/uncond
    assert json.loads(patterns.metadata()["model_classes"]) == ["WanTransformer3DModel"]
    assert ((patterns.recall >= 0.9) | (patterns.kinds == DENSE)).all()
    before = out.read_bytes()
    assert main(args) == 2  # exists: refused before any work, file untouched
    assert "exists; pass --force" in capsys.readouterr().err
    assert out.read_bytes() == before
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    assert main([*args[:4], str(empty), "--out", str(tmp_path / "new.safetensors")]) == 2
    assert "holds no prompt" in capsys.readouterr().err and not (tmp_path / "new.safetensors").exists()
    # The file applies to the pipeline it was calibrated for.
    with vidsparse.apply(pipe, "cached", patterns=str(out), dense_steps=0, backend=BACKEND) as handle:
        _generate(pipe, steps=1)
        sparse = [r for r in handle.stats() if r["sparse"]]
    assert sparse
    for r in sparse:
        mask = patterns.video_mask(0, r["layer"], VideoLayout(5, 8, 12))[0] | torch.eye(8, dtype=torch.bool)
        assert r["density"] == pytest.approx(float(mask.float().mean()))


def _save_raw(patterns, path, **replace):
    """Write ``patterns`` with some tensors replaced as they are (no PatternFile checks on the way out)."""
    from safetensors.torch import save_file

    tensors = {
        "pattern_ids": patterns.kinds,
        "pattern_params": patterns.params,
        "stripe_columns": patterns.columns.to(torch.uint8),
        "recall": patterns.recall,
        "density": patterns.density,
        **replace,
    }
    save_file(tensors, str(path), metadata=patterns.metadata())
    return path


def _nothing_installed(pipe):
    return not isinstance(pipe.transformer.blocks[0].attn1.processor, WanSparseAttnProcessor) and not hasattr(
        pipe.transformer, "_vidsparse_handle"
    )


def test_block_size_and_layer_count_are_checked_at_apply_not_at_the_first_sparse_step(pipe, tmp_path):
    # Issue 23 item 6: with dense warm-up steps the first sparse step (where check_call runs) comes late.
    path = _file_for(pipe.transformer, torch.zeros(2, 2), torch.zeros(2, 2, 2)).save(tmp_path / "p.safetensors")
    with pytest.raises(ValueError, match="block_size=64; the config has block_size=128: pass block_size=64"):
        vidsparse.apply(pipe, "cached", patterns=str(path), block_size=128, dense_steps=2)
    assert _nothing_installed(pipe)
    one_layer = _file_for(pipe.transformer, torch.zeros(1, 2), torch.zeros(1, 2, 2))  # same fingerprint, 1 layer
    path = one_layer.save(tmp_path / "one_layer.safetensors")
    with pytest.raises(ValueError, match="covers 1 layers per model; model 0 .* has 2 attention layers"):
        vidsparse.apply(pipe, "cached", patterns=str(path), dense_steps=2)
    assert _nothing_installed(pipe)


@pytest.mark.parametrize(("name", "value"), [("density", float("nan")), ("density", float("inf")), ("recall", -0.5)])
def test_non_finite_or_out_of_range_density_is_refused(pipe, tmp_path, name, value):
    patterns = _file_for(pipe.transformer, torch.zeros(2, 2), torch.zeros(2, 2, 2))
    broken = getattr(patterns, name).clone()
    broken[0, 1, 0] = value
    path = _save_raw(patterns, tmp_path / "bad.safetensors", **{name: broken})
    message = (
        rf"{name} must be finite numbers in \[0, 1\]; 1 entries are not \(first at \[model, layer, head\] \[0, 1, 0\]"
    )
    with pytest.raises(ValueError, match=message):
        PatternFile.load(path)
    with pytest.raises(ValueError, match=message):
        vidsparse.apply(pipe, "cached", patterns=str(path))
    assert _nothing_installed(pipe)
