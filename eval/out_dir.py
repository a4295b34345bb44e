"""The eval output folder: what vidsparse wrote there (the manifest), who is writing (the lock), and leftovers.

- **Manifest** ``.vidsparse-manifest``: one relative path per line, appended (``O_APPEND``, so the processes of a
  distributed sweep can record concurrently) after each file vidsparse eval writes. ``--force`` deletes exactly the
  files it lists, never anything else: a TensorBoard ``runs/tb/`` or a figure of yours in ``plots/`` stays.
- **Lock** ``.vidsparse-eval.lock``: created exclusively by the process that prepares the folder, holding its pid,
  host, start time and command; a second eval into the same folder is refused with the owner named. A lock whose
  process is gone (same host, pid not running) is stale and taken over, with a note.
- **Leftovers**: a run killed mid-write (``kill -9``, power loss) leaves ``.tmp-*`` files of the atomic writers
  (a reference clip can be 100 MB); the next run removes them, saying how many and how large.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

MANIFEST = ".vidsparse-manifest"
LOCK = ".vidsparse-eval.lock"
#: Prefix of the temporary files the atomic writers (results.py, video_io.py) create next to their targets.
TMP_PREFIX = ".tmp-"


# ------------------------------------------------------------------------------------------------ manifest
def record(out_dir: str | os.PathLike, paths: Iterable[str | os.PathLike]) -> None:
    """Add files vidsparse just wrote to the manifest of ``out_dir`` (each path built from ``out_dir``)."""
    out = Path(out_dir).resolve()
    lines = [Path(path).resolve().relative_to(out).as_posix() + "\n" for path in paths]
    if not lines:
        return
    fd = os.open(out / MANIFEST, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, "".join(lines).encode())  # one write: lines of concurrent processes do not interleave
    finally:
        os.close(fd)


def recorded(out_dir: str | os.PathLike) -> list[str] | None:
    """The relative paths the manifest lists (each once, in order), or None when the folder has no manifest."""
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        return None
    return list(dict.fromkeys(line.strip() for line in path.read_text().splitlines() if line.strip()))


def remove_recorded(out_dir: str | os.PathLike) -> list[str]:
    """``--force``: delete the files the manifest lists (and folders left empty by that), then the manifest.

    Returns the relative paths removed. Nothing outside ``out_dir`` is touched, whatever the manifest says.

    Raises:
        ValueError: ``out_dir`` holds files but no manifest (not written by vidsparse eval, or by a version
            before the manifest): nothing is deleted.
    """
    out = Path(out_dir).resolve()
    listed = recorded(out)
    if listed is None:
        others = sorted(p.name for p in out.iterdir() if p.name != LOCK)
        if others:
            raise ValueError(
                f"--force: {str(out_dir)!r} has no {MANIFEST} listing what vidsparse eval wrote there, so nothing "
                f"is deleted (it holds {', '.join(others[:5])}{' ...' if len(others) > 5 else ''}). Delete what "
                "you do not need yourself, or choose another --out."
            )
        return []
    removed, folders = [], set()
    for rel in listed:
        target = (out / rel).resolve()
        if out not in target.parents or not target.is_file():  # outside the folder, gone, or not a file: skip
            continue
        target.unlink()
        removed.append(rel)
        folders.update(p for p in target.parents if out in p.parents)
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):  # deepest first
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    (out / MANIFEST).unlink()
    return removed


# ---------------------------------------------------------------------------------------------------- lock
def _host() -> str:
    return socket.gethostname()


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class OutDirInUse(ValueError):
    """Another running vidsparse eval holds the folder's lock (a ``ValueError``: the CLI's one-line usage error)."""


class OutDirLock:
    """The lock of one eval output folder; use as a context manager (released on exit, also on errors)."""

    def __init__(self, out_dir: str | os.PathLike, command: str = "") -> None:
        self.path = Path(out_dir) / LOCK
        self.command = command
        self.note: str | None = None  # set when a stale lock was taken over
        self._held = False

    def acquire(self) -> OutDirLock:
        """Take the lock, or raise :class:`OutDirInUse` naming the process that holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        owner = {
            "pid": os.getpid(),
            "host": _host(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": self.command,
        }
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = self._holder()
                if self._stale(holder):
                    self.note = (
                        f"took over the stale lock {self.path} of process {holder.get('pid')} "
                        f"(started {holder.get('started')}), which is no longer running"
                    )
                    self.path.unlink(missing_ok=True)
                    continue
                raise OutDirInUse(self._busy(holder)) from None
            with os.fdopen(fd, "w") as fh:
                json.dump(owner, fh)
            self._held = True
            return self
        raise RuntimeError(f"could not take the lock {self.path}: it keeps reappearing.")

    def check(self) -> None:
        """Raise :class:`OutDirInUse` when another live process holds the lock (call it before any long work)."""
        if self._held or not self.path.exists():
            return
        holder = self._holder()
        if not self._stale(holder) and not (holder.get("pid") == os.getpid() and holder.get("host") == _host()):
            raise OutDirInUse(self._busy(holder))

    def _busy(self, holder: dict[str, Any]) -> str:
        return (
            f"--out {str(self.path.parent)!r} is in use by another vidsparse eval (pid {holder.get('pid')} on "
            f"{holder.get('host')}, started {holder.get('started')}): wait for it to finish or choose another "
            f"--out. If that process is gone, delete {self.path}."
        )

    def _holder(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    @staticmethod
    def _stale(holder: dict[str, Any]) -> bool:
        """A lock of this host whose process is not running (an unreadable lock counts as stale too)."""
        if not holder:
            return True
        if holder.get("host") != _host():
            return False  # another machine (a shared filesystem): cannot tell, so never steal it
        pid = holder.get("pid")
        return not isinstance(pid, int) or not _running(pid)

    def release(self) -> None:
        """Delete the lock if this object holds it."""
        if self._held:
            self.path.unlink(missing_ok=True)
            self._held = False

    def __enter__(self) -> OutDirLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


# ----------------------------------------------------------------------------------------------- leftovers
#: Folders of the output where the atomic writers put their temporaries (``refs/<id>/`` one level down).
TMP_FOLDERS = (".", "runs", "clips", "plots", "refs/*")


def remove_leftover_temporaries(out_dir: str | os.PathLike) -> tuple[int, int]:
    """Delete the ``.tmp-*`` files an interrupted run left in the eval's folders; returns ``(files, bytes)``.

    Only the folders vidsparse eval writes into (:data:`TMP_FOLDERS`) are looked at. Call it only while holding
    the folder's lock: a running eval's temporaries are not leftovers.
    """
    out = Path(out_dir)
    files = size = 0
    for pattern in TMP_FOLDERS:
        for path in out.glob(f"{pattern}/{TMP_PREFIX}*"):
            if path.is_file():
                size += path.stat().st_size
                path.unlink()
                files += 1
    return files, size
