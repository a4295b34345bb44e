"""Bad command-line input is refused up front, in one line (issue 23 items 4, 5, 7, 8)."""

import os
from pathlib import Path

import pytest

from vidsparse.cli import main


def _no_load(*args, **kwargs):
    raise AssertionError("the model was loaded although the arguments were invalid")


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if a command loads a model (every check here must come first)."""
    import vidsparse.commands.calibrate as calibrate
    import vidsparse.commands.eval as eval_cmd
    import vidsparse.commands.finetune as finetune
    import vidsparse.commands.render as render

    for module in (render, eval_cmd, finetune, calibrate):
        monkeypatch.setattr(module, "load_pipeline", _no_load)


def _exit_code_and_err(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse refuses a flag's value itself
        code = exit_.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


@pytest.mark.parametrize("flag", ["--frames", "--steps", "--height", "--width"])
@pytest.mark.parametrize("value", ["0", "-3"])
@pytest.mark.parametrize(
    "command",
    [
        ["render"],
        ["eval", "--out", "OUT"],
        ["eval", "arms", "--arm", "a=", "--reference", "a", "--out", "OUT"],
        ["finetune", "OUT"],
        ["calibrate", "--out", "OUT/p.safetensors"],
    ],
)
def test_non_positive_counts_are_refused_naming_the_flag(command, flag, value, tmp_path, capsys, no_model_load):
    argv = [part.replace("OUT", str(tmp_path / "out")) for part in command] + [flag, value]
    code, err = _exit_code_and_err(argv, capsys)
    assert code == 2
    assert f"argument {flag}: {value} is invalid: expected an integer >= 1" in err
    assert not (tmp_path / "out").exists()


def test_bench_e2e_refuses_zero_steps(capsys):
    code, err = _exit_code_and_err(["bench", "e2e", "--steps", "0"], capsys)
    assert code == 2 and "--steps 0 is invalid" in err


def test_width_above_the_limit_is_one_line(capsys, no_model_load):
    code, err = _exit_code_and_err(["render", "--width", "1000000"], capsys)
    assert code == 2
    assert "argument --width: 1000000 is too large: at most 8192 pixels" in err


def _unwritable_folder(tmp_path: Path) -> Path:
    """A folder this process cannot write: permission bits for a normal user; root ignores them, so sysfs there."""
    if os.geteuid() == 0:
        return Path("/sys")
    folder = tmp_path / "readonly"
    folder.mkdir()
    folder.chmod(0o500)
    return folder


@pytest.mark.parametrize(
    "out, message",
    [
        ("clip.txt", "unknown video suffix '.txt'"),
        ("afile/clip.mp4", "is a file, not a folder"),
        ("afolder", "is a folder; give a file name"),
        ("UNWRITABLE/clip.mp4", "is not writable"),
    ],
)
def test_render_out_is_checked_before_loading(out, message, tmp_path, capsys, no_model_load):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "afolder").mkdir()
    path = out.replace("UNWRITABLE", str(_unwritable_folder(tmp_path)))
    path = path if os.path.isabs(path) else str(tmp_path / path)
    code, err = _exit_code_and_err(["render", "--out", path], capsys)
    assert code == 2
    assert err.startswith("vidsparse render: error: --out ") and message in err
    assert len(err.strip().splitlines()) == 1


def test_render_odd_size_for_mp4_is_refused_before_loading(tmp_path, capsys, no_model_load):
    code, err = _exit_code_and_err(["render", "--out", str(tmp_path / "c.mp4"), "--height", "63"], capsys)
    assert code == 2 and "--height 63: .mp4 files need an even frame size" in err


def test_render_makes_a_missing_out_folder_before_loading(tmp_path, capsys, monkeypatch):
    import vidsparse.commands.render as render

    def load_marker(*args, **kwargs):
        raise ValueError("load reached")

    monkeypatch.setattr(render, "load_pipeline", load_marker)
    out = tmp_path / "new" / "sub" / "clip.mp4"
    code, err = _exit_code_and_err(["render", "--out", str(out), "--gif", str(tmp_path / "g" / "c.gif")], capsys)
    assert code == 2 and "load reached" in err  # every check passed, then the load was next
    assert out.parent.is_dir() and (tmp_path / "g").is_dir()
    assert list(out.parent.iterdir()) == []  # the writability probe leaves nothing behind


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--density", "0.3", "--opt", "density=0.5"],
            "option 'density' is given twice: --density 0.3 and --opt density=0.5",
        ),
        (
            ["--method", "radial:density=0.5", "--density", "0.3"],
            "option 'density' is given twice: 'density=0.5' in --method 'radial:density=0.5' and --density 0.3",
        ),
        (
            ["--method", "radial:dense_steps=1", "--dense-steps", "2"],
            "'dense_steps=1' in --method 'radial:dense_steps=1' and --dense-steps 2",
        ),
        (
            ["--method", "radial:density=0.3,density=0.5"],
            "option 'density' is given twice: 'density=0.3' in --method",
        ),
        (["--method", "window", "--density", "0.3"], "--density 0.3: method 'window' has no density target"),
        (["--method", "dense:density=0.5"], "'density=0.5' in --method 'dense:density=0.5': method 'dense' has no"),
        (["--method", "radial:"], "--method 'radial:': nothing follows ':'"),
        (["--method", "radial:a=1,,b=2"], "--method 'radial:a=1,,b=2' has an empty option"),
        (["--method", "radial:density=0.3,"], "has an empty option"),
        (["--method", "radial:density="], "'density=' in --method 'radial:density=' has no value"),
        (["--opt", "=3"], "--opt '=3' is invalid: expected key=value"),
    ],
)
def test_conflicting_or_empty_method_options_name_their_sources(argv, message, tmp_path, capsys, no_model_load):
    code, err = _exit_code_and_err(["render", "--out", str(tmp_path / "c.mp4"), *argv], capsys)
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "methods, message",
    [
        (["window:density=0.3"], "'density=0.3' in method spec 'window:density=0.3': method 'window' has no"),
        (["radial:"], "method spec 'radial:': nothing follows ':'"),
        (["radial:density=0.2,,dense_steps=1"], "has an empty option"),
        (["radial:density=0.2,density=0.3"], "option 'density' is given twice"),
    ],
)
@pytest.mark.parametrize("densities", [[], ["--densities", "0.3"]])
def test_eval_method_specs_are_checked_the_same_way(methods, message, densities, tmp_path, capsys, no_model_load):
    out = tmp_path / "e"
    code, err = _exit_code_and_err(["eval", "--out", str(out), "--methods", *methods, *densities], capsys)
    assert code == 2 and message in err
    assert not out.exists()


def test_valid_options_from_every_source_still_combine():
    from vidsparse.cli import build_parser
    from vidsparse.commands.common import method_config

    args = build_parser().parse_args(
        [
            "render",
            "--method",
            "radial:dense_steps=1",
            "--density",
            "0.3",
            "--block-size",
            "128",
            "--opt",
            "sink=false",
        ]
    )
    config = method_config(args)
    assert (config.method, config.density, config.dense_steps, config.block_size) == ("radial", 0.3, 1, 128)
    assert config.sink is False


def test_unknown_model_id_is_one_line(capsys, monkeypatch, tmp_path):
    import diffusers

    def not_found(*args, **kwargs):  # what diffusers raises offline / for no such repo, without touching a network
        raise OSError("Cannot load model nosuch-model: the model is not fully cached locally (details). More text.")

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", not_found)
    code, err = _exit_code_and_err(["render", "--model", "nosuch-model", "--out", str(tmp_path / "x.mp4")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--model 'nosuch-model' cannot be loaded: Cannot load model nosuch-model" in err and "tiny-shapes" in err


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p.with_suffix(".txt").write_text("hi") and p.with_suffix(".txt"), ".txt is not a video, image"),
        (
            lambda p: __import__("numpy").save(p, __import__("numpy").zeros((4, 8, 8), "uint8")) or p,
            r"shape \(4, 8, 8\)",
        ),
        (lambda p: __import__("numpy").save(p, __import__("numpy").zeros((0,), "uint8")) or p, r"shape \(0,\)"),
    ],
    ids=["text", "3-d npy", "empty npy"],
)
def test_compare_bad_files_name_the_problem(make, message, tmp_path, capsys):
    import re

    import numpy as np

    good = tmp_path / "good.npy"
    np.save(good, np.zeros((2, 8, 8, 3), np.uint8))
    bad = make(tmp_path / "bad.npy")
    code, err = _exit_code_and_err(["compare", str(bad), str(good)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and re.search(message, err), err


@pytest.mark.parametrize("command", [["eval"], ["eval", "arms", "--arm", "a=", "--arm", "b=", "--reference", "a"]])
def test_eval_out_under_a_file_is_refused_before_loading(command, tmp_path, capsys, no_model_load):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, err = _exit_code_and_err([*command, "--out", str(blocker / "sub")], capsys)
    assert code == 2 and "is a file, not a folder" in err, err


def test_apply_on_a_compiled_wrapper_says_what_to_do():
    import torch

    import vidsparse
    from vidsparse.pipelines.offline import tiny

    compiled = torch.compile(tiny.build("wan").transformer)  # compiles nothing until called
    with pytest.raises(TypeError, match=r"OptimizedModule\) of WanTransformer3DModel: apply vidsparse before"):
        vidsparse.apply(compiled, "radial")


def test_eval_ctrl_c_says_what_was_kept(capsys, monkeypatch, tmp_path):
    import vidsparse.commands.eval as eval_cmd

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(eval_cmd, "load_pipeline", interrupted)
    monkeypatch.setattr(eval_cmd, "run_jobs", interrupted, raising=False)
    code = main(["eval", "--out", str(tmp_path / "e"), "--model", "tiny-wan", "--steps", "2", "--lpips", "none"])
    err = capsys.readouterr().err
    assert code == 130 and "Traceback" not in err and "--resume" in err and "interrupted; the runs that finished" in err
