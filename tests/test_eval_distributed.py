"""`vidsparse eval` shared by several processes: job sharding, argument forwarding, and a 2-process CPU sweep.

The 2-process sweep runs through ``vidsparse eval --num-processes 2``, which starts ``accelerate launch`` (gloo on
CPU); its merged report must hold the same runs, each once, with the metrics of the same sweep in one process.
"""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from vidsparse.cli import build_parser, main
from vidsparse.eval.distributed import forwarded_arguments, launch_command, shard_jobs
from vidsparse.eval.harness import Geometry, plan_jobs
from vidsparse.eval.specs import expand_methods

SWEEP = [
    "--model", "tiny-wan", "--frames", "5", "--height", "128", "--width", "128", "--steps", "2",
    "--lpips", "none", "--quiet", "--device", "cpu", "--methods", "window:window=0",
]  # fmt: skip


def _jobs(prompts=3, seeds=2, methods=("window:window=0", "dense")):
    return plan_jobs(
        model="tiny-wan",
        prompts=[f"prompt {i}" for i in range(prompts)],
        seeds=list(range(seeds)),
        methods=expand_methods(list(methods)),
        geometry=Geometry(frames=5, height=128, width=128, steps=2, guidance_scale=5.0),
        dtype="float32",
        device_type="cpu",
    )


@pytest.mark.parametrize("count", [1, 2, 3, 4, 7])
def test_shards_cover_every_job_once_and_keep_reference_groups(count):
    jobs = _jobs()  # 6 reference groups of 3 jobs
    shards = [shard_jobs(jobs, i, count) for i in range(count)]
    ids = [job.run_id for shard in shards for job in shard]
    assert sorted(ids) == sorted(job.run_id for job in jobs)  # every job exactly once
    for shard in shards:
        assert shard == [job for job in jobs if job in shard]  # plan order kept
        for job in shard:
            assert job.reference() in shard  # a sparse job's reference runs in the same process
    sizes = sorted(len(shard) for shard in shards)
    assert sizes[-1] - sizes[0] <= 3  # balanced up to one group
    assert shards == [shard_jobs(jobs, i, count) for i in range(count)]  # the same deal every time


def test_uneven_groups_are_balanced_by_job_count():
    big = _jobs(prompts=1, seeds=1, methods=("window:window=0", "window:window=1", "dense"))  # one group of 4
    small = [dataclasses.replace(job, prompt="other") for job in _jobs(prompts=2, seeds=1, methods=())]  # 2 of 1
    shards = [shard_jobs(big + small, i, 2) for i in range(2)]
    assert [len(s) for s in shards] == [4, 2]


def test_shard_arguments_are_checked():
    with pytest.raises(ValueError, match="index=2"):
        shard_jobs(_jobs(), 2, 2)
    with pytest.raises(ValueError, match="count=0"):
        shard_jobs(_jobs(), 0, 0)


def _eval_parser():
    parser = build_parser()
    args = parser.parse_args(["eval", "--out", "x"])
    return args.sweep_parser


def test_forwarded_arguments_reproduce_the_command():
    parser = _eval_parser()
    argv = ["--out", "r", "--methods", "window:window=0", "band", "--densities", "0.25", "0.5", "--seeds", "0", "3"]
    argv += ["--resume", "--num-processes", "2", "--guidance-scale", "1.0", "--device", "cpu"]
    args = parser.parse_args(argv)
    forwarded = forwarded_arguments(parser, args, drop=("num_processes",))
    assert "--num-processes" not in forwarded
    again = parser.parse_args(forwarded)
    assert vars(again) | {"num_processes": 2} == vars(args)
    command = launch_command(2, forwarded)
    assert command[command.index("--num_processes") + 1] == "2" and "--multi_gpu" in command
    assert command[command.index("-m", 3) :][:3] == ["-m", "vidsparse", "eval"]


def test_num_processes_must_match_the_launcher(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["eval", "--out", str(tmp_path / "r"), *SWEEP, "--num-processes", "3"]) == 2
    assert "--num-processes 3 disagrees with the 2 processes" in capsys.readouterr().err
    monkeypatch.delenv("WORLD_SIZE")
    assert main(["eval", "--out", str(tmp_path / "r"), *SWEEP, "--num-processes", "0"]) == 2
    assert "--num-processes 0 is invalid" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist-eval")
    single, double = root / "single", root / "double"
    assert main(["eval", "--out", str(double), *SWEEP, "--num-processes", "2"]) == 0
    assert main(["eval", "--out", str(single), *SWEEP]) == 0
    return [json.loads((out / "report.json").read_text()) | {"out": out} for out in (single, double)]


def test_merged_report_lists_every_run_once(sweeps):
    single, double = sweeps
    ids = [r["run_id"] for r in double["runs"]]
    assert len(ids) == len(set(ids)) == 4  # 2 prompts x (reference + window)
    assert [r["run_id"] for r in double["rows"]] == ids
    assert set(ids) == {r["run_id"] for r in single["runs"]}
    assert all(r["status"] == "ok" for r in double["runs"])
    # Both processes worked, each on whole reference groups; the report itself was built once, by process 0.
    by_group = {}
    for r in double["runs"]:
        by_group.setdefault(r["ref_id"], set()).add(r["process"]["index"])
        assert r["process"]["count"] == 2 and "--num-processes 2" in r["command"]
    assert sorted(by_group.values(), key=sorted) == [{0}, {1}]
    assert all(r["process"] == {"index": 0, "count": 1} for r in single["runs"])


def test_merged_report_matches_one_process(sweeps):
    single, double = sweeps
    one = {r["run_id"]: r for r in single["runs"]}
    for run in double["runs"]:
        ref = one[run["run_id"]]
        assert run["job"] == ref["job"] and run["config"] == ref["config"]
        for rel in run["artifacts"].values():
            assert (Path(double["out"]) / rel).is_file()
        if run["kind"] == "dense":
            frames = [np.load(Path(s["out"]) / run["artifacts"]["frames"]) for s in (single, double)]
            # Frames are measured at uint8 levels: other thread counts round floats differently, which may move a
            # rare value across a level boundary (one level = 1/255), never further.
            diff = np.abs(frames[0] - frames[1])
            assert diff.max() <= 1 / 255 + 1e-6 and (diff > 1e-6).mean() < 1e-3
            continue
        # Same measured density and quality (the processes run with other thread counts: float rounding only).
        assert run["sparsity"]["sparse_density"] == ref["sparsity"]["sparse_density"] == 0.5
        assert run["sparsity"]["sparse_calls"] == ref["sparsity"]["sparse_calls"]
        for metric in ("psnr", "ssim"):
            assert float(run["metrics"][metric]) == pytest.approx(float(ref["metrics"][metric]), rel=1e-4)
    summaries = [{e["method"]: e for e in s["summary"]} for s in sweeps]
    for method, entry in summaries[0].items():
        other = summaries[1][method]
        assert (entry["runs"], entry["ok"]) == (other["runs"], other["ok"])
        if entry["kind"] == "sparse":
            for key in ("density", "psnr", "ssim"):
                assert entry[key] == pytest.approx(other[key], rel=1e-4)
