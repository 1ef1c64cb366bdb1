"""ArcFace 5-point face alignment (insightface ``python-package/insightface/utils/face_align.py``: ``arcface_dst``,
``estimate_norm``, ``norm_crop``).

The detector's five landmarks — left eye, right eye, nose tip, left and right mouth corner, in the image's pixel
coordinates as RetinaFace returns them — are mapped onto ArcFace's fixed template by the least-squares similarity
transform (rotation, uniform scale, translation; Umeyama 1991, what insightface gets from scikit-image's
``SimilarityTransform.estimate``), and the image is warped with ``cv2.warpAffine`` (bilinear, black border) to a
``size × size`` crop. ``size`` a multiple of 112 scales the template; otherwise it is the 128-px variant (scaled by
``size/128`` and shifted 8·ratio px right), as ``estimate_norm`` does.
"""

from __future__ import annotations

import numpy as np
import torch

# insightface face_align.arcface_dst: the reference landmarks of a 112 × 112 ArcFace crop
ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                             [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float64)


def template(size: int = 112) -> np.ndarray:
    """The five reference points ``(5, 2)`` for a ``size``² crop (``estimate_norm``'s scaling rule)."""
    if size % 112 == 0:
        return ARCFACE_TEMPLATE * (size / 112.0)
    ratio = size / 128.0
    points = ARCFACE_TEMPLATE * ratio
    points[:, 0] += 8.0 * ratio
    return points


def similarity_transform(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The ``(2, 3)`` matrix of the similarity transform that maps ``source`` ``(N, 2)`` onto ``target`` in the
    least-squares sense (Umeyama's closed form, with the reflection guard)."""
    source, target = np.asarray(source, np.float64), np.asarray(target, np.float64)
    if source.shape != target.shape or source.ndim != 2 or source.shape[1] != 2 or len(source) < 2:
        raise ValueError(f"need two (N, 2) point sets of the same shape, got {source.shape} and {target.shape}")
    mean_s, mean_t = source.mean(0), target.mean(0)
    centred_s, centred_t = source - mean_s, target - mean_t
    covariance = centred_t.T @ centred_s / len(source)
    u, singular, vt = np.linalg.svd(covariance)
    sign = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[1, 1] = -1.0
    rotation = u @ sign @ vt
    variance = (centred_s ** 2).sum() / len(source)
    scale = float((singular * np.diag(sign)).sum() / variance) if variance > 0 else 1.0
    translation = mean_t - scale * rotation @ mean_s
    return np.hstack([scale * rotation, translation[:, None]])


def norm_crop(image: torch.Tensor, landmarks: np.ndarray, size: int = 112) -> torch.Tensor:
    """Align one face: ``image`` ``(3, H, W)`` in [0, 1] and its landmarks ``(5, 2)`` (x, y pixels) →
    ``(3, size, size)`` in [0, 1] with the landmarks on :func:`template` (``insightface norm_crop``)."""
    import cv2

    matrix = similarity_transform(np.asarray(landmarks, np.float64).reshape(5, 2), template(size))
    pixels = image.detach().float().cpu().permute(1, 2, 0).numpy()
    warped = cv2.warpAffine(pixels, matrix, (size, size), flags=cv2.INTER_LINEAR, borderValue=0.0)
    return torch.from_numpy(np.ascontiguousarray(warped)).permute(2, 0, 1).clamp(0, 1)
