"""`vidsparse render`: the main job on the embedded default, a saved local model, and bad input."""

import subprocess
import sys
import time

import pytest

from vidsparse.cli import main
from vidsparse.video_io import read_frames


def test_render_default_subprocess_under_two_minutes(tmp_path):
    out = tmp_path / "clip.mp4"
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "vidsparse", "render", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "measured density" in proc.stdout and "wrote" in proc.stdout
    frames = read_frames(out)
    from vidsparse.pipelines.offline.tiny import default_model_name, defaults_for

    spec = defaults_for(f"tiny-{default_model_name()}")
    assert frames.shape == (spec.frames, spec.height, spec.width, 3)
    print(f"default render took {elapsed:.1f} s")


def test_render_requested_frames_and_gif(tmp_path, capsys):
    out, gif = tmp_path / "a.mp4", tmp_path / "a.gif"
    code = main(
        [
            "render",
            "--model",
            "tiny-wan",
            "--frames",
            "9",
            "--height",
            "64",
            "--width",
            "96",
            "--steps",
            "2",
            "--method",
            "window",
            "--opt",
            "window=0",
            "--out",
            str(out),
            "--gif",
            str(gif),
        ]
    )
    assert code == 0
    assert read_frames(out).shape == (9, 64, 96, 3)
    assert read_frames(gif).shape == (9, 64, 96, 3)
    assert "window" in capsys.readouterr().out


def test_render_local_saved_model(tmp_path):
    from vidsparse.pipelines.offline import tiny

    folder = tmp_path / "saved"
    tiny.build("wan").save_pretrained(folder)
    out = tmp_path / "b.mp4"
    code = main(
        [
            "render",
            "--model",
            str(folder),
            "--frames",
            "5",
            "--height",
            "64",
            "--width",
            "64",
            "--steps",
            "2",
            "--method",
            "dense",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    assert read_frames(out).shape == (5, 64, 64, 3)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--frames", "16"], "--frames 16 is invalid"),
        (["--density", "2"], "density=2.0"),
        (["--method", "nope"], "method='nope'"),
        (["--out", "x.txt", "--frames", "5", "--height", "64", "--width", "64", "--steps", "1"], "suffix"),
        (["--model", "/nonexistent/folder"], "nonexistent"),
    ],
)
def test_render_bad_input_is_one_clear_error(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = main(["render", *argv])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
