"""The oracle: top-mass block selection from the exact attention, the suite's reference for every method."""

from __future__ import annotations

import pytest
import torch

import vidsparse
from vidsparse.eval.attention_suite import evaluate, make_inputs, oracle_rows
from vidsparse.layout import VideoLayout
from vidsparse.methods import PlanContext, get_method, method_names, parse_method_spec, reference_method_names
from vidsparse.methods.cached import block_attention_mass, video_qk
from vidsparse.methods.oracle import OracleConfig, forced_video_pairs, oracle_mask
from vidsparse.plan import num_blocks


@pytest.fixture(scope="module")
def suite_inputs():
    """Structured inputs on two small geometries: 1 920 raster tokens, and a ragged one with text after the video."""
    return {
        "5x16x24": make_inputs(VideoLayout(5, 16, 24), heads=4),
        "4x12x20+30": make_inputs(VideoLayout(4, 12, 20, text_len=30), heads=4),
    }


def test_registered_as_reference_not_method():
    assert "oracle" in reference_method_names() and "oracle" not in method_names()
    assert get_method("oracle").config_cls is OracleConfig
    with pytest.raises(ValueError, match="scope='all' is invalid"):
        OracleConfig(scope="all")
    with pytest.raises(ValueError, match="density=None is invalid for the oracle"):
        OracleConfig(density=None)


@pytest.mark.parametrize("scope", ["row", "head", "adaptive"])
@pytest.mark.parametrize("density", [0.1, 0.25, 0.5])
def test_density_tracks_target_and_invariants(scope, density):
    layout = VideoLayout(3, 10, 14, text_len=17)  # 420 video tokens: a partial last block shared with the text
    q, k = torch.randn(2, layout.seq_len, 3, 16), torch.randn(2, layout.seq_len, 3, 16)
    plan = vidsparse.make_plan("oracle", q, k, layout, density=density, scope=scope).validate()
    vb = num_blocks(layout.num_video_tokens, 64)
    # Budgets round to whole pairs (head) or whole blocks per row (row, never above the target: the forced dense
    # last row takes its share); the forced pairs count in them.
    forced = forced_video_pairs(layout, 64).float().mean().item()
    target = max(density, forced)
    if scope == "head":
        assert plan.density() == pytest.approx(target, abs=0.5 / vb**2 + 1e-6)
    elif scope == "adaptive":  # per head 0.5x to 1.5x the row budget, the forced text-shared row and column on top
        assert 0.5 * density - 1 / vb <= plan.density() <= 1.5 * density + forced + 1 / vb
    else:
        assert target - 2 / vb <= plan.density() <= target + 0.5 / vb**2 + 1e-6
    dense = plan.to_dense_mask()[0, 0]
    assert dense[layout.num_video_tokens :].all() and dense[:, layout.num_video_tokens :].all()  # text dense


def test_head_scope_keeps_the_most_mass():
    """At equal pair count (forced pairs included), no selection keeps more mass than the per-head top mass."""
    gen = torch.Generator().manual_seed(0)
    mass = torch.rand(1, 2, 12, 12, generator=gen) ** 4
    mass = mass / mass.sum(-1, keepdim=True)
    best = oracle_mask(mass, 0.25, scope="head")
    row = oracle_mask(mass, 0.25, scope="row")
    assert int(best.sum()) == int(row.sum()) == 2 * round(0.25 * 144)
    assert best.diagonal(dim1=-2, dim2=-1).all() and row.diagonal(dim1=-2, dim2=-1).all()
    assert (row.sum(-1) == round(0.25 * 12)).all()  # the same budget in every row
    kept = (mass * best).sum()
    for _ in range(20):  # random selections of the same size that keep the diagonal
        scores = torch.rand(mass.shape, generator=gen) + 2 * torch.eye(12)
        top = scores.flatten(-2).topk(round(0.25 * 144), dim=-1).indices
        other = torch.zeros(1, 2, 144, dtype=torch.bool).scatter_(-1, top, True).view_as(best)
        assert (mass * other).sum() <= kept + 1e-6
    assert (mass * row).sum() <= kept + 1e-6


def test_plan_selects_from_the_exact_mass():
    layout = VideoLayout(2, 8, 16)
    q, k = torch.randn(1, layout.seq_len, 2, 16), torch.randn(1, layout.seq_len, 2, 16)
    plan = vidsparse.make_plan("oracle", q, k, layout, density=0.5)
    expected = oracle_mask(block_attention_mass(*video_qk(q, k, layout, None), 64), 0.5)
    assert torch.equal(plan.block_mask(), expected)


@pytest.mark.parametrize("geometry", ["5x16x24", "4x12x20+30"])
@pytest.mark.parametrize(
    "spec",
    [
        "radial:density=0.25",
        "draft:density=0.25",
        "moba:selection=topk,density=0.25",
        "radial:faithful=true,strict_tokens=false",
    ],
)
def test_oracle_error_at_most_the_methods(suite_inputs, geometry, spec):
    """The oracle (best of its three rules) at a method's measured density and token order has no larger error."""
    row = evaluate(parse_method_spec(spec), suite_inputs[geometry], oracle=True)
    assert row["oracle_rel_l2"] <= row["rel_l2"]
    assert row["vs_oracle"] == pytest.approx(row["rel_l2"] / row["oracle_rel_l2"])


def test_cached_search_matches_the_row_oracle(suite_inputs):
    """``cached`` at its search step is the row oracle with sampled rows and head-adaptive budgets: within 1 %."""
    row = evaluate(parse_method_spec("cached:density=0.25,dense_steps=0"), suite_inputs["5x16x24"], oracle=True)
    assert row["vs_oracle"] == pytest.approx(1.0, abs=0.01)


def test_reference_rows(suite_inputs):
    rows = oracle_rows(suite_inputs["5x16x24"], [0.125, 0.5, 1.0])
    assert [r["method"] for r in rows] == ["oracle"] * 3
    errors = [r["rel_l2"] for r in rows]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-5  # more blocks, less error; density 1 is exact
    for row, target in zip(rows, [0.125, 0.5, 1.0]):
        assert row["density"] == pytest.approx(target, abs=1 / 30)


def test_head_mix_names():
    from vidsparse.eval.synthetic import HETEROGENEOUS_HEAD_MIX, resolve_head_types

    assert resolve_head_types(["heterogeneous"]) == HETEROGENEOUS_HEAD_MIX
    assert resolve_head_types(["sharp", "diffuse"]) == ("sharp", "diffuse")
    with pytest.raises(ValueError, match="head type 'bogus' is unknown"):
        resolve_head_types(["spatial", "bogus"])


def test_eval_report_mse_ratio_against_the_oracle_run():
    from vidsparse.eval.report import add_oracle_ratios

    def entry(method, psnr, target=0.25, setting="tiny", kind="sparse"):
        return {"setting": setting, "method": method, "kind": kind, "target_density": target, "psnr": psnr}

    summary = [
        entry("dense", None, None, kind="dense"),
        entry("oracle:density=0.25", 30.0),
        entry("radial:density=0.25", 27.0),
        entry("radial:density=0.5", 35.0, target=0.5),  # no oracle at 0.5
        entry("draft:density=0.25", 31.0, setting="other"),  # no oracle in that setting
    ]
    add_oracle_ratios(summary)
    ratios = [e["mse_vs_oracle"] for e in summary]
    assert ratios[0] is None and ratios[1] == pytest.approx(1.0) and ratios[3] is None and ratios[4] is None
    assert ratios[2] == pytest.approx(10**0.3)  # 3 dB below the oracle: about twice its MSE


def test_suite_cli_layer_and_oracle_columns(tmp_path, capsys):
    import json

    from vidsparse.cli import main

    path = tmp_path / "a.json"
    args = ["eval", "attention", "--methods", "moba:selection=topk", "--densities", "0.25", "--geometry", "4x8x16"]
    assert main([*args, "--heads", "2", "--layer", "1", "--json", str(path)]) == 0
    assert "error / oracle" in capsys.readouterr().out
    data = json.loads(path.read_text())
    assert data["layer"] == 1 and [r["method"] for r in data["rows"]] == ["oracle", "moba"]
    moba = data["rows"][1]
    inputs = make_inputs(VideoLayout(4, 8, 16), heads=2)
    expected = evaluate(parse_method_spec("moba:selection=topk,density=0.25"), inputs, ctx=PlanContext(layer=1))
    assert moba["density"] == pytest.approx(expected["density"]) and moba["vs_oracle"] > 0


def test_oracle_runs_in_a_pipeline():
    """``vidsparse.apply(pipe, "oracle")`` plans every sparse call from that call's exact attention."""
    from vidsparse.pipelines.offline import tiny
    from vidsparse.pipelines.support import generate

    name = "wan"  # a tiny Wan 2.1 built in memory
    pipe = tiny.build(name)
    pipe.set_progress_bar_config(disable=True)
    handle = vidsparse.apply(pipe, "oracle", density=0.5)
    out = generate(pipe, tiny.get_spec(name), steps=2)
    stats = handle.stats()
    handle.remove()
    assert torch.isfinite(out).all()
    sparse = [row for row in stats if row["sparse"]]
    assert sparse and all(row["density"] < 1 for row in sparse)
