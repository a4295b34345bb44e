"""`vidsparse eval`, `vidsparse eval report` and `vidsparse eval attention` on the command line."""

import json

import eval_fakes
import pytest

from vidsparse.cli import main
from vidsparse.methods import method_names

SMALL = ["--frames", "5", "--height", "128", "--width", "128", "--steps", "2", "--lpips", "none", "--quiet"]


@pytest.fixture
def fakes(monkeypatch):
    eval_fakes.register(monkeypatch)


def test_non_empty_out_needs_resume_or_force(tmp_path, capsys):
    (tmp_path / "something.txt").write_text("keep me")
    assert main(["eval", "--out", str(tmp_path), *SMALL]) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "--force" in err
    assert main(["eval", "--out", str(tmp_path), "--resume", "--force", *SMALL]) == 2
    assert "contradict" in capsys.readouterr().err
    assert (tmp_path / "something.txt").read_text() == "keep me"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--densities", "1.5"], "--densities"),
        (["--methods", "nosuch"], "nosuch"),
        (["--methods", "window:wndow=1"], "wndow"),
        (["--prompts", "/nonexistent/prompts.txt"], "--prompts"),
        (["--repeats", "0"], "--repeats"),
    ],
)
def test_bad_arguments_fail_before_loading_a_model(tmp_path, capsys, args, message):
    assert main(["eval", "--out", str(tmp_path / "r"), *SMALL, *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r" / "runs").exists()


def test_eval_resume_report_and_strict(tmp_path, capsys, monkeypatch):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# one prompt\n\na green triangle spins\n")
    out = tmp_path / "r"
    base = ["eval", "--out", str(out), "--prompts", str(prompts), *SMALL]
    assert main([*base, "--methods", "window:window=0"]) == 0
    stdout = capsys.readouterr().out
    assert "window:window=0" in stdout and "2 run, 0 already done, 0 failed" in stdout
    report = json.loads((out / "report.json").read_text())
    assert [r["job"]["prompt"] for r in report["runs"]] == ["a green triangle spins"] * 2
    sparse = next(r for r in report["runs"] if r["kind"] == "sparse")
    assert sparse["metrics"]["lpips"] is None and "disabled" in sparse["metrics"]["lpips_unavailable"]["reason"]
    assert "--methods window:window=0" in sparse["command"] and "--steps 2" in sparse["command"]
    for name in ("index.html", "report.md", "plots/pareto.png"):
        assert (out / name).is_file()

    # Same command again with --resume: nothing to do (and no model load needed).
    assert main([*base, "--methods", "window:window=0", "--resume"]) == 0
    assert "0 run, 2 already done" in capsys.readouterr().out

    # Extending the sweep reuses the cached dense reference; a failing method fails the exit status only with
    # --strict, and the report keeps every run.
    eval_fakes.register(monkeypatch)
    assert main([*base, "--methods", "boom", "--resume", "--strict"]) == 1
    stdout = capsys.readouterr().out
    assert "1 run, 1 already done, 1 failed" in stdout
    report = json.loads((out / "report.json").read_text())
    assert sorted(r["status"] for r in report["runs"]) == ["failed", "ok", "ok"]

    assert main(["eval", "report", "--out", str(out)]) == 0
    assert "3 runs" in capsys.readouterr().out


def test_rendered_clips_compare_like_eval_recorded(tmp_path, capsys):
    """`vidsparse compare` of two rendered `.npy` clips gives the PSNR/SSIM/LPIPS that `vidsparse eval` recorded."""
    prompt = "a green triangle spins"
    (tmp_path / "prompts.txt").write_text(prompt + "\n")
    geometry = ["--frames", "5", "--height", "128", "--width", "128", "--steps", "2", "--seed", "4"]
    out = tmp_path / "r"
    assert main(["eval", "--out", str(out), "--prompts", str(tmp_path / "prompts.txt"), "--methods", "window:window=0",
                 "--repeats", "1", "--quiet", *geometry]) == 0  # fmt: skip
    sparse = next(r for r in json.loads((out / "report.json").read_text())["runs"] if r["kind"] == "sparse")
    recorded = sparse["metrics"]
    assert recorded["lpips"] is not None and sparse["sparsity"]["sparse_calls"] > 0
    render = ["render", "--prompt", prompt, *geometry]
    assert main([*render, "--method", "none", "--out", str(tmp_path / "dense.npy")]) == 0
    assert main([*render, "--method", "window:window=0", "--out", str(tmp_path / "sparse.npy")]) == 0
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "dense.npy"), str(tmp_path / "sparse.npy"), "--json"]) == 0
    measured = json.loads(capsys.readouterr().out)
    for metric in ("psnr", "ssim", "lpips"):
        assert measured[metric] == pytest.approx(recorded[metric], rel=1e-5, abs=1e-6), metric


def test_eval_report_needs_an_eval_directory(tmp_path, capsys):
    assert main(["eval", "report", "--out", str(tmp_path)]) == 2
    assert "not a vidsparse eval directory" in capsys.readouterr().err


def test_attention_suite_every_method_by_default(tmp_path, capsys):
    path = tmp_path / "a.json"
    assert (
        main(
            ["eval", "attention", "--geometry", "3x8x16", "--heads", "2", "--backend", "reference", "--json", str(path)]
        )
        == 0
    )
    data = json.loads(path.read_text())
    assert {r["method"] for r in data["rows"]} == {*method_names(), "oracle"}
    for row in data["rows"]:
        assert 0 < row["density"] <= 1 and row["rel_l2"] >= 0 and -1 <= row["cosine"] <= 1
    assert "| 3x8x16 | dense | – | 1.000 |" in capsys.readouterr().out


def test_attention_suite_densities(tmp_path, fakes):
    path = tmp_path / "a.json"
    args = ["eval", "attention", "--methods", "band", "window:window=0", "--densities", "0.25", "1.0"]
    assert main([*args, "--geometry", "4x8x16", "--heads", "2", "--backend", "reference", "--json", str(path)]) == 0
    rows = {r["spec"]: r for r in json.loads(path.read_text())["rows"] if r["method"] != "oracle"}
    assert set(rows) == {"band:density=0.25", "band:density=1.0", "window:window=0"}
    assert rows["band:density=0.25"]["density"] == pytest.approx(0.25)
    assert rows["band:density=1.0"]["density"] == 1.0 and rows["band:density=1.0"]["rel_l2"] < 1e-5
    assert rows["band:density=0.25"]["rel_l2"] > rows["band:density=1.0"]["rel_l2"]
    assert "no density target" in rows["window:window=0"]["note"]
