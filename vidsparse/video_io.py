"""Reading and writing clips (mp4/webm through imageio-ffmpeg, gif through Pillow), and image files.

Frames are ``uint8 [T, H, W, 3]`` numpy arrays everywhere in vidsparse's I/O; metrics convert to float [0, 1].
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import imageio.v3 as iio
import numpy as np

VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv", ".avi")
GIF_SUFFIXES = (".gif",)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def default_file_mode() -> int:
    """The permissions of a newly created file under the current umask (``mkstemp`` alone gives 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def to_uint8_frames(frames: np.ndarray) -> np.ndarray:
    """Float frames in [0, 1] (or uint8) ``[T, H, W, 3]`` -> uint8, rounding and clipping floats."""
    frames = np.asarray(frames)
    if frames.dtype == np.uint8:
        return frames
    return (np.clip(frames, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


#: Suffixes :func:`write_video` writes.
WRITABLE_SUFFIXES = VIDEO_SUFFIXES + GIF_SUFFIXES + (".npy",)


def check_writable_folder(
    folder: str | os.PathLike, flag: str, *, create: bool, value: str | os.PathLike | None = None
) -> Path:
    """Refuse a folder that cannot be written, with one ``ValueError`` naming ``flag``; returns it as a Path.

    ``create=True`` makes a missing folder (and its parents); ``create=False`` checks the nearest existing ancestor
    instead, so nothing is created before the caller's own checks. Writability is tried (a file created and
    removed): permission bits alone do not tell (root, read-only mounts, ACLs). ``value``: what the user gave for
    ``flag`` when that is not the folder itself (a file in it).
    """
    folder = Path(folder)
    given = f"{flag} {str(value if value is not None else folder)!r}"
    existing = next(p for p in (folder.absolute(), *folder.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"{given}: {str(existing)!r} is a file, not a folder.")
    if existing != folder.absolute() and create:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ValueError(f"{given}: cannot create the folder {str(folder)!r} ({err.strerror}).") from None
        existing = folder
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".tmp-write-check-")
    except OSError as err:
        raise ValueError(f"{given}: the folder {str(existing)!r} is not writable ({err.strerror}).") from None
    os.close(fd)
    os.unlink(probe)
    return folder


def check_video_path(
    path: str | os.PathLike, flag: str = "--out", *, height: int | None = None, width: int | None = None
) -> Path:
    """Check an output path of :func:`write_video` before any work: suffix, folder (made if missing), writable.

    ``height`` / ``width`` (when known) are checked even for video suffixes, which H.264/VP9 require. Raises one
    ``ValueError`` naming ``flag``; returns the path.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if path.is_dir():
        raise ValueError(f"{flag} {str(path)!r} is a folder; give a file name, e.g. {str(path / 'clip.mp4')!r}.")
    if suffix not in WRITABLE_SUFFIXES:
        raise ValueError(
            f"{flag} {str(path)!r}: unknown video suffix {suffix!r}; expected one of {', '.join(WRITABLE_SUFFIXES)}."
        )
    if suffix in VIDEO_SUFFIXES:
        for name, size in (("height", height), ("width", width)):
            if size is not None and size % 2:
                raise ValueError(
                    f"--{name} {size}: {suffix} files need an even frame size; use {size - 1} or {size + 1}, or "
                    f"write a .gif or .npy."
                )
    check_writable_folder(path.parent, flag, create=True, value=path)
    return path


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: int = 8) -> Path:
    """Write ``frames`` (uint8 or float [0, 1], ``[T, H, W, 3]``) to ``path``, atomically.

    The suffix picks the format: ``.mp4``/``.webm``/... (H.264/VP9 via imageio-ffmpeg; sizes must be even),
    ``.gif``, or ``.npy`` (the exact uint8 frames, lossless: what ``vidsparse compare`` and the eval harness measure
    bit for bit). The file appears complete or not at all: it is written next to its target and renamed.
    """
    path = Path(path)
    frames = to_uint8_frames(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [T, H, W, 3]; got shape {frames.shape}.")
    suffix = path.suffix.lower()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=suffix, dir=path.parent, prefix=".tmp-")
    os.close(fd)
    os.chmod(tmp, default_file_mode())
    try:
        if suffix == ".npy":
            with open(tmp, "wb") as handle:
                np.save(handle, frames, allow_pickle=False)
        elif suffix in GIF_SUFFIXES:
            iio.imwrite(tmp, frames, extension=".gif", duration=int(1000 / fps), loop=0)
        elif suffix in VIDEO_SUFFIXES:
            if frames.shape[1] % 2 or frames.shape[2] % 2:
                raise ValueError(f"video size {frames.shape[2]}x{frames.shape[1]} must be even for {suffix} files.")
            # macro_block_size=1: keep the exact size (imageio would otherwise resize to multiples of 16).
            iio.imwrite(tmp, frames, extension=suffix, fps=fps, macro_block_size=1, plugin="FFMPEG")
        else:
            allowed = ", ".join(WRITABLE_SUFFIXES)
            raise ValueError(f"out={str(path)!r}: unknown video suffix {suffix!r}; expected one of {allowed}.")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_frames(path: str | os.PathLike) -> np.ndarray:
    """Read a video, gif, image or ``.npy`` file as uint8 ``[T, H, W, 3]`` (an image is one frame).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file cannot be decoded (the message names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist or is not a file.")
    suffix = path.suffix.lower()
    known = (".npy", *VIDEO_SUFFIXES, *GIF_SUFFIXES, *IMAGE_SUFFIXES)
    if suffix not in known:  # a decoder would fail on it with a message about its own internals
        raise ValueError(
            f"cannot read {str(path)!r}: {suffix or 'no suffix'} is not a video, image or .npy file "
            f"(expected one of {', '.join(known)})."
        )
    try:
        if suffix == ".npy":
            frames = np.load(path, allow_pickle=False)
        elif suffix in VIDEO_SUFFIXES:
            frames = iio.imread(path, plugin="FFMPEG")
        else:
            frames = iio.imread(path, index=None) if suffix in GIF_SUFFIXES else iio.imread(path)
    except Exception as err:  # every decoder error becomes one clear message naming the file
        raise ValueError(f"cannot read {str(path)!r}: {err}") from err
    frames = np.asarray(frames)
    if frames.ndim == 3 and suffix != ".npy":  # one image (an .npy must hold [T, H, W, 3] itself)
        frames = frames[None]
    if frames.ndim == 4 and frames.shape[-1] == 4:  # drop alpha
        frames = frames[..., :3]
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"{str(path)!r} holds an array of shape {frames.shape}; expected [T, H, W, 3] RGB.")
    if frames.dtype != np.uint8:
        raise ValueError(f"{str(path)!r} holds {frames.dtype} data; expected uint8.")
    return frames
