"""BRISQUE (Mittal et al., "No-Reference Image Quality Assessment in the Spatial Domain", TIP 2012), through the
``brisque`` package and the SVR model it bundles: offline, no download. Higher = worse (InMark, paper 004 §4).

brisque 0.2 returns its features as 1-element arrays, which NumPy ≥ 2 refuses to turn into floats; a subclass
flattens them (the scores are unchanged). The image is scored at its own size on the 0-255 scale.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .base import ImageContext, Metric, finite


def _scorer():
    from brisque import BRISQUE

    class _Brisque(BRISQUE):
        def calculate_brisque_features(self, image, kernel_size=7, sigma=7 / 6):
            raw = super().calculate_brisque_features(image, kernel_size=kernel_size, sigma=sigma)
            return np.array([float(np.asarray(value, dtype=np.float64).reshape(-1)[0]) for value in raw])

    return _Brisque(url=False)


def brisque(image: torch.Tensor | np.ndarray, scorer=None) -> float:
    """BRISQUE of one image: a tensor ``(3, H, W)`` in [0, 1] or a uint8 array ``(H, W, 3)``."""
    if isinstance(image, torch.Tensor):
        array = np.rint(image.detach().float().clamp(0, 1).cpu().numpy().transpose(1, 2, 0) * 255).astype(np.uint8)
    else:
        array = np.asarray(image)
    return float((scorer or _scorer()).score(array))


class BrisqueMetric(Metric):
    name = "brisque"

    def __init__(self):
        self.scorer = _scorer()

    def score(self, images: Sequence[torch.Tensor], contexts: Sequence[ImageContext]) -> list[float | None]:
        return [finite(brisque(image, self.scorer)) for image in images]


def build(name: str, **_options) -> BrisqueMetric:
    return BrisqueMetric()
