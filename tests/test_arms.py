"""``vidsparse eval arms``: training arms side by side, and the clip checks it reports."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vidsparse.eval.arms import Arm, check_arms, compare_arms, parse_arm
from vidsparse.eval.prompt_following import FOLLOWING, prompt_following, temporal_consistency
from vidsparse.pipelines.offline import procedural


def moving_clip(direction: str, frames: int = 9) -> np.ndarray:
    """A procedural red circle moving ``direction`` over plain gray (the check's own prompt, drawn exactly)."""
    shape = procedural.ShapeSpec("circle", "red", f"moves {direction}", x=0.5, y=0.5, size=0.12, angle=0.0, speed=0.03)
    spec = procedural.ClipSpec((shape,), procedural.BackgroundSpec("plain", "gray"))
    return procedural.render(spec, frames, 64, 64)


@pytest.mark.parametrize("direction", ["left", "right", "up", "down"])
def test_prompt_following_reads_the_drawn_motion(direction):
    clip = moving_clip(direction)
    assert prompt_following(clip, "red", direction)["follows"]
    opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}[direction]
    reverse = prompt_following(clip, "red", opposite)
    assert reverse["visible"] and not reverse["follows"] and reverse["travel"] < 0
    assert not prompt_following(clip, "yellow", direction)["visible"]  # no yellow in the clip


def test_temporal_consistency_sees_a_teleport_and_a_flicker():
    clip = moving_clip("right")
    smooth = temporal_consistency(clip, "red")
    assert smooth["visible_frames"] == 1.0 and smooth["max_jump_px"] < 5
    teleport = clip.copy()
    teleport[5:] = teleport[5:, :, ::-1]  # the shape jumps to its mirrored place from frame 5 on
    assert temporal_consistency(teleport, "red")["max_jump_px"] > 10
    flicker = clip.copy()
    flicker[3] = flicker[3, :1, :1]  # frame 3: background only
    assert temporal_consistency(flicker, "red")["visible_frames"] == pytest.approx(8 / 9, abs=1e-4)


def test_parse_arm_and_bad_arms(tmp_path):
    assert parse_arm("base=") == Arm("base")
    arm = parse_arm("radial=runs/r@radial:density=0.25")
    assert arm.lora == "runs/r" and arm.method.method == "radial" and arm.method.density == 0.25
    assert parse_arm("dense=runs/d@none") == Arm("dense", "runs/d")
    for bad, message in (("base", "NAME="), ("=x", "NAME="), ("a=@radial:nosuch=1", "nosuch")):
        with pytest.raises(ValueError, match=message):
            parse_arm(bad)
    with pytest.raises(ValueError, match="at least two"):
        check_arms([Arm("a")], "a")
    with pytest.raises(ValueError, match="repeated: a"):
        check_arms([Arm("a"), Arm("a")], "a")
    with pytest.raises(ValueError, match="--reference 'c' is not an arm"):
        check_arms([Arm("a"), Arm("b")], "c")
    with pytest.raises(FileNotFoundError, match="pytorch_lora_weights"):
        check_arms([Arm("a"), Arm("b", str(tmp_path))], "a")


def test_compare_arms_on_the_shipped_model(tmp_path):
    """Two arms, the same stock model twice under two names, and a sparse one: identical clips where they must be."""
    arms = [Arm("base"), Arm("again"), parse_arm("window=@window:window=0,dense_steps=0,dense_layers=0")]
    result, clips = compare_arms(arms, reference="base", frames=5, steps=2, prompts=2, lpips_net=None, progress=False)
    assert list(result["arms"]) == ["base", "again", "window"]
    assert result["settings"]["prompts"] == [FOLLOWING[0][2], FOLLOWING[1][2]]
    base, again, window = (result["arms"][n] for n in ("base", "again", "window"))
    assert all(np.array_equal(a, b) for a, b in zip(clips["base"], clips["again"]))  # same seeds, same clips
    assert again["psnr"] is None  # identical clips: infinite PSNR, left out of the mean
    assert all(r["psnr"] == float("inf") for r in again["results"])
    assert np.isfinite(window["psnr"]) and window["ssim"] < 1.0  # the sparse arm differs
    assert "psnr" not in base and base["render_time_vs_reference"] == 1.0
    assert base["clips"] == 2 and 0 <= base["follows"] <= 2 and base["training"] is None


def test_cli_writes_json_and_picture(tmp_path, capsys):
    from vidsparse.cli import main

    out = tmp_path / "arms"
    code = main(
        [
            "eval",
            "arms",
            "--arm",
            "base=",
            "--arm",
            "window=@window:window=0,dense_steps=0",
            "--reference",
            "base",
            "--frames",
            "5",
            "--steps",
            "2",
            "--prompts",
            "1",
            "--lpips",
            "none",
            "--quiet",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    data = json.loads((out / "arms.json").read_text())
    assert set(data["arms"]) == {"base", "window"} and data["command"].startswith("vidsparse eval arms --arm base=")
    assert (out / "arms.png").stat().st_size > 0
    assert "window: follows" in capsys.readouterr().out


def test_cli_refuses_bad_arms_before_loading(tmp_path, capsys):
    from vidsparse.cli import main

    code = main(["eval", "arms", "--arm", "base=", "--reference", "base", "--out", str(tmp_path / "x")])
    assert code != 0
    assert "at least two arms" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
