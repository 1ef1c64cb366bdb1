"""PSNR, SSIM and RMSE between two images, through scikit-image (float64, so uint8 inputs cannot overflow).

Inputs are torch tensors ``(3, H, W)`` or numpy arrays ``(H, W, C)``; floats are taken in [0, 1], integer arrays
by their dtype's range (uint8 → 255, uint16 → 65535).
"""

from __future__ import annotations

import math

import numpy as np
from skimage.metrics import peak_signal_noise_ratio, structural_similarity


def _as_unit_hwc(image) -> np.ndarray:
    if hasattr(image, "detach"):
        array = image.detach().float().cpu().numpy()
        array = array.transpose(1, 2, 0) if array.ndim == 3 else array
    else:
        array = np.asarray(image)
    if np.issubdtype(array.dtype, np.integer):
        array = array.astype(np.float64) / np.iinfo(array.dtype).max
    array = array.astype(np.float64)
    return array[..., None] if array.ndim == 2 else array


def psnr(image, reference) -> float:
    """Peak signal-to-noise ratio in dB (data range 1); ``inf`` for identical images is reported as 100."""
    a, b = _as_unit_hwc(image), _as_unit_hwc(reference)
    if np.array_equal(a, b):
        return 100.0
    return round(float(peak_signal_noise_ratio(b, a, data_range=1.0)), 4)


def ssim(image, reference) -> float:
    """Structural similarity (Wang et al. 2004, 7×7 windows as scikit-image), averaged over channels."""
    a, b = _as_unit_hwc(image), _as_unit_hwc(reference)
    window = min(7, a.shape[0], a.shape[1])
    if window < 3:
        return 1.0 if np.array_equal(a, b) else float("nan")
    window -= 1 - window % 2
    return round(float(structural_similarity(b, a, data_range=1.0, channel_axis=2, win_size=window)), 6)


def rmse(image, reference) -> float:
    a, b = _as_unit_hwc(image), _as_unit_hwc(reference)
    return round(math.sqrt(float(np.mean((a - b) ** 2))), 6)
