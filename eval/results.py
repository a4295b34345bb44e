"""Result files of an eval directory: atomic writes, the run-file schema, validation and the environment record.

An eval directory (``vidsparse eval --out DIR``) holds:

- ``runs/<run_id>.json``: one file per run, written atomically (temp file + ``os.replace``) when the run ends, so a
  file is either complete or absent. The report is rebuilt from whatever run files exist, which is what makes
  ``--resume`` and sweeps split across processes work: no state lives anywhere else;
- ``refs/<ref_id>/frames.npy`` + ``dense.mp4``: the dense reference of one (model, prompt, seed, geometry, steps),
  decoded frames (uint8 levels), reused by every sparse run and by resumed sweeps;
- ``clips/<run_id>.mp4|.gif``: side-by-side dense | sparse | difference clips;
- ``report.json``, ``report.md``, ``index.html``, ``plots/*.png``: the report (see :mod:`vidsparse.eval.report`).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vidsparse.video_io import default_file_mode

from .metrics import json_ready

#: Identifies run files and their layout; bump the version when the layout changes incompatibly.
RUN_SCHEMA = "vidsparse.eval.run"
RUN_SCHEMA_VERSION = 1
#: Run statuses: ``ok`` (complete, with metrics for sparse runs) or ``failed`` (with the error).
STATUSES = ("ok", "failed")

RUNS_DIR = "runs"
REFS_DIR = "refs"
CLIPS_DIR = "clips"


def as_float(value: Any) -> float | None:
    """A metric read back from JSON: numbers and ``"inf"``/``"nan"`` strings -> float; None stays None."""
    if value is None:
        return None
    return float(value)


def _atomic(path: Path, write) -> Path:
    """Write through ``write(file)`` into a temp file next to ``path``, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}-")
    try:
        os.chmod(tmp, default_file_mode())  # mkstemp makes 0600 files; results are ordinary files
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented strict JSON to ``path``: the file appears complete or not at all."""
    data = json.dumps(json_ready(obj), indent=2, allow_nan=False).encode() + b"\n"
    return _atomic(Path(path), lambda fh: fh.write(data))


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return _atomic(Path(path), lambda fh: fh.write(text.encode()))


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return _atomic(Path(path), lambda fh: fh.write(data))


def write_npy_atomic(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Save ``array`` as ``.npy`` at ``path`` atomically (no pickles)."""
    return _atomic(Path(path), lambda fh: np.save(fh, array, allow_pickle=False))


def run_path(out_dir: str | os.PathLike, run_id: str) -> Path:
    """Where the result of ``run_id`` lives."""
    return Path(out_dir) / RUNS_DIR / f"{run_id}.json"


def _problem(record: Any, run_id: str, out_dir: Path) -> str | None:
    """Why ``record`` is not a complete run file for ``run_id`` (None when it is)."""
    if not isinstance(record, dict):
        return "not a JSON object"
    if record.get("schema") != RUN_SCHEMA or record.get("schema_version") != RUN_SCHEMA_VERSION:
        return f"schema {record.get('schema')!r} v{record.get('schema_version')!r}, expected {RUN_SCHEMA} v1"
    if record.get("run_id") != run_id:
        return f"run_id {record.get('run_id')!r} does not match the file name"
    status = record.get("status")
    if status not in STATUSES:
        return f"status {status!r}"
    if status == "failed":
        return None if isinstance(record.get("error"), dict) else "failed without an error record"
    for key in ("job", "timing", "env"):
        if not isinstance(record.get(key), dict):
            return f"missing {key!r}"
    if record.get("kind") == "sparse" and not isinstance(record.get("metrics"), dict):
        return "sparse run without metrics"
    for rel in (record.get("artifacts") or {}).values():
        if rel and not (out_dir / rel).is_file():
            return f"artifact {rel} is missing"
    return None


def load_run(out_dir: str | os.PathLike, run_id: str) -> tuple[dict[str, Any] | None, str | None]:
    """Read and validate ``runs/<run_id>.json``.

    Returns:
        ``(record, None)`` for a complete run file; ``(None, reason)`` when it is absent, unreadable, of another
        schema, or refers to artifacts that are gone (such runs are redone by ``--resume``).
    """
    out_dir = Path(out_dir)
    path = run_path(out_dir, run_id)
    if not path.is_file():
        return None, "absent"
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        return None, f"unreadable: {err}"
    problem = _problem(record, run_id, out_dir)
    return (None, problem) if problem else (record, None)


def load_runs(out_dir: str | os.PathLike) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """Every complete run file of ``out_dir`` (sorted by start time), and ``(file, reason)`` for the others."""
    records, skipped = [], []
    for path in sorted((Path(out_dir) / RUNS_DIR).glob("*.json")):
        record, reason = load_run(out_dir, path.stem)
        if record is None:
            skipped.append((str(path), reason or "invalid"))
        else:
            records.append(record)
    records.sort(key=lambda r: (r.get("started_at") or "", r["run_id"]))
    return records, skipped


def _git_commit() -> str | None:
    """The vidsparse source checkout's commit, when it is one (editable installs); None otherwise."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict[str, Any]:
    """Versions and device of this process, recorded in every run file and report."""
    import diffusers
    import transformers

    import vidsparse

    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        device_name = torch.cuda.get_device_name(index)
    else:
        device_name = _cpu_name()
    return {
        "vidsparse": vidsparse.__version__,
        "git_commit": _git_commit(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "platform": platform.platform(),
        "device": str(device),
        "device_name": device_name,
        "cpu_threads": torch.get_num_threads(),
    }
