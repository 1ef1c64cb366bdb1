"""PSNR, SSIM and RMSE between two images, through scikit-image (float64, so uint8 inputs cannot overflow).

Inputs are torch tensors ``(3, H, W)`` or numpy arrays ``(H, W, C)``; floats are taken in [0, 1], integer arrays
by their dtype's range (uint8 → 255, uint16 → 65535).
"""

from __future__ import annotations

import math

import numpy as np
from skimage.metrics import structural_similarity


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


TILE_PIXELS = 1 << 18  # rows per tile ≈ this many pixels: full-size photos never get full-size float64 copies


def _rows(image) -> int:
    return int(image.shape[1] if hasattr(image, "detach") else np.asarray(image).shape[0])


def _row_tile(image, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of an image as float64 ``(h, W, C)`` in [0, 1] (see :func:`_as_unit_hwc`)."""
    if hasattr(image, "detach"):
        return _as_unit_hwc(image[..., start:stop, :] if image.ndim == 3 else image[start:stop])
    return _as_unit_hwc(np.asarray(image)[start:stop])


def _tile_height(image) -> int:
    width = image.shape[-1] if hasattr(image, "detach") else np.asarray(image).shape[1]
    return max(16, TILE_PIXELS // max(1, int(width)))


def psnr(image, reference) -> float:
    """Peak signal-to-noise ratio in dB (data range 1); ``inf`` for identical images is reported as 100.

    The squared error is summed over row tiles in float64 (same value as scikit-image's, bounded memory)."""
    height, step = _rows(image), _tile_height(image)
    total, count = 0.0, 0
    for start in range(0, height, step):
        a, b = _row_tile(image, start, start + step), _row_tile(reference, start, start + step)
        if a.shape != b.shape:
            raise ValueError(f"image shapes differ: {a.shape} vs {b.shape}")
        total += float(np.square(a - b).sum())
        count += a.size
    if total == 0.0:
        return 100.0
    return round(float(10 * np.log10(1.0 / (total / count))), 4)


def ssim(image, reference) -> float:
    """Structural similarity (Wang et al. 2004, 7×7 windows as scikit-image), averaged over channels.

    Computed by scikit-image on row tiles with a halo of the window's half-width, keeping the map's rows that lie
    in the tile and outside the border scikit-image crops: the mean equals scikit-image's on the whole image."""
    height = _rows(image)
    first = _row_tile(image, 0, 1)
    width = first.shape[1]
    window = min(7, height, width)
    if window < 3:
        a, b = _as_unit_hwc(image), _as_unit_hwc(reference)
        return 1.0 if np.array_equal(a, b) else float("nan")
    window -= 1 - window % 2
    pad = (window - 1) // 2
    step = max(_tile_height(image), 4 * window)
    total, count = 0.0, 0
    for start in range(0, height, step):
        stop = min(height, start + step)
        low, high = max(0, start - pad), min(height, stop + pad)
        a, b = _row_tile(image, low, high), _row_tile(reference, low, high)
        for channel in range(a.shape[2]):
            _, full = structural_similarity(b[..., channel], a[..., channel], data_range=1.0, win_size=window,
                                            full=True)
            # Rows of this tile that scikit-image keeps (it drops `pad` rows/cols at each image border); a tile
            # computed with its halo gives them exactly (reflection only matters at the image borders).
            keep_low, keep_high = max(start, pad), min(stop, height - pad)
            if keep_high > keep_low:
                rows = full[keep_low - low: keep_high - low, pad: width - pad]
                total += float(rows.sum(dtype=np.float64))
                count += rows.size
    return round(total / count, 6) if count else float("nan")


def rmse(image, reference) -> float:
    a, b = _as_unit_hwc(image), _as_unit_hwc(reference)
    return round(math.sqrt(float(np.mean((a - b) ** 2))), 6)
