"""``vidsparse bench``: JSON schema and internal consistency on tiny geometries (speed itself is never asserted)."""

import json
import math

import pytest
import torch
from helpers import has_cxx_compiler

from vidsparse.cli import main
from vidsparse.eval.bench import amdahl_bound, default_bench_methods
from vidsparse.methods import get_method, method_names

ATTENTION_KEYS = {"method", "density", "tokens", "dense_ms", "plan_ms", "attn_ms", "speedup", "ideal", "efficiency"}


def test_default_methods_are_the_density_targeting_ones():
    expected = [name for name in method_names() if get_method(name).targets_density]
    assert default_bench_methods() == expected
    assert "window" not in expected and "dense" not in expected


def test_bench_attention_json_schema_and_ratios(tmp_path, capsys):
    path = tmp_path / "a.json"
    argv = ["bench", "attention", "--geometry", "4x8x16", "--geometry", "3x8x12", "--densities", "0.5", "0.25"]
    argv += ["--methods", "radial", "window:window=0", "--repeats", "1", "--threads", "1", "--block-size", "128"]
    threads = torch.get_num_threads()
    try:
        assert main([*argv, "--quiet", "--json", str(path)]) == 0
    finally:
        torch.set_num_threads(threads)  # --threads sets the process-wide value
    report = json.loads(path.read_text())
    assert {"device", "torch", "results", "load_average", "command"} <= set(report)
    assert report["cpu_threads"] == 1
    rows = report["results"]
    # radial at 2 densities + window once (no density target), for each of the 2 geometries
    assert len(rows) == 6
    assert sorted({r["tokens"] for r in rows}) == [288, 512]
    assert any("no density target" in note for note in report["notes"])
    for r in rows:
        assert ATTENTION_KEYS <= set(r)
        assert 0 < r["density"] <= 1
        assert math.isclose(r["speedup"], r["dense_ms"] / (r["plan_ms"] + r["attn_ms"]), rel_tol=1e-9)
        assert math.isclose(r["ideal"], 1 / r["density"], rel_tol=1e-9)
        assert math.isclose(r["efficiency"], r["speedup"] / r["ideal"], rel_tol=1e-9)
        # One round: its own efficiency is the median's.
        assert len(r["efficiency_rounds"]) == 1
        assert math.isclose(r["efficiency_rounds"][0], r["efficiency"], rel_tol=1e-9)
        assert r["backend"] == ("cpp" if has_cxx_compiler() else "gather")  # auto on CPU, float32
        assert r["config"]["block_size"] == 128
    radial = [r for r in rows if r["method"] == "radial" and r["tokens"] == 512]
    assert [round(r["density"], 2) for r in radial] == [0.5, 0.25]  # radial plans the target density
    out = capsys.readouterr().out
    assert "| radial:density=0.5,block_size=128 | 512 |" in out and "efficiency" in out


def test_bench_e2e_json_schema_and_bound(tmp_path):
    path = tmp_path / "e.json"
    argv = [
        "bench",
        "e2e",
        "--geometry",
        "2x4x8",
        "--steps",
        "2",
        "--layers",
        "2",
        "--methods",
        "radial",
        "--density",
        "0.5",
    ]
    assert main([*argv, "--repeats", "1", "--quiet", "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    assert report["model"]["class"] == "WanTransformer3DModel"
    assert report["tokens"] == 64 and report["steps"] == 2
    assert 0 < report["attention_share"] < 1
    (row,) = report["results"]
    assert row["spec"] == "radial:density=0.5"
    # radial's default warm-up: layer 0 dense and round(0.24 * 2) = 0 dense steps -> 1 of 2 layers sparse
    assert row["calls"] == 4 and row["sparse_calls"] == 2
    assert math.isclose(row["effective_density"], (2 * 1.0 + 2 * row["density"]) / 4, rel_tol=1e-6)
    assert math.isclose(row["amdahl_bound"], amdahl_bound(report["attention_share"], row["effective_density"]))
    assert math.isclose(row["speedup"], row["dense_s"] / row["sparse_s"], rel_tol=1e-9)
    assert math.isclose(row["fraction_of_bound"], row["speedup"] / row["amdahl_bound"], rel_tol=1e-9)


def test_amdahl_bound():
    assert amdahl_bound(0.0, 0.1) == 1.0
    assert math.isclose(amdahl_bound(1.0, 0.25), 4.0)
    assert math.isclose(amdahl_bound(0.8, 0.25), 1 / (0.2 + 0.2))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["bench", "attention", "--geometry", "2x8"], "--geometry '2x8' is invalid"),
        (["bench", "attention", "--threads", "0"], "--threads 0 is invalid"),
        (["bench", "attention", "--densities", "1.5"], "--densities 1.5 is invalid"),
        (["bench", "e2e", "--methods", "nosuch"], "method='nosuch' is unknown"),
        (["bench", "e2e", "--steps", "0"], "--steps 0 is invalid"),
        (["bench", "attention", "--block-size", "100"], "block_size=100"),
    ],
)
def test_bad_input_is_named(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_time_interleaved_alternates_the_functions():
    """Each round calls every function once, in order, so load drift spreads over all of them alike."""
    import torch

    from vidsparse.eval.bench import time_interleaved

    calls: list[str] = []
    medians = time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, torch.device("cpu"), 3)
    assert calls == ["a", "b"] * 3
    assert set(medians) == {"a", "b"} and all(value >= 0 for value in medians.values())


def test_time_rounds_keeps_every_round(monkeypatch):
    """The per-round times behind the medians, in round order (the attention bench's per-round efficiencies)."""
    import torch

    from vidsparse.eval import bench

    clock = {"now": 0.0, "round": 0}
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock["now"])

    def work(ms: float):
        def run() -> None:  # a function whose cost grows by 1 ms each round: the drift interleaving spreads
            clock["now"] += (ms + clock["round"]) / 1000

        return run

    def next_round() -> None:
        clock["round"] += 1

    rounds = bench.time_rounds({"a": work(3.0), "b": work(5.0), "tick": next_round}, torch.device("cpu"), 4)
    assert [round(t, 6) for t in rounds["a"]] == [3.0, 4.0, 5.0, 6.0]
    assert [round(t, 6) for t in rounds["b"]] == [5.0, 6.0, 7.0, 8.0]
    medians = bench.time_interleaved({"a": work(3.0)}, torch.device("cpu"), 3)
    assert round(medians["a"], 6) == 7.0  # rounds at 7, 7, 7 ms: the drift counter stays at 4


def test_bench_train_interleaves_arms_and_reports_ratios(tmp_path, capsys):
    """Two timed rounds of dense and radial training steps: one record per step and arm, the ratio to dense, the
    density the sparse forward measured (below 1: the mask was applied), and no file left but the JSON."""
    path = tmp_path / "train.json"
    argv = ["bench", "train", "--methods", "radial:density=0.25", "--frames", "17", "--rounds", "2", "--rank", "2"]
    assert main([*argv, "--json", str(path), "--quiet"]) == 0
    report = json.loads(path.read_text())
    dense, radial = report["rows"]
    assert dense["arm"] == "none" and dense["ratio"] == 1.0 and dense["density"] is None
    assert radial["arm"] == "radial:density=0.25" and 0.2 < radial["density"] < 0.3
    assert len(radial["steps_s"]) == 2 and radial["ratio"] == pytest.approx(radial["step_s"] / dense["step_s"], 1e-2)
    assert "| radial:density=0.25 |" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.json"]


def test_bench_train_checks_specs_before_training(capsys):
    assert main(["bench", "train", "--methods", "nosuch"]) == 2
    assert "nosuch" in capsys.readouterr().err
