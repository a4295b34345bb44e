"""PSNR / SSIM / LPIPS functions of vidsparse.eval.metrics on known values (LPIPS with an injected backbone)."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view

from vidsparse.eval import metrics
from vidsparse.eval.lpips_weights import LpipsUnavailable, random_backbone_model
from vidsparse.video_io import read_frames


def _random_frames(seed: int, shape=(3, 24, 32, 3)) -> np.ndarray:
    return np.random.default_rng(seed).random(shape, dtype=np.float64).astype(np.float32)


@pytest.fixture(scope="module")
def random_backbone_lpips() -> metrics.LpipsMetric:
    """The real lpips.LPIPS v0.1 with its shipped linear layers but a random (seeded) backbone: the code path only."""
    model = random_backbone_model("alex", seed=0)
    return metrics.LpipsMetric(model, net="alex", source="random backbone (test)", batch_frames=2)


# --- PSNR -------------------------------------------------------------------------------------------------------


def test_psnr_identical_frames_is_inf():
    a = _random_frames(0)
    assert np.all(np.isinf(metrics.psnr_per_frame(a, a.copy())))
    assert metrics.psnr(a, a) == math.inf


@pytest.mark.parametrize("delta", [0.1, 0.01, 1 / 255])
def test_psnr_of_known_noise_level(delta):
    # +-delta at every pixel around 0.5 gives MSE = delta^2 exactly, so PSNR = -20 log10(delta).
    a = np.full((2, 16, 16, 3), 0.5, dtype=np.float32)
    signs = np.where(np.random.default_rng(1).random(a.shape) < 0.5, -1.0, 1.0).astype(np.float32)
    b = a + np.float32(delta) * signs
    expected = -20 * math.log10(delta)
    assert metrics.psnr_per_frame(a, b) == pytest.approx([expected, expected], abs=1e-4)
    assert metrics.psnr(a, b) == pytest.approx(expected, abs=1e-4)


def test_psnr_is_mean_of_per_frame_values_not_pooled_mse():
    a = np.zeros((2, 16, 16, 3), dtype=np.float32)
    b = a.copy()
    b[0] += 0.1  # PSNR 20 dB
    b[1] += 0.01  # PSNR 40 dB
    assert metrics.psnr_per_frame(a, b) == pytest.approx([20.0, 40.0], abs=1e-4)
    assert metrics.psnr(a, b) == pytest.approx(30.0, abs=1e-4)  # pooled MSE would give ~22.96 dB


def test_uint8_and_float_inputs_agree_and_torch_is_accepted():
    a8 = (np.random.default_rng(2).random((2, 16, 16, 3)) * 255).astype(np.uint8)
    b8 = np.clip(a8.astype(int) + 3, 0, 255).astype(np.uint8)
    from_uint8 = metrics.psnr_per_frame(a8, b8)
    from_float = metrics.psnr_per_frame(a8 / 255.0, b8 / 255.0)
    from_torch = metrics.psnr_per_frame(torch.from_numpy(a8), torch.from_numpy(b8))
    np.testing.assert_allclose(from_uint8, from_float, rtol=1e-5)
    np.testing.assert_allclose(from_uint8, from_torch, rtol=1e-12)


# --- SSIM -------------------------------------------------------------------------------------------------------


def _ssim_reference(a: np.ndarray, b: np.ndarray) -> float:
    """Straight numpy SSIM of one frame [H, W, 3] with an explicit 2-D Gaussian window over every valid position."""
    x = np.arange(11) - 5.0
    g = np.exp(-(x**2) / (2 * 1.5**2))
    window = np.outer(g, g) / np.outer(g, g).sum()
    values = []
    for c in range(3):
        pa, pb = sliding_window_view(a[..., c].astype(np.float64), (11, 11)), sliding_window_view(b[..., c], (11, 11))
        mu_a, mu_b = (pa * window).sum((-1, -2)), (pb * window).sum((-1, -2))
        var_a = (pa**2 * window).sum((-1, -2)) - mu_a**2
        var_b = (pb**2 * window).sum((-1, -2)) - mu_b**2
        cov = (pa * pb * window).sum((-1, -2)) - mu_a * mu_b
        c1, c2 = 0.01**2, 0.03**2
        values.append(((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)))
    return float(np.mean(values))


def test_ssim_identical_frames_is_one():
    a = _random_frames(3)
    np.testing.assert_allclose(metrics.ssim_per_frame(a, a), 1.0, atol=1e-6)


def test_ssim_of_constant_frames_has_closed_form():
    # No variance, no covariance: SSIM = (2ab + C1) / (a^2 + b^2 + C1).
    a = np.full((1, 20, 20, 3), 0.2, dtype=np.float32)
    b = np.full((1, 20, 20, 3), 0.6, dtype=np.float32)
    c1 = 0.01**2
    expected = (2 * 0.2 * 0.6 + c1) / (0.2**2 + 0.6**2 + c1)
    assert metrics.ssim(a, b) == pytest.approx(expected, abs=1e-6)


def test_ssim_matches_a_direct_windowed_computation():
    a = _random_frames(4, (3, 23, 29, 3))
    b = np.clip(a + 0.5 * _random_frames(5, a.shape) - 0.25, 0, 1).astype(np.float32)
    got = metrics.ssim_per_frame(a, b, batch_frames=2)  # two batches: 2 + 1 frames
    expected = [_ssim_reference(a[t], b[t]) for t in range(3)]
    np.testing.assert_allclose(got, expected, atol=2e-6)
    assert 0.3 < got.mean() < 0.99  # a real middle value, not a saturated one


def test_ssim_keeps_float64_accuracy_on_real_and_bright_flat_content():
    # Float32 moments of bright flat regions are where a naive SSIM loses ~1e-4; these must stay at ~1e-6.
    examples = Path(__file__).parent / "data" / "lpips-examples"
    ref, p0 = read_frames(examples / "ex_ref.png"), read_frames(examples / "ex_p0.png")
    flat = np.full((1, 24, 24, 3), 0.95, np.float32)
    flat_noisy = flat - 0.002 * _random_frames(14, flat.shape)
    for a, b in [(ref, p0), (flat, flat_noisy)]:
        a, b = metrics.to_float_frames(a).numpy(), metrics.to_float_frames(b).numpy()
        assert metrics.ssim(a, b) == pytest.approx(_ssim_reference(a[0], b[0]), abs=2e-6)


def test_ssim_rejects_frames_smaller_than_the_window():
    a = np.zeros((1, 8, 30, 3), dtype=np.float32)
    with pytest.raises(ValueError, match="at least 11x11"):
        metrics.ssim(a, a)


# --- input checks -----------------------------------------------------------------------------------------------


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"frame counts differ: a has 2 frames \(2, 16, 16, 3\), b has 3"):
        metrics.psnr(np.zeros((2, 16, 16, 3)), np.zeros((3, 16, 16, 3)))
    with pytest.raises(ValueError, match=r"shapes differ: a is \(1, 16, 16, 3\), b is \(1, 16, 20, 3\)"):
        metrics.ssim(np.zeros((1, 16, 16, 3)), np.zeros((1, 16, 20, 3)))


def test_out_of_range_floats_and_bad_shapes_are_refused():
    with pytest.raises(ValueError, match=r"values span \[-1, 1\]"):
        metrics.psnr(np.linspace(-1, 1, 16 * 16 * 3).reshape(1, 16, 16, 3), np.zeros((1, 16, 16, 3)))
    with pytest.raises(ValueError, match="expected \\[T, H, W, 3\\]"):
        metrics.psnr(np.zeros((1, 16, 16)), np.zeros((1, 16, 16)))


def test_an_image_is_one_frame():
    a = _random_frames(6, (16, 16, 3))
    assert metrics.psnr_per_frame(a, a * 0.5).shape == (1,)


# --- LPIPS code path (injected backbone) -----------------------------------------------------------------------


def test_lpips_identical_is_zero_and_different_is_positive(random_backbone_lpips):
    a = _random_frames(7, (3, 64, 64, 3))
    np.testing.assert_allclose(random_backbone_lpips.per_frame(a, a), 0.0, atol=1e-7)
    assert np.all(random_backbone_lpips.per_frame(a, _random_frames(8, a.shape)) > 0)


def test_lpips_batching_and_input_mapping(random_backbone_lpips):
    a, b = _random_frames(9, (5, 64, 64, 3)), _random_frames(10, (5, 64, 64, 3))
    batched = random_backbone_lpips.per_frame(a, b)  # batches of 2: 2 + 2 + 1 frames
    # One frame at a time, straight through lpips with its own [0, 1] -> [-1, 1] mapping (normalize=True).
    with torch.no_grad():
        single = [
            float(
                random_backbone_lpips.model(
                    *(torch.from_numpy(x[t : t + 1]).permute(0, 3, 1, 2) for x in (a, b)), normalize=True
                )
            )
            for t in range(5)
        ]
    np.testing.assert_allclose(batched, single, rtol=1e-4, atol=1e-6)


def test_compare_frames_with_injected_lpips(random_backbone_lpips):
    a = _random_frames(11, (2, 64, 64, 3))
    b = np.clip(a + 0.02, 0, 1)
    result = metrics.compare_frames(a, b, lpips_metric=random_backbone_lpips)
    assert result["num_frames"] == 2 and (result["height"], result["width"]) == (64, 64)
    assert [set(frame) for frame in result["frames"]] == [{"psnr", "ssim", "lpips"}] * 2
    assert result["psnr"] == pytest.approx(np.mean([f["psnr"] for f in result["frames"]]))
    assert result["psnr"] == pytest.approx(metrics.psnr(a, b))
    assert result["ssim"] == pytest.approx(metrics.ssim(a, b))
    assert result["lpips"] == pytest.approx(random_backbone_lpips(a, b))
    assert result["lpips_weights"] == "random backbone (test)" and result["lpips_unavailable"] is None


def test_compare_frames_when_lpips_is_unavailable_still_reports_psnr_and_ssim():
    a = _random_frames(12, (2, 32, 32, 3))
    missing = LpipsUnavailable(net="alex", reason="no weights anywhere", fix="vidsparse lpips-weights --net alex")
    result = metrics.compare_frames(a, a * 0.9, lpips_metric=missing)
    assert result["lpips"] is None and all(frame["lpips"] is None for frame in result["frames"])
    assert result["lpips_unavailable"] == missing.to_dict()
    assert result["psnr"] > 0 and 0 < result["ssim"] < 1


def test_json_ready_spells_infinity_as_a_string():
    import json

    a = _random_frames(13, (1, 16, 16, 3))
    missing = LpipsUnavailable(net="alex", reason="r", fix="f")
    text = json.dumps(metrics.json_ready(metrics.compare_frames(a, a, lpips_metric=missing)), allow_nan=False)
    assert json.loads(text)["psnr"] == "inf" and float(json.loads(text)["psnr"]) == math.inf
