"""The GPU benchmark script, dry-run on CPU: every case, the budget, tolerances, the JSON."""

import json

import pytest
import torch

from vidsparse.kernels import bench_gpu


def test_smoke_fp32_every_case_tight(tmp_path):
    path = tmp_path / "bench.json"
    assert bench_gpu.main(["--smoke", "--dtype", "fp32", "--json", str(path), "--no-planning"]) == 0
    report = json.loads(path.read_text())
    assert report["meta"]["smoke"] is True and report["meta"]["complete"] is True
    assert [c["case"] for c in report["cases"]] == bench_gpu.expected_cases(smoke=True, planning=False)
    assert report["skipped"] == []
    for case in report["cases"]:
        assert "error" not in case, case
        keys = ("flex_ms", "triton_ms", "triton_tflops", "speedup_vs_flash", "plan_ms")
        for key in keys if case["kind"] == "sparse" else ("ms", "tflops"):
            assert case[key] > 0, (case["case"], key)
        if case["kind"] == "sparse":
            # fp32: the same plan through flex and triton differs only by summation order.
            assert case["max_abs_diff_triton_vs_flex"] < 1e-4, case["case"]
            assert 0 < case["density"] <= 1 and 1 <= case["kmax"]


def test_tolerance_by_dtype():
    # bf16 must allow a couple of rounding steps (values near 1: 4-8e-3 each); fp32 stays tight.
    assert bench_gpu.MAX_OUTPUT_DIFF["bf16"] == pytest.approx(2e-2)
    assert bench_gpu.MAX_OUTPUT_DIFF["fp32"] <= 1e-4
    meta = {"dtype": "bf16"}
    ok = {"case": "a", "max_abs_diff_triton_vs_flex": 8e-3}
    assert bench_gpu.failures({"meta": meta, "cases": [ok]}) == []
    bad = {"case": "b", "max_abs_diff_triton_vs_flex": 3e-2}
    assert bench_gpu.failures({"meta": meta, "cases": [bad]}) == ["b: outputs differ by 0.03 > 0.02"]
    assert bench_gpu.failures({"meta": {"dtype": "fp32"}, "cases": [ok]})  # 8e-3 is far too much in fp32
    nan = {"case": "c", "max_abs_diff_vs_flash": float("nan")}
    assert bench_gpu.failures({"meta": meta, "cases": [nan]})
    assert bench_gpu.failures({"meta": meta, "cases": [{"case": "d", "error": "boom"}]}) == ["d: boom"]


def test_budget_skips_and_says_so(tmp_path):
    path = tmp_path / "bench.json"
    # A budget shorter than one case: the first case runs (no estimate yet), every later one is skipped.
    assert bench_gpu.main(["--smoke", "--json", str(path), "--budget-s", "0.001"]) == 0
    report = json.loads(path.read_text())
    assert len(report["cases"]) == 1 and report["meta"]["complete"] is False
    names = [c["case"] for c in report["cases"]] + [s["case"] for s in report["skipped"]]
    assert names == bench_gpu.expected_cases(smoke=True)
    assert all(s["reason"].startswith("budget:") for s in report["skipped"])


def test_budget_estimate():
    budget = bench_gpu.Budget(seconds=10.0, start=0.0)
    budget.elapsed = lambda: 7.0  # type: ignore[method-assign]
    assert budget.allows()
    budget.record(2.5)
    assert budget.allows()
    budget.record(3.5)  # 7 + 3.5 > 10: the next case would probably overrun
    assert not budget.allows()


def test_case_error_is_recorded_not_raised(tmp_path):
    report = {"meta": {"dtype": "fp32"}, "cases": [], "skipped": []}
    runner = bench_gpu.Runner(report, bench_gpu.Budget(60.0, bench_gpu.time.perf_counter()), lambda: None)

    def boom():
        raise RuntimeError("no such backend")

    assert runner.run("x", boom)["error"] == "RuntimeError: no such backend"
    assert bench_gpu.failures(report) == ["x: RuntimeError: no such backend"]


def test_default_path_uses_out(monkeypatch, tmp_path):
    monkeypatch.setenv("OUT", str(tmp_path))
    assert bench_gpu.default_json_path() == tmp_path / "bench_gpu.json"
    monkeypatch.delenv("OUT")
    assert bench_gpu.default_json_path().parts[-3:] == ("samples", "bench", "bench_gpu.json")


def test_full_grid_shapes():
    names = bench_gpu.expected_cases(smoke=False)
    assert {n.split("/")[0] for n in names} == {"32760", "75600"}
    assert bench_gpu.MODELS == {"wan2.1-1.3b": (12, 128), "hunyuanvideo": (24, 128)}
    for tokens, (f, h, w) in bench_gpu.GRIDS.items():
        assert f * h * w == tokens
    assert {"32760/hunyuanvideo/dense/sdpa_cudnn", "75600/wan2.1-1.3b/sparse/radial"} <= set(names)


def test_random_plan_density_and_flops():
    plan = bench_gpu.random_plan(3, 1000, 64, 0.25, generator=torch.Generator().manual_seed(0), device="cpu")
    plan.validate()  # own block kept, sorted, unique
    assert plan.kv_num.eq(4).all()  # round(0.25 * 16)
    assert plan.density() == pytest.approx(0.25)
    full = bench_gpu.random_plan(1, 1000, 64, 1.0, generator=torch.Generator(), device="cpu")
    assert bench_gpu.attended_pairs(full) == 1000 * 1000
    assert bench_gpu.attended_pairs(full, heads=4) == 4 * 1000 * 1000  # a one-head plan serves every head


@pytest.mark.parametrize("argv", [["--density", "0"], ["--density", "1.5"], ["--budget-s", "0"], ["--dtype", "x"]])
def test_bad_arguments_exit(argv):
    with pytest.raises(SystemExit):
        bench_gpu.parse_args(argv)
