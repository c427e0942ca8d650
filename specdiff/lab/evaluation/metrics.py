"""Fidelity of an accelerated image to the full-compute one (scikit-image's PSNR and SSIM), and the
Fréchet distance between two feature sets (scipy)."""

from __future__ import annotations

import numpy as np
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from specdiff.lab.stats import frechet_distance  # noqa: F401  (part of this module's interface)


class QualityModelMissing(RuntimeError):
    """A quality model (CLIP, Inception) or reference set the user asked for is not available locally."""


def as_hwc(image) -> np.ndarray:
    """A PIL image, (H, W, C) array in [0, 1] or (C, H, W) tensor in [0, 1] -> float64 (H, W, C)."""
    if hasattr(image, "detach"):
        image = image.detach().float().cpu().numpy()
        if image.ndim == 3 and image.shape[0] in (1, 3):
            image = image.transpose(1, 2, 0)
    array = np.asarray(image, dtype=np.float64)
    if array.max() > 1.0 + 1e-6:
        array = array / 255.0
    return array


def psnr(reference, image) -> float:
    """PSNR in dB (inf for identical images)."""
    ref, img = as_hwc(reference), as_hwc(image)
    if np.array_equal(ref, img):
        return float("inf")
    return float(peak_signal_noise_ratio(ref, img, data_range=1.0))


def ssim(reference, image) -> float:
    ref, img = as_hwc(reference), as_hwc(image)
    window = min(7, *ref.shape[:2])
    window = window if window % 2 else window - 1  # skimage needs an odd window that fits
    return float(structural_similarity(ref, img, data_range=1.0, channel_axis=-1, win_size=window))
