"""Frame grids: several clips as rows of evenly spaced frames in one image (for sample sheets and previews)."""

from __future__ import annotations

import numpy as np

from vidsparse.video_io import to_uint8_frames


def frame_grid(clips: list[np.ndarray], columns: int = 8, *, gap: int = 2) -> np.ndarray:
    """One row per clip, ``columns`` evenly spaced frames each (first and last included).

    Args:
        clips: ``[T, H, W, 3]`` arrays (uint8 or float in [0, 1]), all of the same ``H`` and ``W``.
        columns: Frames shown per row (fewer when a clip is shorter).
        gap: White pixels between tiles.

    Returns:
        uint8 ``[rows * (H + gap) - gap, columns * (W + gap) - gap, 3]``.
    """
    if not clips:
        raise ValueError("clips is empty; expected at least one [T, H, W, 3] array.")
    clips = [to_uint8_frames(c) for c in clips]
    h, w = clips[0].shape[1:3]
    for i, clip in enumerate(clips):
        if clip.ndim != 4 or clip.shape[1:] != (h, w, 3):
            raise ValueError(f"clips[{i}] has shape {clip.shape}; expected [T, {h}, {w}, 3] like clips[0].")
    columns = max(1, min(columns, max(len(c) for c in clips)))
    grid = np.full((len(clips) * (h + gap) - gap, columns * (w + gap) - gap, 3), 255, dtype=np.uint8)
    for row, clip in enumerate(clips):
        picks = np.linspace(0, len(clip) - 1, num=min(columns, len(clip))).round().astype(int)
        for col, frame in enumerate(picks):
            y, x = row * (h + gap), col * (w + gap)
            grid[y : y + h, x : x + w] = clip[frame]
    return grid
