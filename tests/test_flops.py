"""``vidsparse bench flops``: real checkpoints counted on the meta device, the FLOP bound, the papers' claims."""

from __future__ import annotations

import json

import pytest

from vidsparse.cli import main
from vidsparse.eval.bench import amdahl_bound
from vidsparse.eval.flops import PUBLISHED, claims_report, count_flops
from vidsparse.eval.model_shapes import get_shape


def test_wan_attention_core_is_exactly_four_s_squared_d_h_per_layer():
    shape = get_shape("wan2.1-1.3b")  # 30 layers, 12 heads x 128, video-only self-attention
    count = count_flops(shape)
    s = 21 * 30 * 52
    assert count.tokens == s and count.text_tokens == 0
    assert count.attention_core == 4 * s * s * 128 * 12 * 30
    assert count.video_core == pytest.approx(count.attention_core, rel=1e-12)
    # VMoBA's paper counts 282.64 TFLOPs for one dense forward of this model at 480p, 81 frames.
    assert count.total / 1e12 == pytest.approx(282.64, rel=0.02)
    assert 0.6 < count.share < 0.8


def test_joint_attention_keeps_text_dense():
    shape = get_shape("cogvideox-5b")
    count = count_flops(shape)
    n, t = count.tokens, count.text_tokens
    assert t == shape.text_tokens > 0
    assert count.video_core == pytest.approx(count.attention_core * n**2 / (n + t) ** 2)


def test_mochi_counts_on_the_meta_device():
    count = count_flops(get_shape("mochi"))  # its rotary code opens an autocast, its text path a nonzero
    assert count.total > 0 and 0 < count.share < 1


def test_a_shorter_grid_has_a_smaller_share():
    shape = get_shape("wan2.1-1.3b")
    assert count_flops(shape, (9, 30, 52)).share < count_flops(shape).share


def test_claims_put_the_bound_at_the_papers_density_and_warm_up():
    radial = [c for c in PUBLISHED if c.method == "radial" and c.config == "hunyuanvideo"]
    (row,) = claims_report(radial, progress=None)["rows"]
    # 12 dense steps of 50, every layer sparse after them, at density 0.275.
    effective = (12 + 38 * 0.275) / 50
    assert row["our_bound"]["effective_density"] == pytest.approx(effective)
    assert row["our_bound"]["schedule_bound"] == pytest.approx(amdahl_bound(row["flop_share"], effective))
    assert row["paper_flop_ratio"] == pytest.approx(612 / 339)
    assert row["fraction_of_flop_bound"] == pytest.approx(1.88 / row["our_bound"]["schedule_bound"])
    # The paper's own dense FLOPs (612 PFLOPs over 50 single-pass steps) agree with this count within 10 %.
    assert row["count_vs_paper"] == pytest.approx(1.0, abs=0.1)


def test_bench_flops_command(tmp_path, capsys):
    out = tmp_path / "f.json"
    assert (
        main(["bench", "flops", "--config", "ltx-video", "--methods", "radial", "--no-claims", "--json", str(out)]) == 0
    )
    report = json.loads(out.read_text())
    (row,) = report["rows"]
    assert row["config"] == "ltx-video" and row["tokens"] == 7392
    assert [b["density"] for b in row["bounds"]["radial"]] == [0.1, 0.25, 0.5]
    assert row["bounds"]["radial"][0]["schedule_bound"] < row["bounds"]["radial"][0]["step_bound"]  # warm-up counts
    assert report["claims"] is None
    assert "| ltx-video | 7392 |" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--config", "nosuch"], "--config 'nosuch' is unknown"),
        (["--densities", "0"], "--densities 0.0 is invalid"),
        (["--methods", "nosuch"], "nosuch"),
    ],
)
def test_bench_flops_bad_input(argv, message, capsys):
    assert main(["bench", "flops", *argv]) == 2
    assert message in capsys.readouterr().err
