"""The GPU benchmark script, dry-run: argument parsing, all three executors, the planning section and the JSON."""

import json

import pytest

from vidsparse.kernels import bench_gpu


def test_smoke_writes_json(tmp_path):
    path = tmp_path / "bench.json"
    assert bench_gpu.main(["--smoke", "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    assert report["meta"]["smoke"] is True and report["meta"]["complete"] is True
    assert [c["density"] for c in report["cases"]] == [0.25, 0.5]
    for case in report["cases"]:
        for key in ("dense_ms", "flex_ms", "triton_ms", "triton_tflops", "speedup_vs_dense", "fraction_of_ideal"):
            assert case[key] > 0, key
        # The same plan through flex and triton: equal outputs, or the timings would compare different work.
        assert case["max_abs_diff_triton_vs_flex"] < 1e-4
    assert {r["op"] for r in report["planning"]} == {"block_means", "block_mask_to_lut"}
    assert all(r["outputs_match"] for r in report["planning"])


def test_default_path_uses_out(monkeypatch, tmp_path):
    monkeypatch.setenv("OUT", str(tmp_path))
    assert bench_gpu.default_json_path() == tmp_path / "bench_gpu.json"
    monkeypatch.delenv("OUT")
    assert bench_gpu.default_json_path().parts[-3:] == ("samples", "bench", "bench_gpu.json")


def test_random_plan_density_and_flops():
    import torch

    plan = bench_gpu.random_plan(3, 1000, 64, 0.25, generator=torch.Generator().manual_seed(0), device="cpu")
    plan.validate()  # own block kept, sorted, unique
    assert plan.kv_num.eq(4).all()  # round(0.25 * 16)
    assert plan.density() == pytest.approx(0.25)
    full = bench_gpu.random_plan(1, 1000, 64, 1.0, generator=torch.Generator(), device="cpu")
    assert bench_gpu.attended_pairs(full) == 1000 * 1000


@pytest.mark.parametrize("argv", [["--densities", "0"], ["--densities", "1.5"], ["--block-sizes", "32"]])
def test_bad_arguments_exit(argv):
    with pytest.raises(SystemExit):
        bench_gpu.parse_args(argv)
