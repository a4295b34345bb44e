"""A fresh install works from every folder, the repository root included.

Python puts the current folder first on ``sys.path`` for ``python -m``, ``python -c`` and notebooks, so a
top-level package in the repository whose name an installed distribution also provides (the model hub's
``kernels``, which transformers imports) would shadow it in every process started at the root.
"""

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _importable_top_level_names(root: Path) -> set[str]:
    """Names ``import NAME`` resolves to a regular module or package of ``root`` when ``root`` is on sys.path."""
    names = set()
    for entry in root.iterdir():
        if entry.name.startswith("."):
            continue
        if entry.is_file() and entry.suffix == ".py":
            names.add(entry.stem)
        elif entry.is_dir() and (entry / "__init__.py").exists():
            names.add(entry.name)
    return names


def test_no_top_level_module_of_the_repository_shadows_an_installed_distribution():
    provided = importlib.metadata.packages_distributions()
    ours = {name for name, dists in provided.items() if dists == ["vidsparse"] or set(dists) == {"vidsparse"}}
    clashes = {name: provided[name] for name in _importable_top_level_names(ROOT) - ours if name in provided}
    assert not clashes, f"top-level names of the repository shadow installed distributions: {clashes}"


def test_the_checks_own_scan_sees_regular_packages(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "portion").mkdir()  # no __init__.py: a namespace portion, loses to installed packages
    (tmp_path / "mod.py").write_text("")
    assert _importable_top_level_names(tmp_path) == {"pkg", "mod"}


def _run_at_root(*command: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_folders_named_like_distributions_resolve_to_the_installed_ones_from_the_root():
    """Started at the root, every top-level folder whose name a distribution provides imports that distribution."""
    provided = importlib.metadata.packages_distributions()
    names = sorted(e.name for e in ROOT.iterdir() if e.is_dir() and e.name in provided and e.name != "vidsparse")
    if not names:
        pytest.skip("no top-level folder here shares its name with an installed distribution")
    code = "import importlib.util, sys\nfor n in sys.argv[1:]:\n    print(importlib.util.find_spec(n).origin)"
    result = _run_at_root(sys.executable, "-c", code, *names)
    assert result.returncode == 0, result.stderr
    for name, origin in zip(names, result.stdout.split(), strict=True):
        assert not Path(origin).resolve().is_relative_to(ROOT), f"{name} resolves to the repository's {origin}"


def test_python_c_at_the_root_imports_vidsparse_and_transformers():
    result = _run_at_root(sys.executable, "-c", "import vidsparse, transformers.modeling_utils, diffusers.loaders")
    assert result.returncode == 0, result.stderr


def test_python_m_vidsparse_renders_a_clip_from_the_root(tmp_path):
    out = tmp_path / "x.mp4"
    command = ["--steps", "1", "--frames", "5", "--height", "64", "--width", "64", "--out", str(out)]
    result = _run_at_root(sys.executable, "-m", "vidsparse", "render", *command)
    assert result.returncode == 0, result.stderr
    assert out.stat().st_size > 0


def test_console_script_and_accelerate_launch_start_from_the_root(tmp_path):
    script = Path(sys.executable).with_name("vidsparse")
    result = _run_at_root(str(script) if script.exists() else "vidsparse", "--version")
    assert result.returncode == 0 and result.stdout.startswith("vidsparse "), result.stderr
    accelerate = Path(sys.executable).with_name("accelerate")
    launch = [str(accelerate), "launch", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no"]
    launch += ["--dynamo_backend", "no", "-m", "vidsparse", "env", "--json"]
    result = _run_at_root(*launch)
    assert result.returncode == 0, result.stderr
    assert '"diffusers"' in result.stdout


def test_env_prints_the_versions_a_bug_report_needs():
    result = _run_at_root(sys.executable, "-m", "vidsparse", "env")
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(":", 1) for line in result.stdout.splitlines())
    for name in ("python", "torch", "diffusers", "transformers", "triton", "vidsparse"):
        assert name in lines
    assert lines["diffusers"].strip() == importlib.metadata.version("diffusers")


def test_the_package_imports_without_loading_diffusers():
    """The executors and planners need only torch (a bare GPU machine has no diffusers)."""
    code = (
        "import sys, vidsparse, vidsparse.kernels.dispatch, vidsparse.plan\n"
        "assert 'diffusers' not in sys.modules, 'diffusers imported'\n"
        "vidsparse.apply\n"
        "assert 'diffusers' in sys.modules\n"
    )
    result = _run_at_root(sys.executable, "-c", code)
    assert result.returncode == 0, result.stderr
