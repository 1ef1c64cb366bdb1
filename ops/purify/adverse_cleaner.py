"""AdverseCleaner (lllyasviel, 2023): 64 iterations of an OpenCV bilateral filter (d 5, σ_color 8, σ_space 8) on the
8-bit image, then 4 iterations of a guided filter (He et al. 2010) that uses the *input* as a colour guide
(radius 4, eps 16 on the 0–255 scale) to restore edges.

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


def purify(images: torch.Tensor, *, bilateral_iters: int = 64, guided_iters: int = 4, radius: int = 4,
           eps: float = 16.0, generators: list[torch.Generator] | None = None) -> torch.Tensor:
    outputs = []
    for image in images:
        original = np.rint(image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).astype(np.uint8)
        smoothed = original.copy()
        for _ in range(bilateral_iters):
            smoothed = cv2.bilateralFilter(smoothed, 5, 8, 8)
        guide = original.astype(np.float64)
        result = smoothed.astype(np.float64)
        for _ in range(guided_iters):
            result = guided_filter(guide, result, radius, eps)
        outputs.append(torch.from_numpy(np.clip(result, 0, 255).astype(np.float32) / 255.0).permute(2, 0, 1))
    return torch.stack(outputs).to(images.device, images.dtype)
