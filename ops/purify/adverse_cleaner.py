"""AdverseCleaner (lllyasviel, 2023): 64 iterations of an OpenCV bilateral filter (d 5, σ_color 8, σ_space 8) on the
8-bit image as float32 (0–255, no rounding between iterations), then 4 iterations of a guided filter (He et al.
2010) that uses the *input* as a colour guide (radius 4, eps 16 on the 0–255 scale) to restore edges.

Reference: lllyasviel/AdverseCleaner ``clean.py`` (``cv2.imread(...).astype(np.float32)``, ``cv2.bilateralFilter(y,
5, 8, 8)`` × 64, ``cv2.ximgproc.guidedFilter(img, y, 4, 16)`` × 4). Where we differ: the release writes
``y.clip(0, 255).astype(np.uint8)`` (truncation); we return the clipped float result and the writer rounds it.

The original calls ``cv2.ximgproc.guidedFilter`` (opencv-contrib); cloaklab depends on the plain OpenCV wheel, so
the colour guided filter is implemented here with box filters (same formula: per-window linear model
``q = aᵀI + b``, ``a = (Σ_I + eps·U)⁻¹ cov(I, p)``).
"""

from __future__ import annotations

import cv2
import numpy as np
import torch


def _box(image: np.ndarray, radius: int) -> np.ndarray:
    return cv2.boxFilter(image, ddepth=-1, ksize=(2 * radius + 1, 2 * radius + 1), normalize=True,
                         borderType=cv2.BORDER_REFLECT)


def guided_filter(guide: np.ndarray, source: np.ndarray, radius: int, eps: float) -> np.ndarray:
    """Colour-guided filter: ``guide`` ``(H, W, 3)`` and ``source`` ``(H, W, C)`` float64 arrays → ``(H, W, C)``."""
    mean_i = _box(guide, radius)
    # Covariance of the guide within each window: (H, W, 3, 3).
    products = guide[..., :, None] * guide[..., None, :]
    cov_ii = _box(products.reshape(*guide.shape[:2], 9), radius).reshape(*guide.shape[:2], 3, 3)
    cov_ii = cov_ii - mean_i[..., :, None] * mean_i[..., None, :] + eps * np.eye(3)
    inverse = np.linalg.inv(cov_ii)
    output = np.empty_like(source)
    for channel in range(source.shape[2]):
        p = source[..., channel]
        mean_p = _box(p, radius)
        cov_ip = _box(guide * p[..., None], radius) - mean_i * mean_p[..., None]
        a = np.einsum("hwij,hwj->hwi", inverse, cov_ip)
        b = mean_p - (a * mean_i).sum(-1)
        output[..., channel] = (_box(a, radius) * guide).sum(-1) + _box(b, radius)
    return output


TILE_PIXELS = 1 << 18  # the guided filter's float64 (H, W, 3, 3) temporaries exist for one row tile at a time


def guided_filter_inplace(guide: np.ndarray, result: np.ndarray, radius: int, eps: float) -> None:
    """:func:`guided_filter` of ``result`` (float32 ``(H, W, C)``, updated in place) guided by ``guide`` (uint8
    ``(H, W, 3)``), over row tiles with a halo of ``2·radius + 1`` rows (the two box passes' reach), so a large
    photo's float64 temporaries stay tile-sized. Rows a tile reads that the previous tile already overwrote come
    from a saved copy of their old values; only image borders are reflected, as in the whole-image filter."""
    height, width = result.shape[:2]
    halo = 2 * radius + 1
    step = max(4 * halo, TILE_PIXELS // max(1, width))
    carry = None  # old values of the rows just above the current tile
    for start in range(0, height, step):
        stop = min(height, start + step)
        low, high = max(0, start - halo), min(height, stop + halo)
        source = result[low:high].astype(np.float64)
        if carry is not None:
            source[: start - low] = carry
        carry = result[max(0, stop - halo):stop].astype(np.float64)
        filtered = guided_filter(guide[low:high].astype(np.float64), source, radius, eps)
        result[start:stop] = filtered[start - low: stop - low]


def purify(images: torch.Tensor, *, bilateral_iters: int = 64, guided_iters: int = 4, radius: int = 4,
           eps: float = 16.0, generators: list[torch.Generator] | None = None) -> torch.Tensor:
    outputs = torch.empty(images.shape, dtype=torch.float32)
    for index, image in enumerate(images):
        image = image.detach().float().cpu()
        original = np.empty((image.shape[1], image.shape[2], 3), dtype=np.uint8)
        for channel in range(3):  # plane by plane: no full-size float copies of a large photo
            scaled = np.clip(image[channel].numpy(), 0, 1, dtype=np.float32) * np.float32(255)
            original[..., channel] = np.rint(scaled, out=scaled)
            del scaled
        result = original.astype(np.float32)  # the release filters a float32 copy: no rounding between iterations
        for _ in range(bilateral_iters):
            result = cv2.bilateralFilter(result, 5, 8, 8)
        for _ in range(guided_iters):
            guided_filter_inplace(original, result, radius, eps)
        del original
        for channel in range(3):
            plane = np.clip(result[..., channel], 0, 255) / np.float32(255)
            outputs[index, channel] = torch.from_numpy(plane)
    return outputs.to(images.device, images.dtype)
