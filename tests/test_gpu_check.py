"""kernels/gpu_check.sh proven on CPU in an environment shaped like the GPU machine: no diffusers importable.

The stub trick: a folder first on PYTHONPATH whose ``diffusers/__init__.py`` raises ImportError hides the installed
diffusers from every subprocess, as on the bare GPU machine.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vidsparse.kernels import bench_gpu

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_diffusers_env(tmp_path):
    stub = tmp_path / "stub" / "diffusers"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ImportError('diffusers is hidden (like on the GPU machine)')\n")
    env = dict(os.environ, PYTHONPATH=str(stub.parent), TRITON_INTERPRET="1")
    return env


def test_kernels_and_plan_import_without_diffusers(no_diffusers_env):
    modules = sorted(f"vidsparse.kernels.{p.stem}" for p in (ROOT / "kernels").glob("*.py"))
    code = (
        "import importlib, sys\n"
        f"for name in {modules + ['vidsparse.plan', 'vidsparse.methods']!r}:\n"
        "    importlib.import_module(name)\n"
        "assert 'diffusers' not in sys.modules, 'diffusers imported'\n"
        "import vidsparse\n"
        "try:\n"
        "    vidsparse.apply\n"
        "except ImportError as exc:\n"
        "    print('lazy:', exc)\n"
        "else:\n"
        "    raise SystemExit('vidsparse.apply resolved without diffusers')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=no_diffusers_env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "lazy: diffusers is hidden" in done.stdout


def test_gpu_check_smoke_without_diffusers(no_diffusers_env, tmp_path):
    if shutil.which("bash") is None:
        pytest.skip("bash is not available")
    out = tmp_path / "out"
    env = dict(no_diffusers_env, OUT=str(out), PYTHON=sys.executable)
    done = subprocess.run(
        ["bash", "kernels/gpu_check.sh", "--smoke"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, (done.stdout[-4000:], done.stderr[-2000:])
    env_txt = (out / "gpu_env.txt").read_text()
    for line in ("python ", "torch ", "triton ", "gpu: no CUDA device", "diffusers: not installed", "auto ->"):
        assert line in env_txt, (line, env_txt)
    collected = (out / "gpu_pytest.log").read_text().strip().splitlines()[-1]
    assert "tests collected" in collected and "error" not in collected, collected
    report = json.loads((out / "bench_gpu.json").read_text())
    assert report["meta"]["smoke"] is True and report["meta"]["complete"] is True
    assert report["meta"]["dtype"] == "bf16"
    assert [c["case"] for c in report["cases"]] == bench_gpu.expected_cases(smoke=True)
    assert bench_gpu.failures(report) == []
    assert "e2e rc=skipped" in done.stdout
