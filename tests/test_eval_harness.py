"""The eval harness on the tiny pipeline: runs, failures, interruption and resume, report files, HTML in Chromium.

One small sweep (5 frames 128x128 = 2 video blocks, 2 steps) is shared by the tests of this module.
"""

import json
import os
import re
import shutil
import subprocess

import eval_fakes
import numpy as np
import pytest
import torch

from vidsparse.eval.harness import Geometry, Runner, plan_jobs, run_sweep
from vidsparse.eval.lpips_weights import random_backbone_model
from vidsparse.eval.metrics import LpipsMetric
from vidsparse.eval.report import REFERENCE_LABEL, build_report
from vidsparse.eval.results import load_run, run_path
from vidsparse.eval.specs import expand_methods
from vidsparse.video_io import read_frames

GEOMETRY = Geometry(frames=5, height=128, width=128, steps=2, guidance_scale=5.0)
METHODS = ["window:window=0", "dense", "boom", "interrupt"]


def _runner(out_dir):
    metric = LpipsMetric(random_backbone_model("alex"), net="alex", source="random test backbone")
    return Runner(out_dir, device=torch.device("cpu"), repeats=1, command="pytest", progress=False, lpips_metric=metric)


def _jobs():
    return plan_jobs(
        model="tiny-wan",
        prompts=["a red circle moves left"],
        seeds=[0],
        methods=expand_methods(METHODS),
        geometry=GEOMETRY,
        dtype="float32",
        device_type="cpu",
    )


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Sweep 1 is interrupted at the ``interrupt`` run; sweep 2 resumes after a torn run file."""
    out = tmp_path_factory.mktemp("eval")
    with pytest.MonkeyPatch.context() as mp:
        eval_fakes.register(mp)
        jobs = _jobs()
        ids = {job.label: job.run_id for job in jobs}
        runner = _runner(out)
        eval_fakes.ARMED["interrupt"] = True
        with pytest.raises(KeyboardInterrupt):
            run_sweep(jobs, runner, progress=False)
        after_interrupt = {job.label: load_run(out, job.run_id)[0] for job in jobs}
        tmp_left = sorted(str(p) for p in out.rglob(".tmp-*"))
        first_report = build_report(out, command="pytest report 1")

        # A torn file (as if a copy had been cut short) is not a finished run: resume redoes it.
        window_file = run_path(out, ids["window:window=0"])
        window_file.write_text(window_file.read_text()[:200])
        dense_mtime = run_path(out, ids["dense"]).stat().st_mtime_ns
        ref_mtime = run_path(out, jobs[0].run_id).stat().st_mtime_ns
        resumed = run_sweep(jobs, _runner(out), resume=True, progress=False)
        report = build_report(out, command="pytest report 2")
        yield {
            "out": out,
            "ids": ids,
            "ref_id": jobs[0].run_id,
            "after_interrupt": after_interrupt,
            "tmp_left": tmp_left,
            "first_report": first_report,
            "resumed": resumed,
            "dense_unchanged": run_path(out, ids["dense"]).stat().st_mtime_ns == dense_mtime,
            "ref_unchanged": run_path(out, jobs[0].run_id).stat().st_mtime_ns == ref_mtime,
            "report": report,
        }


def test_interrupted_sweep_keeps_finished_runs(sweep):
    done = sweep["after_interrupt"]
    assert done["dense"] is not None and done["dense"]["status"] == "ok"
    assert done["window:window=0"]["status"] == "ok"
    assert done["boom"]["status"] == "failed"
    assert done["interrupt"] is None  # interrupted: no result file, nothing half-written
    assert sweep["tmp_left"] == []
    first = sweep["first_report"]
    assert {r["method"] for r in first["rows"]} == {REFERENCE_LABEL, "window:window=0", "dense", "boom"}


def test_failed_run_is_recorded_and_the_sweep_goes_on(sweep):
    record, _ = load_run(sweep["out"], sweep["ids"]["boom"])
    assert record["status"] == "failed"
    assert record["error"]["type"] == "RuntimeError" and "always fails" in record["error"]["message"]
    assert record["command"] == "pytest" and record["config"]["method"] == "boom"
    # Runs after the failing one still ran (the sweep continued).
    assert load_run(sweep["out"], sweep["ids"]["interrupt"])[0]["status"] == "ok"


def test_resume_redoes_only_unfinished_runs(sweep):
    ids, resumed = sweep["ids"], sweep["resumed"]
    assert sorted(resumed.executed) == sorted([ids["window:window=0"], ids["boom"], ids["interrupt"]])
    assert sorted(resumed.skipped) == sorted([sweep["ref_id"], ids["dense"]])
    assert resumed.failed == [ids["boom"]]
    assert sweep["dense_unchanged"] and sweep["ref_unchanged"]


def test_dense_reference_and_runs(sweep):
    out, ids = sweep["out"], sweep["ids"]
    ref, _ = load_run(out, sweep["ref_id"])
    frames = np.load(out / ref["artifacts"]["frames"])
    assert frames.shape == (5, 128, 128, 3) and frames.dtype == np.float32
    assert 0.0 <= frames.min() and frames.max() <= 1.0
    assert read_frames(out / ref["artifacts"]["clip"]).shape == (5, 128, 128, 3)
    for record in (ref, load_run(out, ids["dense"])[0]):
        timing = record["timing"]
        assert timing["repeats"] == 1 and len(timing["e2e_s"]) == 1 and timing["e2e_median_s"] > 0
        assert 0 < timing["attention_share"] < 1
        # 2 steps x (cond + uncond) transformer calls, each through 2 self-attention layers.
        assert timing["transformer_calls"] == 4 and timing["attention_calls"] == 8
        assert timing["repeat_max_abs_diff"] == 0.0
        assert record["env"]["torch"] == torch.__version__ and record["env"]["device"] == "cpu"


def test_sparse_quality_density_and_planning(sweep):
    out, ids = sweep["out"], sweep["ids"]
    dense_method, _ = load_run(out, ids["dense"])
    window, _ = load_run(out, ids["window:window=0"])
    # The full plan through the sparse path reproduces stock attention up to float rounding ...
    assert float(dense_method["metrics"]["psnr"]) > 60
    assert dense_method["sparsity"]["sparse_density"] == 1.0
    # ... while each frame attending only itself (2 blocks -> density 1/2) changes the video measurably.
    assert window["sparsity"]["sparse_density"] == pytest.approx(0.5)
    assert window["sparsity"]["sparse_calls"] == 8 and window["sparsity"]["plan_ms"] >= 0
    psnr = float(window["metrics"]["psnr"])
    assert 10 < psnr < float(dense_method["metrics"]["psnr"])
    assert len(window["metrics"]["frames"]) == 5 and window["metrics"]["lpips"] is not None
    clip = read_frames(out / window["artifacts"]["side_by_side_mp4"])
    assert clip.shape == (5, 128, 384, 3)
    gif = read_frames(out / window["artifacts"]["side_by_side_gif"])
    assert gif.shape == (5, 128, 384, 3)
    dense = np.load(out / f"refs/{sweep['ref_id']}/frames.npy")
    # The gif's left panel is the dense reference (up to the gif palette).
    assert np.abs(gif[:, :, :128].astype(float) / 255 - dense).mean() < 0.05


def test_report_files(sweep):
    out, report = sweep["out"], sweep["report"]
    for name in ("report.json", "report.md", "index.html", "plots/pareto.png"):
        assert (out / name).is_file(), name
    data = json.loads((out / "report.json").read_text())
    assert data["schema"] == "vidsparse.eval.report" and data["schema_version"] == 1
    assert len(data["runs"]) == 5 and data["command"] == "pytest report 2"
    assert all(r["env"]["vidsparse"] for r in data["runs"] if r["status"] == "ok")
    rows = {e["method"]: e for e in report["summary"]}
    assert rows["boom"]["failed"] == 1 and rows["window:window=0"]["ok"] == 1
    assert rows["window:window=0"]["speedup"] > 0 and rows[REFERENCE_LABEL]["attention_share"] > 0
    md = (out / "report.md").read_text()
    assert "window:window=0" in md and "boom" in md and "always fails" in md
    page = (out / "index.html").read_text()
    assert 'id="summary"' in page and 'id="pareto-plot"' in page and "data:image/png;base64," in page
    assert "http://" not in page and "https://" not in page and "<script" not in page


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--enable-logging=stderr",
    "--v=0",
]
PROBE = """<script>
window.addEventListener("load", () => {
  const broken = [...document.images].filter((img) => !img.complete || img.naturalWidth === 0).map((i) => i.src);
  broken.forEach((src) => console.error("broken image " + src));
  document.body.setAttribute("data-probe", JSON.stringify({
    images: document.images.length, broken: broken.length, tables: document.querySelectorAll("table").length,
    rows: document.querySelectorAll("#summary tbody tr").length,
    plot: document.getElementById("pareto-plot") ? document.getElementById("pareto-plot").naturalWidth : 0}));
});
</script>"""


def _chromium(args, tmp_path):
    cmd = [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/run installs it)")
def test_html_in_headless_chromium(sweep, tmp_path):
    from PIL import Image

    out = sweep["out"]
    # 1. The page itself: a screenshot, and no console message from the page.
    shot = tmp_path / "shot.png"
    proc = _chromium([f"--screenshot={shot}", "--window-size=1300,1800", (out / "index.html").as_uri()], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    assert console == []
    image = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert image.shape[:2] == (1800, 1300)
    non_white = (image.sum(axis=2) < 720).mean()
    assert non_white > 0.03, f"screenshot is nearly blank ({non_white:.3%} non-white pixels)"
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 50  # plot colours, clips, text

    # 2. The same page plus a probe script, next to it (same relative paths): every image loads, tables are there.
    page = (out / "index.html").read_text()
    probe = out / "probe.html"
    probe.write_text(page.replace("</body>", PROBE + "</body>"))
    try:
        proc = _chromium(["--virtual-time-budget=10000", "--dump-dom", probe.as_uri()], tmp_path)
    finally:
        os.unlink(probe)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [line for line in proc.stderr.splitlines() if ":CONSOLE" in line] == []
    match = re.search(r'data-probe="([^"]*)"', proc.stdout)
    assert match, "the probe did not run"
    found = json.loads(match.group(1).replace("&quot;", '"'))
    assert found["broken"] == 0 and found["images"] >= 3  # the plot + a gif per successful sparse run
    assert found["tables"] >= 2 and found["rows"] == 5 and found["plot"] > 500
