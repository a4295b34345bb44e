"""Nothing the user wrote is lost: ``--force`` deletes only what vidsparse listed, one eval per folder, no leftovers.

Issue 23 items 1, 3 and 9, each reproduced as it was reported.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from vidsparse.cli import main
from vidsparse.eval.out_dir import (
    LOCK,
    MANIFEST,
    OutDirInUse,
    OutDirLock,
    record,
    recorded,
    remove_leftover_temporaries,
    remove_recorded,
)
from vidsparse.eval.report import md_escape, render_markdown

SMALL = [
    "--model",
    "tiny-wan",
    "--frames",
    "5",
    "--height",
    "128",
    "--width",
    "128",
    "--steps",
    "2",
    "--lpips",
    "none",
    "--quiet",
]
METHOD = ["--methods", "window:window=0"]


def test_force_keeps_what_vidsparse_did_not_write(tmp_path, capsys):
    """The reported repro: a TensorBoard runs/tb/events, plots/fig.png and report.md of the user survive --force."""
    out = tmp_path / "d"
    (out / "runs" / "tb").mkdir(parents=True)
    (out / "plots").mkdir()
    (out / "runs" / "tb" / "events").write_text("x")
    (out / "plots" / "fig.png").write_text("y")
    (out / "report.md").write_text("z")
    # A folder vidsparse never wrote into (no manifest): --force deletes nothing and says why.
    assert main(["eval", "--out", str(out), "--force", *SMALL, *METHOD]) == 2
    assert MANIFEST in capsys.readouterr().err
    assert (out / "runs/tb/events").read_text() == "x" and (out / "report.md").read_text() == "z"

    # A real eval folder with the user's files added afterwards: --force removes vidsparse's files only.
    fresh = tmp_path / "e"
    assert main(["eval", "--out", str(fresh), *SMALL, *METHOD]) == 0
    written = recorded(fresh)
    assert "report.md" in written and "index.html" in written and any(p.startswith("runs/") for p in written)
    assert any(p.startswith("refs/") for p in written) and any(p.startswith("clips/") for p in written)
    (fresh / "runs" / "tb").mkdir()
    (fresh / "runs" / "tb" / "events").write_text("x")
    (fresh / "plots" / "fig.png").write_text("y")
    (fresh / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert main(["eval", "--out", str(fresh), "--force", *SMALL, *METHOD]) == 0
    stdout = capsys.readouterr().out
    assert f"removed {len(written)} file(s) an earlier vidsparse eval wrote" in stdout
    assert " run, 0 already done" in stdout  # the earlier results were gone: everything re-ran
    assert (fresh / "runs/tb/events").read_text() == "x"
    assert (fresh / "plots/fig.png").read_text() == "y" and (fresh / "notes.txt").read_text() == "mine"
    assert not (fresh / LOCK).exists()  # released at the end


def test_remove_recorded_never_leaves_the_folder(tmp_path):
    out = tmp_path / "out"
    (out / "runs").mkdir(parents=True)
    (out / "runs" / "a.json").write_text("{}")
    outside = tmp_path / "precious.txt"
    outside.write_text("keep")
    record(out, [out / "runs" / "a.json"])
    with open(out / MANIFEST, "a") as fh:  # a manifest edited to point outside: ignored
        fh.write("../precious.txt\n/etc/hostname\nruns/missing.json\n")
    assert remove_recorded(out) == ["runs/a.json"]
    assert outside.read_text() == "keep"
    assert not (out / "runs").exists() and not (out / MANIFEST).exists()  # emptied folder and manifest removed


def test_a_second_eval_into_the_same_folder_is_refused(tmp_path, capsys):
    out = tmp_path / "r"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        out.mkdir()
        (out / LOCK).write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(), "started": "now"}))
        assert main(["eval", "--out", str(out), "--resume", *SMALL, *METHOD]) == 2
        err = capsys.readouterr().err
        assert f"in use by another vidsparse eval (pid {holder.pid}" in err and str(out / LOCK) in err
        assert not (out / "runs").exists()  # refused before any work
        with pytest.raises(OutDirInUse):
            OutDirLock(out).acquire()
    finally:
        holder.kill()
        holder.wait()
    # The holder is gone: its lock is stale, taken over with a note.
    lock = OutDirLock(out).acquire()
    assert lock.note and f"process {holder.pid}" in lock.note
    assert json.loads((out / LOCK).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (out / LOCK).exists()


def test_leftover_temporaries_of_a_killed_run_are_removed(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["eval", "--out", str(out), *SMALL, *METHOD]) == 0
    ref = next((out / "refs").iterdir())
    (ref / ".tmp-frames.npy-abc123").write_bytes(b"\0" * 1000)  # what kill -9 during np.save leaves
    (out / "runs" / ".tmp-x.json-zz").write_text("{")
    (out / "mine").mkdir()
    (out / "mine" / ".tmp-keep").write_text("not vidsparse's folder")
    capsys.readouterr()
    assert main(["eval", "--out", str(out), "--resume", *SMALL, *METHOD]) == 0
    assert "removed 2 temporary file(s)" in capsys.readouterr().out
    assert not list(out.glob("**/.tmp-*.json-*")) and not list(ref.glob(".tmp-*"))
    assert (out / "mine" / ".tmp-keep").exists()
    assert remove_leftover_temporaries(out) == (0, 0)


@pytest.mark.parametrize(
    "prompt",
    ["<script>alert(1)</script> a red circle", "a circle [click](javascript:alert(1)) moves", "a | b *bold* `x`"],
)
def test_report_md_escapes_user_strings(prompt):
    escaped = md_escape(prompt)
    assert "<script>" not in escaped and "](" not in escaped
    report = {
        "created_at": "now",
        "settings": [f"tiny-wan {prompt}"],
        "summary": [],
        "plot": None,
        "rows": [
            {
                "run_id": "r1",
                "method": "radial",
                "prompt": prompt,
                "seed": 0,
                "status": "failed",
                "error": {"type": "ValueError", "message": prompt},
                "artifacts": {"side_by_side_mp4": "clips/r1.mp4"},
            },
        ],
        "notes": [f"note about {prompt}"],
        "methodology": {},
        "command": f"vidsparse eval --prompts `{prompt}`",
        "env": {"device_name": "cpu"},
    }
    text = render_markdown(report)
    assert "<script>" not in text
    assert "](javascript" not in text
    assert "[radial — " in text and "](<clips/r1.mp4>)" in text  # our own link stays a link


def test_cpp_build_is_keyed_by_what_changes_it():
    """Issue 23 item 11: two checkouts / venvs with another source or flags get another build folder, not a rebuild."""
    from vidsparse.kernels import cpp

    source = cpp.SOURCE.read_bytes()
    key = cpp.build_key()
    assert key == cpp.build_key(source, list(cpp.CFLAGS))  # stable: the same inputs give the same name
    assert len(key) == 12 and int(key, 16) >= 0
    assert cpp.build_key(source + b"\n// edited") != key
    assert cpp.build_key(source, [*cpp.CFLAGS, "-DEXTRA"]) != key
    assert cpp.extension_name() == f"vidsparse_block_sparse_cpu_{key}"
