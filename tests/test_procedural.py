import numpy as np
import pytest

from vidsparse.pipelines.offline import procedural as P


def test_same_seed_same_clip_and_caption():
    a, b = P.random_clip_spec(5, max_shapes=2), P.random_clip_spec(5, max_shapes=2)
    assert a == b and P.caption(a) == P.caption(b)
    np.testing.assert_array_equal(P.render(a, 5, 32, 48), P.render(b, 5, 32, 48))
    assert P.random_clip_spec(6) != a


def test_any_size_and_temporal_crops_agree():
    spec = P.random_clip_spec(3)
    full = P.render(spec, 12, 24, 40)
    assert full.shape == (12, 24, 40, 3) and full.dtype == np.float32
    assert 0.0 <= full.min() and full.max() <= 1.0
    np.testing.assert_array_equal(P.render(spec, 4, 24, 40, start_frame=5), full[5:9])


def _shape_pixels(spec, frames, size=64):
    """Centre of mass (x, y) per frame of pixels that match the shape colour."""
    video = P.render(spec, frames, size, size)
    colour = np.asarray(P.SHAPE_COLORS[spec.shapes[0].color])
    hits = np.linalg.norm(video - colour, axis=-1) < 0.05
    ys, xs = np.mgrid[0:size, 0:size]
    return np.array([[xs[h].mean(), ys[h].mean()] for h in hits]), hits.sum(axis=(1, 2))


@pytest.mark.parametrize(
    ("motion", "axis", "sign"),
    [("moves left", 0, -1), ("moves right", 0, 1), ("moves up", 1, -1), ("moves down", 1, 1)],
)
def test_captioned_direction_is_drawn(motion, axis, sign):
    spec = P.random_clip_spec(11, motions=(motion,), backgrounds=("plain",))
    assert motion in P.caption(spec)
    centres, _ = _shape_pixels(spec, P.REFERENCE_FRAMES)
    travel = centres[-1, axis] - centres[0, axis]
    assert sign * travel > 0.3 * 64  # about half the frame over the reference length
    assert abs(centres[-1, 1 - axis] - centres[0, 1 - axis]) < 1.0


def test_grows_and_shrinks_change_area():
    grow = P.random_clip_spec(2, motions=("grows",), backgrounds=("plain",))
    shrink = P.random_clip_spec(2, motions=("shrinks",), backgrounds=("plain",))
    _, area_g = _shape_pixels(grow, P.REFERENCE_FRAMES)
    _, area_s = _shape_pixels(shrink, P.REFERENCE_FRAMES)
    assert area_g[-1] > 3 * area_g[0] and area_s[-1] < area_s[0] / 2


def test_caption_grammar_and_vocabulary():
    from vidsparse.pipelines.offline.text import DEFAULT_VOCABULARY

    spec = P.ClipSpec(
        shapes=(P.ShapeSpec("circle", "orange", "moves left", 0.5, 0.5, 0.1, 0.0, 0.01),),
        background=P.BackgroundSpec("gradient", "blue"),
        pan="up",
        pan_speed=0.01,
    )
    assert P.caption(spec) == "an orange circle moves left over a blue gradient background as the camera pans up"
    words = {w for i in range(200) for w in P.caption(P.random_clip_spec(i, max_shapes=3)).split()}
    assert words <= set(DEFAULT_VOCABULARY), words - set(DEFAULT_VOCABULARY)


def test_pan_moves_background_only():
    spec = P.random_clip_spec(1, backgrounds=("striped",), pan_probability=1.0, motions=("stays still",))
    assert spec.pan is not None
    video = P.render(spec, 8, 32, 32)
    assert np.abs(video[-1] - video[0]).max() > 0.2


@pytest.mark.parametrize(
    ("call", "word"),
    [
        (lambda: P.random_clip_spec(0, max_shapes=4), "max_shapes"),
        (lambda: P.random_clip_spec(0, motions=("jumps",)), "motions"),
        (lambda: P.random_clip_spec(0, backgrounds=("sky",)), "backgrounds"),
        (lambda: P.render(P.random_clip_spec(0), 0, 8, 8), "frames"),
        (lambda: P.render(P.random_clip_spec(0), 2, 8, 8, start_frame=-1), "start_frame"),
    ],
)
def test_bad_arguments_name_the_parameter(call, word):
    with pytest.raises(ValueError, match=word):
        call()


def test_canonical_placement_follows_from_the_caption():
    specs = [P.random_clip_spec(i, placement="canonical", backgrounds=("plain",)) for i in range(60)]
    by_caption = {}
    for spec in specs:
        by_caption.setdefault(P.caption(spec), spec.shapes)
        assert by_caption[P.caption(spec)] == spec.shapes  # same words, same shapes and motion
    right = next(s for s in specs if s.shapes[0].motion == "moves right").shapes[0]
    still = next(s for s in specs if s.shapes[0].motion == "stays still").shapes[0]
    assert right.x < 0.5 and right.y == 0.5 and right.angle == 0.0  # starts at the left edge, half-way down
    assert (still.x, still.y) == (0.5, 0.5)
    with pytest.raises(ValueError, match="placement"):
        P.random_clip_spec(0, placement="middle")
