"""``vidsparse bench e2e --config`` (real checkpoints' widths) and ``vidsparse bench scaling``: structure and sanity.

Small shapes only (a ``--geometry`` override, one layer, a few hundred tokens): these tests check that every
checkpoint config builds its diffusers class and runs, that the reports are internally consistent and that the
schedule arithmetic is right; speed itself is never asserted.
"""

from __future__ import annotations

import inspect
import json
import math

import diffusers
import pytest
import torch

from vidsparse.cli import main
from vidsparse.eval.bench import amdahl_bound, fitted_exponent, schedule_effective_density
from vidsparse.eval.model_shapes import MODEL_SHAPES, build_model, forward_inputs, get_shape, schedule_timesteps
from vidsparse.methods import make_config

REQUIRED = {"wan2.1-1.3b", "wan2.1-14b", "wan2.2-5b", "hunyuanvideo", "cogvideox-5b", "ltx-video", "mochi"}


def run_cli(argv: list[str]) -> int:
    threads = torch.get_num_threads()
    try:
        return main(argv)
    finally:
        torch.set_num_threads(threads)  # --threads sets the process-wide value


def test_shapes_cover_the_families_with_published_token_counts():
    assert REQUIRED <= set(MODEL_SHAPES)
    # Token counts of the published shapes (latent grid after VAE and patchify).
    assert get_shape("wan2.1-1.3b").tokens == 32760  # 832x480, 81 frames
    assert get_shape("wan2.1-14b").tokens == 75600  # 1280x720, 81 frames
    assert get_shape("hunyuanvideo").tokens == 33 * 45 * 80  # 1280x720, 129 frames
    for shape in MODEL_SHAPES.values():
        assert shape.source.count("/") == 1, shape.name  # a hub repository id
        accepted = set(inspect.signature(getattr(diffusers, shape.model_class).__init__).parameters)
        assert set(shape.config) <= accepted, (shape.name, set(shape.config) - accepted)
    hunyuan = get_shape("hunyuanvideo")
    assert hunyuan.depth == 60
    cut = hunyuan.config_with_layers(2)
    assert (cut["num_layers"], cut["num_single_layers"]) == (2, 4)  # the published 1:2 ratio
    assert {k: v for k, v in cut.items() if "layers" not in k} == {
        k: v for k, v in hunyuan.config.items() if "layers" not in k
    }


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_every_config_builds_its_class_and_runs(name):
    shape = get_shape(name)
    model = build_model(shape, 1)
    assert type(model).__name__ == shape.model_class
    inputs = forward_inputs(shape, model, (2, 2, 4), device=torch.device("cpu"), dtype=torch.float32)
    with torch.no_grad():
        out = model(**inputs, return_dict=False)[0]
    assert torch.isfinite(out).all()


def test_schedule_effective_density_counts_the_warm_up():
    config = make_config("radial", density=0.2, dense_steps=10, dense_layers=1, dense_last_steps=0)
    got = schedule_effective_density(config, 0.2, depth=10, steps=50, timesteps=[500.0] * 50, tokens=10_000)
    assert math.isclose(got, (10 * 1.0 + 40 * (0.1 + 0.9 * 0.2)) / 50)
    timed = config.replace(dense_steps=0, dense_layers=0, dense_above_timestep=900.0)
    timesteps = schedule_timesteps(50, 5.0)
    above = sum(t > 900.0 for t in timesteps)
    assert 0 < above < 50 and timesteps == sorted(timesteps, reverse=True)
    got = schedule_effective_density(timed, 0.2, depth=10, steps=50, timesteps=timesteps, tokens=10_000)
    assert math.isclose(got, (above + (50 - above) * 0.2) / 50)
    small = config.replace(min_tokens=20_000)
    assert schedule_effective_density(small, 0.2, depth=10, steps=50, timesteps=[0.0] * 50, tokens=10_000) == 1.0


def test_fitted_exponent_of_a_power_law():
    assert math.isclose(fitted_exponent([1000, 2000, 4000], [3 * n**2 for n in (1000, 2000, 4000)]), 2.0)
    assert fitted_exponent([1000], [1.0]) is None


@pytest.mark.parametrize(("name", "steps"), [("wan2.1-1.3b", None), ("cogvideox-5b", 20)])
def test_bench_e2e_config_json(tmp_path, name, steps):
    path = tmp_path / "e.json"
    argv = ["bench", "e2e", "--config", name, "--layers", "1", "--geometry", "2x8x16", "--methods", "radial"]
    argv += [] if steps is None else ["--steps", str(steps)]
    argv += ["--density", "0.5", "--block-size", "64", "--threads", "1", "--repeats", "1", "--quiet"]
    assert run_cli([*argv, "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    shape = get_shape(name)
    steps = steps or shape.steps  # --steps replaces the pipeline's schedule length
    model = report["model"]
    assert model["source"] == shape.source and model["class"] == shape.model_class
    assert model["layers"] == 1 and model["depth"] == shape.depth and model["config"]["num_layers"] == 1
    assert report["tokens"] == 256 and report["schedule"]["steps"] == steps
    share = report["attention_share"]
    assert 0 < share < 1
    assert [b["density"] for b in report["bounds"]] == [0.1, 0.25, 0.5]
    for b in report["bounds"]:
        # The dense warm-up can only lower what the schedule allows.
        assert b["effective_density"] >= b["density"]
        assert 1.0 <= b["schedule_bound"] <= b["step_bound"] + 1e-12
        assert math.isclose(b["step_bound"], amdahl_bound(share, b["density"]))
    (row,) = report["results"]
    assert row["spec"] == "radial:density=0.5"
    assert row["sparse_calls"] == row["calls"] == 1  # the measured step is all sparse (1 layer)
    assert 0 < row["density"] < 1
    assert math.isclose(row["step_speedup"], row["dense_ms"] / row["sparse_ms"], rel_tol=1e-9)
    assert math.isclose(row["step_bound"], amdahl_bound(share, row["density"]), rel_tol=1e-9)
    assert math.isclose(row["fraction_of_bound"], row["step_speedup"] / row["step_bound"], rel_tol=1e-9)
    config = make_config("radial", density=0.5, block_size=64)
    effective = schedule_effective_density(
        config,
        row["density"],
        depth=shape.depth,
        steps=steps,
        timesteps=schedule_timesteps(steps, shape.shift),
        tokens=256,
    )
    assert math.isclose(row["schedule_effective_density"], effective, rel_tol=1e-9)
    assert math.isclose(row["predicted_speedup"], row["fraction_of_bound"] * row["schedule_bound"], rel_tol=1e-9)


def test_bench_scaling_json_and_plot(tmp_path, capsys):
    path = tmp_path / "s.json"
    argv = ["bench", "scaling", "--tokens", "512", "1024", "2048", "--frame-grid", "8x16", "--methods", "radial"]
    argv += ["--density", "0.25", "--block-size", "64", "--threads", "1", "--repeats", "2", "--quiet"]
    assert run_cli([*argv, "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    rows = report["results"]
    assert [r["tokens"] for r in rows] == [512, 1024, 2048]
    assert [r["repeats"] for r in rows] == [2, 1, 1]  # fewer rounds at the long end
    for r in rows:
        assert math.isclose(r["density"], 0.25, abs_tol=0.02)
        mem = r["plan_memory"]
        assert mem["bytes"] >= mem["kv_idx_bytes"] > 0 and 0 < mem["index_fill"] <= 1
    assert [r["plan_memory"]["kv_idx_bytes"] for r in rows] == sorted(r["plan_memory"]["kv_idx_bytes"] for r in rows)
    curves = {c["name"]: c for c in report["curves"]}
    assert set(curves) == {"dense", "radial:density=0.25"}
    for c in curves.values():
        assert c["tokens"] == [512, 1024, 2048]
        assert math.isclose(c["exponent"], fitted_exponent(c["tokens"], c["ms"]), rel_tol=1e-9)
    assert curves["dense"]["ms"] == [r["dense_ms"] for r in rows]
    plot = tmp_path / "s.png"
    assert report["plot"] == str(plot) and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "fitted exponent" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["bench", "e2e", "--config", "nosuch"], "--config 'nosuch' is unknown"),
        (["bench", "e2e", "--config", "wan2.1-1.3b", "--heads", "4"], "--heads 4 is invalid with --config"),
        (["bench", "e2e", "--config", "wan2.1-1.3b", "--bound-densities", "0"], "--bound-densities 0.0 is invalid"),
        (["bench", "scaling", "--frame-grid", "8"], "--frame-grid '8' is invalid"),
        (["bench", "scaling", "--tokens", "0"], "--tokens 0 is invalid"),
    ],
)
def test_bad_input_is_named(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err
