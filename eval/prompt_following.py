"""Prompt following and temporal consistency of clips of the shapes model, checked without a learned metric.

The shipped ``tiny-shapes`` model draws one coloured shape moving over a background (the procedural clips of
:mod:`vidsparse.pipelines.offline.procedural`). Its prompts name a colour and a motion, so a clip can be checked
without a
learned metric: track the pixels of the prompted colour, then read the motion off their centre.

- :func:`prompt_following`: the prompted colour is visible at the start and the end, and its centre travels the
  prompted way (:data:`FOLLOWING` is the 8-prompt check: red and yellow shapes moving four ways).
- :func:`temporal_consistency`: over the whole clip, in how many frames the shape is visible, the largest jump of
  its centre between consecutive frames (a teleport or a flicker shows as a large jump) and the mean change between
  consecutive frames.
"""

from __future__ import annotations

import numpy as np

#: Prompts of the prompt-following check: (colour, direction, prompt), on plain backgrounds the colour stands out of.
FOLLOWING: list[tuple[str, str, str]] = [
    (colour, direction, f"a {colour} {shape} moves {direction} over a plain {background} background")
    for colour, shape, background in (("red", "circle", "gray"), ("yellow", "square", "blue"))
    for direction in ("left", "right", "up", "down")
]

#: Pixels of the prompted colour a frame needs for the shape to count as visible in it.
MIN_PIXELS = 8
#: Travel along the prompted direction, in pixels, for a clip to follow its prompt.
MIN_TRAVEL_PX = 4.0


def colour_hits(frames: np.ndarray, colour: str) -> np.ndarray:
    """Bool ``[T, H, W]``: pixels within 0.25 (RGB distance) of the prompted shape colour.

    Args:
        frames: float ``[T, H, W, 3]`` in [0, 1].
        colour: A key of :data:`vidsparse.pipelines.offline.procedural.SHAPE_COLORS`.
    """
    from vidsparse.pipelines.offline.procedural import SHAPE_COLORS

    if colour not in SHAPE_COLORS:
        raise ValueError(f"colour={colour!r} is unknown; expected one of {', '.join(SHAPE_COLORS)}.")
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [T, H, W, 3]; got shape {frames.shape}.")
    return np.linalg.norm(frames - np.asarray(SHAPE_COLORS[colour]), axis=-1) < 0.25


def _centres(hits: np.ndarray) -> np.ndarray:
    """``[T, 2]`` (x, y) centre of each frame's hits; NaN where a frame has none."""
    ys, xs = np.mgrid[0 : hits.shape[1], 0 : hits.shape[2]]
    count = hits.sum((1, 2)).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        cx = (hits * xs).sum((1, 2)) / count
        cy = (hits * ys).sum((1, 2)) / count
    return np.stack([cx, cy], axis=1)


def prompt_following(frames: np.ndarray, colour: str, direction: str) -> dict[str, float | bool]:
    """Track the pixels of the prompted shape colour through a clip and check the motion direction.

    Args:
        frames: float ``[T, H, W, 3]`` in [0, 1].
        colour: A key of :data:`vidsparse.pipelines.offline.procedural.SHAPE_COLORS`.
        direction: "left", "right", "up" or "down".

    Returns:
        ``{"visible": at least 8 matching pixels in the first and last frame, "travel": displacement of their centre
        along the prompted direction in pixels (positive = the prompted way), "follows": visible and travel > 4}``.
    """
    moves = {"left": (0, -1), "right": (0, 1), "up": (1, -1), "down": (1, 1)}
    if direction not in moves:
        raise ValueError(f"direction={direction!r} is invalid; expected one of {', '.join(moves)}.")
    hits = colour_hits(frames, colour)
    visible = bool(hits[0].sum() >= MIN_PIXELS and hits[-1].sum() >= MIN_PIXELS)
    axis, sign = moves[direction]
    centres = _centres(hits[[0, -1]])
    travel = float(sign * (centres[1, axis] - centres[0, axis])) if visible else float("nan")
    return {"visible": visible, "travel": round(travel, 2), "follows": bool(visible and travel > MIN_TRAVEL_PX)}


def temporal_consistency(frames: np.ndarray, colour: str) -> dict[str, float]:
    """How well a clip holds together over its whole length.

    Args:
        frames: float ``[T, H, W, 3]`` in [0, 1], T >= 2.
        colour: The prompted shape colour (a key of :data:`vidsparse.pipelines.offline.procedural.SHAPE_COLORS`).

    Returns:
        ``{"visible_frames": fraction of frames with the shape visible, "max_jump_px": the largest move of its
        centre between two consecutive frames where it is visible in both (NaN when no such pair),
        "mean_frame_change": mean absolute difference of consecutive frames, in [0, 1]}``.
    """
    if frames.shape[0] < 2:
        raise ValueError(f"frames must hold at least 2 frames; got {frames.shape[0]}.")
    hits = colour_hits(frames, colour)
    visible = hits.sum((1, 2)) >= MIN_PIXELS
    centres = _centres(hits)
    both = visible[1:] & visible[:-1]
    jumps = np.linalg.norm(centres[1:] - centres[:-1], axis=1)[both]
    return {
        "visible_frames": round(float(visible.mean()), 4),
        "max_jump_px": round(float(jumps.max()), 2) if jumps.size else float("nan"),
        "mean_frame_change": round(float(np.abs(np.diff(frames, axis=0)).mean()), 5),
    }
