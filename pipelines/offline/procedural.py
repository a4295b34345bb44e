"""Procedural video clips with captions: coloured shapes moving over plain, gradient or textured backgrounds.

The training data of the project's small video model (:mod:`vidsparse.pipelines.offline.shapes`) and a source of test
clips
with known content. Everything is a function of a seed: ``random_clip_spec(seed)`` draws a :class:`ClipSpec`,
``caption(spec)`` describes it in words the model's tokenizer knows, and ``render(spec, frames, height, width)``
draws it at any length and resolution.

    spec = random_clip_spec(7)
    caption(spec)                                   # 'a red circle moves left over a blue gradient background'
    video = render(spec, frames=31, height=64, width=64)   # float32 [31, 64, 64, 3] in [0, 1]

Geometry is resolution-free: lengths are in units of the frame height (a clip is ``width/height`` units wide), so
the same spec renders the same scene at 64×64 or 256×256. Motion is per frame, so a short clip (or one rendered
from ``start_frame > 0``) is a temporal crop of a longer one; speeds are chosen so that the described motion spans
about half the frame over :data:`REFERENCE_FRAMES` frames. Shapes that keep moving past that may leave the frame.
A camera pan moves the background only (the camera follows the shapes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from vidsparse.config import check_choice, check_int

#: Clip length (frames) over which a described motion covers about half the frame.
REFERENCE_FRAMES = 31

#: Shape colours (RGB in [0, 1]): saturated, so they stand out from every background colour.
SHAPE_COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.12, 0.10),
    "green": (0.15, 0.80, 0.20),
    "blue": (0.15, 0.35, 0.95),
    "yellow": (0.97, 0.88, 0.15),
    "orange": (0.98, 0.55, 0.10),
    "purple": (0.60, 0.20, 0.85),
    "pink": (0.98, 0.50, 0.75),
    "white": (0.96, 0.96, 0.96),
    "cyan": (0.15, 0.88, 0.92),
}

#: Background colours: muted, so saturated shapes stay visible on them.
BACKGROUND_COLORS: dict[str, tuple[float, float, float]] = {
    "black": (0.04, 0.04, 0.05),
    "gray": (0.45, 0.45, 0.47),
    "blue": (0.10, 0.16, 0.42),
    "green": (0.10, 0.32, 0.14),
    "red": (0.42, 0.10, 0.10),
    "brown": (0.38, 0.25, 0.14),
    "purple": (0.28, 0.12, 0.38),
}

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "ring")
MOTIONS: tuple[str, ...] = (
    "moves left",
    "moves right",
    "moves up",
    "moves down",
    "bounces",
    "rotates",
    "grows",
    "shrinks",
    "stays still",
)
BACKGROUNDS: tuple[str, ...] = ("plain", "gradient", "striped", "checkered", "textured")
#: How a shape's start (position, size, angle, speed) is drawn: "random" (anywhere its motion keeps it in the frame)
#: or "canonical" (fixed by its motion: "moves left" starts at the right edge, half-way down, upright; every other
#: motion starts in the centre). Canonical clips are (nearly) determined by their captions, which is what a tiny
#: model trained for an hour on a CPU can learn crisply; random placement asks it to break symmetry, and it drew
#: scattered fragments of the shape instead (measured on earlier runs).
PLACEMENTS: tuple[str, ...] = ("random", "canonical")
PAN_DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")

#: Shapes that look the same when rotated: "rotates" is never drawn for them (the caption would be unverifiable).
_ROUND_SHAPES = ("circle", "ring")
#: Minimum RGB distance between a shape's colour and its background's, so every shape is visible.
_MIN_CONTRAST = 0.45
#: Unit direction (dx, dy) per word; image y grows downwards.
_DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}


@dataclass(frozen=True)
class ShapeSpec:
    """One shape and its motion.

    Attributes:
        kind: One of :data:`SHAPES`.
        color: A key of :data:`SHAPE_COLORS`.
        motion: One of :data:`MOTIONS`.
        x, y: Centre at frame 0, in height units (x in [0, width/height], y in [0, 1], y down).
        size: Radius at frame 0, in height units.
        angle: Rotation at frame 0, radians.
        speed: Motion per frame: height units (moves, bounces: horizontal amplitude unused), radians (rotates),
            relative size change (grows/shrinks); the bounce period in frames is ``1 / speed``.
    """

    kind: str
    color: str
    motion: str
    x: float
    y: float
    size: float
    angle: float
    speed: float

    def state(self, frame: float) -> tuple[float, float, float, float]:
        """Centre x, centre y, radius and angle at ``frame`` (height units, radians)."""
        x, y, size, angle = self.x, self.y, self.size, self.angle
        if self.motion.startswith("moves "):
            dx, dy = _DIRECTIONS[self.motion.split()[1]]
            x, y = x + dx * self.speed * frame, y + dy * self.speed * frame
        elif self.motion == "bounces":
            # A ball bouncing on a floor at the start height: |sin| arcs with period 1/speed frames.
            y = self.y - 0.35 * abs(math.sin(math.pi * self.speed * frame))
        elif self.motion == "rotates":
            angle = angle + self.speed * frame
        elif self.motion == "grows":
            size = size * (1.0 + self.speed * frame)
        elif self.motion == "shrinks":
            size = size * max(0.15, 1.0 - self.speed * frame)
        return x, y, size, angle


@dataclass(frozen=True)
class BackgroundSpec:
    """The background pattern.

    Attributes:
        kind: One of :data:`BACKGROUNDS`.
        color: A key of :data:`BACKGROUND_COLORS`.
        angle: Direction of the gradient or stripes, radians.
        period: Stripe period or checker cell size, height units.
        texture_seed: Seed of the value-noise texture ("textured").
    """

    kind: str
    color: str
    angle: float = 0.0
    period: float = 0.25
    texture_seed: int = 0


@dataclass(frozen=True)
class ClipSpec:
    """A whole scene: shapes (drawn in order), background and an optional camera pan.

    Attributes:
        shapes: One or more :class:`ShapeSpec`.
        background: The :class:`BackgroundSpec`.
        pan: ``None`` or one of :data:`PAN_DIRECTIONS` (the camera's direction; the background moves the other way).
        pan_speed: Height units per frame.
    """

    shapes: tuple[ShapeSpec, ...]
    background: BackgroundSpec
    pan: str | None = None
    pan_speed: float = 0.0


def random_clip_spec(
    seed: int | tuple[int, ...],
    *,
    aspect: float = 1.0,
    max_shapes: int = 1,
    motions: tuple[str, ...] = MOTIONS,
    backgrounds: tuple[str, ...] = BACKGROUNDS,
    pan_probability: float = 0.2,
    placement: str = "random",
) -> ClipSpec:
    """Draw a scene from ``seed`` (an int or a tuple such as ``(dataset_seed, index)``).

    Args:
        seed: Seeds numpy's generator; the same seed gives the same spec.
        aspect: Width / height of the frames the clip will be rendered at (keeps shapes inside the frame).
        max_shapes: Up to this many shapes (1 to 3), each with its own colour and motion.
        motions: Motions to draw from (a subset of :data:`MOTIONS`).
        backgrounds: Background kinds to draw from (a subset of :data:`BACKGROUNDS`; a repeated kind is drawn
            more often).
        pan_probability: Chance of a camera pan (only on patterned backgrounds, where a pan is visible).
        placement: One of :data:`PLACEMENTS`: where shapes start ("canonical" also fixes size, angle and speed).
    """
    check_int("max_shapes", max_shapes, minimum=1, maximum=3)
    check_choice("placement", placement, PLACEMENTS)
    for motion in motions:
        check_choice("motions", motion, MOTIONS)
    for background in backgrounds:
        check_choice("backgrounds", background, BACKGROUNDS)
    rng = np.random.default_rng(seed)
    bg_color = str(rng.choice(list(BACKGROUND_COLORS)))
    bg_kind = str(rng.choice(list(backgrounds)))
    background = BackgroundSpec(
        kind=bg_kind,
        color=bg_color,
        angle=float(rng.choice([0.0, math.pi / 2, math.pi / 4, -math.pi / 4])),
        period=float(rng.uniform(0.15, 0.35)),
        texture_seed=int(rng.integers(1 << 30)),
    )
    visible = [
        name
        for name, rgb in SHAPE_COLORS.items()
        if np.linalg.norm(np.subtract(rgb, BACKGROUND_COLORS[bg_color])) >= _MIN_CONTRAST
    ]
    n_shapes = int(rng.integers(1, max_shapes + 1))
    colors = rng.choice(visible, size=n_shapes, replace=False)
    draw_shape = _canonical_shape if placement == "canonical" else _random_shape
    shapes = tuple(draw_shape(rng, str(color), aspect, motions) for color in colors)
    pan, pan_speed = None, 0.0
    if bg_kind != "plain" and rng.random() < pan_probability:
        pan = str(rng.choice(list(PAN_DIRECTIONS)))
        pan_speed = float(rng.uniform(0.4, 0.7) / REFERENCE_FRAMES)
    return ClipSpec(shapes=shapes, background=background, pan=pan, pan_speed=pan_speed)


def _random_shape(rng: np.random.Generator, color: str, aspect: float, motions: tuple[str, ...]) -> ShapeSpec:
    """One shape whose motion keeps it inside an ``aspect``-wide frame over :data:`REFERENCE_FRAMES` frames."""
    kind = str(rng.choice(list(SHAPES)))
    allowed = [m for m in motions if not (m == "rotates" and kind in _ROUND_SHAPES)] or ["stays still"]
    motion = str(rng.choice(allowed))
    size = float(rng.uniform(0.14, 0.2))
    span = float(rng.uniform(0.4, 0.55))  # distance covered over the reference length by "moves ..."
    speed = span / REFERENCE_FRAMES
    margin = size + 0.04
    x = float(rng.uniform(margin, aspect - margin))
    y = float(rng.uniform(margin, 1.0 - margin))
    if motion.startswith("moves "):
        dx, dy = _DIRECTIONS[motion.split()[1]]
        # Start on the side the shape moves away from, so that it crosses the frame.
        if dx:
            x = (aspect - margin - float(rng.uniform(0, 0.1))) if dx < 0 else (margin + float(rng.uniform(0, 0.1)))
        if dy:
            y = (1.0 - margin - float(rng.uniform(0, 0.1))) if dy < 0 else (margin + float(rng.uniform(0, 0.1)))
    elif motion == "bounces":
        y = 1.0 - margin  # the floor; arcs rise 0.35 above it
        speed = float(rng.uniform(1.5, 2.5)) / REFERENCE_FRAMES  # 1.5 to 2.5 bounces per reference clip
    elif motion == "rotates":
        speed = float(rng.choice([-1.0, 1.0]) * rng.uniform(0.6, 1.0) * math.pi / REFERENCE_FRAMES)
    elif motion == "grows":
        size = float(rng.uniform(0.09, 0.12))
        speed = float(rng.uniform(1.2, 1.6)) / REFERENCE_FRAMES
        x = float(rng.uniform(0.3, aspect - 0.3))
        y = float(rng.uniform(0.3, 0.7))
    elif motion == "shrinks":
        size = float(rng.uniform(0.22, 0.28))
        speed = float(rng.uniform(0.55, 0.7)) / REFERENCE_FRAMES
        x = float(rng.uniform(0.3, aspect - 0.3))
        y = float(rng.uniform(0.3, 0.7))
    angle = float(rng.uniform(0, 2 * math.pi))
    return ShapeSpec(kind=kind, color=color, motion=motion, x=x, y=y, size=size, angle=angle, speed=speed)


def _canonical_shape(rng: np.random.Generator, color: str, aspect: float, motions: tuple[str, ...]) -> ShapeSpec:
    """One shape whose start is fixed by its motion (see :data:`PLACEMENTS`); only kind and motion are drawn."""
    kind = str(rng.choice(list(SHAPES)))
    allowed = [m for m in motions if not (m == "rotates" and kind in _ROUND_SHAPES)] or ["stays still"]
    motion = str(rng.choice(allowed))
    size, x, y, speed = 0.2, aspect / 2, 0.5, 0.0
    margin = size + 0.04
    if motion.startswith("moves "):
        dx, dy = _DIRECTIONS[motion.split()[1]]
        speed = 0.5 / REFERENCE_FRAMES
        # Start on the side the shape moves away from; the motion covers half the frame over the reference length.
        if dx:
            x = aspect - margin if dx < 0 else margin
        if dy:
            y = 1.0 - margin if dy < 0 else margin
    elif motion == "bounces":
        y, speed = 1.0 - margin, 2.0 / REFERENCE_FRAMES
    elif motion == "rotates":
        speed = 0.8 * math.pi / REFERENCE_FRAMES
    elif motion == "grows":
        size, speed = 0.1, 1.4 / REFERENCE_FRAMES
    elif motion == "shrinks":
        size, speed = 0.26, 0.6 / REFERENCE_FRAMES
    return ShapeSpec(kind=kind, color=color, motion=motion, x=x, y=y, size=size, angle=0.0, speed=speed)


def caption(spec: ClipSpec) -> str:
    """Describe ``spec`` in plain words, e.g. ``'a red circle moves left over a blue striped background'``."""
    things = " and ".join(f"{_article(s.color)} {s.color} {s.kind} {s.motion}" for s in spec.shapes)
    bg = spec.background
    pattern = "plain " + bg.color if bg.kind == "plain" else f"{bg.color} {bg.kind}"
    text = f"{things} over {_article(pattern)} {pattern} background"
    if spec.pan:
        text += f" as the camera pans {spec.pan}"
    return text


def _article(word: str) -> str:
    """Return the indefinite article of ``word``: 'an' before a vowel, else 'a'."""
    return "an" if word[0] in "aeiou" else "a"


def render(spec: ClipSpec, frames: int, height: int, width: int, *, start_frame: int = 0) -> np.ndarray:
    """Draw frames ``start_frame .. start_frame + frames - 1`` of ``spec``.

    Args:
        spec: The scene.
        frames: Number of frames to draw.
        height: Frame height in pixels (any positive value).
        width: Frame width in pixels (any positive value).
        start_frame: First frame index (clips starting later are temporal crops of the same scene).

    Returns:
        float32 ``[frames, height, width, 3]`` in [0, 1], anti-aliased (coverage from signed distances).
    """
    for name, value in (("frames", frames), ("height", height), ("width", width)):
        check_int(name, value, minimum=1)
    check_int("start_frame", start_frame, minimum=0)
    # Pixel centres in height units.
    ys = (np.arange(height, dtype=np.float32) + 0.5) / height
    xs = (np.arange(width, dtype=np.float32) + 0.5) / height
    gx, gy = np.meshgrid(xs, ys)
    pixel = 1.0 / height
    out = np.empty((frames, height, width, 3), dtype=np.float32)
    for i in range(frames):
        frame = start_frame + i
        ox, oy = 0.0, 0.0
        if spec.pan:
            dx, dy = _DIRECTIONS[spec.pan]
            ox, oy = dx * spec.pan_speed * frame, dy * spec.pan_speed * frame
        image = _background(spec.background, gx + ox, gy + oy)
        for shape in spec.shapes:
            cx, cy, radius, angle = shape.state(frame)
            dist = _shape_distance(shape.kind, gx - cx, gy - cy, radius, angle)
            alpha = np.clip(0.5 - dist / pixel, 0.0, 1.0)[..., None]
            image = image * (1.0 - alpha) + alpha * np.asarray(SHAPE_COLORS[shape.color], dtype=np.float32)
        out[i] = image
    return np.clip(out, 0.0, 1.0)


def _background(bg: BackgroundSpec, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Draw the background at world coordinates ``x``, ``y`` (``[H, W]`` each) -> ``[H, W, 3]``."""
    base = np.asarray(BACKGROUND_COLORS[bg.color], dtype=np.float32)
    along = x * math.cos(bg.angle) + y * math.sin(bg.angle)
    if bg.kind == "plain":
        shade = np.ones_like(x)
    elif bg.kind == "gradient":
        shade = 0.35 + 1.3 * np.clip(0.5 + 0.5 * np.sin(along * 2.2), 0.0, 1.0)  # dark to light over the frame
    elif bg.kind == "striped":
        shade = np.where(np.floor(along / (bg.period / 2)) % 2 == 0, 1.35, 0.55)
    elif bg.kind == "checkered":
        cells = np.floor(x / bg.period) + np.floor(y / bg.period)
        shade = np.where(cells % 2 == 0, 1.35, 0.55)
    else:  # textured
        shade = 0.55 + 0.9 * _value_noise(bg.texture_seed, x, y, cell=bg.period)
    return np.clip(base[None, None, :] * shade[..., None] + 0.03 * (shade[..., None] - 1.0), 0.0, 1.0)


def _value_noise(seed: int, x: np.ndarray, y: np.ndarray, *, cell: float, size: int = 64) -> np.ndarray:
    """Smooth periodic value noise in [0, 1] at ``x``, ``y`` (a ``size``×``size`` lattice of ``cell`` spacing)."""
    lattice = np.random.default_rng(seed).random((size, size), dtype=np.float32)
    u, v = x / cell, y / cell
    i0, j0 = np.floor(u).astype(np.int64), np.floor(v).astype(np.int64)
    fu, fv = u - i0, v - j0
    fu, fv = fu * fu * (3 - 2 * fu), fv * fv * (3 - 2 * fv)  # smoothstep: no visible lattice creases

    def at(i: np.ndarray, j: np.ndarray) -> np.ndarray:
        return lattice[j % size, i % size]

    top = at(i0, j0) * (1 - fu) + at(i0 + 1, j0) * fu
    bottom = at(i0, j0 + 1) * (1 - fu) + at(i0 + 1, j0 + 1) * fu
    return top * (1 - fv) + bottom * fv


def _shape_distance(kind: str, px: np.ndarray, py: np.ndarray, radius: float, angle: float) -> np.ndarray:
    """Signed distance (height units, negative inside) from pixel offsets ``px, py`` to a shape at the origin."""
    c, s = math.cos(angle), math.sin(angle)
    x, y = c * px + s * py, -s * px + c * py  # into the shape's own frame
    r = np.hypot(x, y)
    if kind == "circle":
        return r - radius
    if kind == "ring":
        return np.abs(r - 0.72 * radius) - 0.28 * radius
    if kind == "square":
        half = 0.82 * radius
        qx, qy = np.abs(x) - half, np.abs(y) - half
        outside = np.hypot(np.maximum(qx, 0.0), np.maximum(qy, 0.0))
        return outside + np.minimum(np.maximum(qx, qy), 0.0)
    if kind == "triangle":
        # Equilateral, circumradius 1.1 * radius: the largest distance to its three edge lines.
        inradius = 0.55 * radius
        edges = [
            (math.cos(a), math.sin(a))
            for a in (math.pi / 2, math.pi / 2 + 2 * math.pi / 3, math.pi / 2 - 2 * math.pi / 3)
        ]
        return np.max(np.stack([nx * x + ny * y for nx, ny in edges]), axis=0) - inradius
    if kind == "star":
        # Five points: the boundary radius goes linearly (in angle) from 1.15 * radius at a tip to 0.5 at a valley.
        sector = 2 * math.pi / 5
        phi = np.mod(np.arctan2(y, x) - math.pi / 2, sector)
        towards_tip = np.abs(phi - sector / 2) / (sector / 2)  # 1 at a tip, 0 half-way between tips
        return (r - radius * (0.5 + 0.65 * towards_tip)) * 0.8
    raise ValueError(f"shape kind={kind!r} is not allowed; expected one of {', '.join(SHAPES)}.")
