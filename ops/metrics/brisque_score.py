"""BRISQUE (Mittal, Moorthy & Bovik, "No-Reference Image Quality Assessment in the Spatial Domain", IEEE TIP 2012)
in NumPy/SciPy/OpenCV with its trained SVR evaluated in NumPy: offline, wheel-only (no libsvm). Higher = worse
(InMark, paper 004 §4).

Computation — the conventions of the ``brisque`` PyPI package 0.2.0 (github.com/rehanguha/brisque, Apache-2.0,
``brisque/brisque.py``), whose trained model we ship, so the scores agree with it (docs/score.md gives the measured
difference; ``bench/brisque_check.py`` re-measures it):
  1. grey = scikit-image's ``rgb2gray`` of the uint8 RGB image: ``(R, G, B)/255 · (0.2125, 0.7154, 0.0721)``
     (alpha dropped); the image is scored at its own size.
  2. MSCN coefficients (paper Eq. 1-3): ``(I − μ) / (σ + 1/255)`` with μ, σ from a 7×7 Gaussian window,
     σ_w = 7/6, normalised to sum 1, zero padding at the borders (``convolve2d(..., "same")``), and
     ``σ = sqrt(|μ² − (w * I²)|)``.
  3. Five coefficient sets: MSCN and its products with the right, lower, lower-right and lower-left neighbour
     (horizontal, vertical, main- and secondary-diagonal pairs, paper Eq. 7-10).
  4. Each set → an asymmetric generalised Gaussian (AGGD) moment fit (paper Eq. 8; Lasmar et al. 2009):
     ``r̂ = mean(|x|)² / mean(x²)``, ``γ̂ = σ_l/σ_r`` with ``σ_l² = mean(x² | x < 0)``, ``σ_r² = mean(x² | x ≥ 0)``,
     ``R̂ = r̂ (γ̂³+1)(γ̂+1)/(γ̂²+1)²``, and the shape α solving ``Γ(2/α)² / (Γ(1/α) Γ(3/α)) = R̂``;
     ``η = (σ_r − σ_l) · sqrt(Γ(1/α)/Γ(3/α)) · Γ(2/α)/Γ(1/α)`` (paper Eq. 11).
     Features: MSCN → ``[α, (σ_l² + σ_r²)/2]``; each pair product → ``[α, η, σ_l², σ_r²]`` — 18 per scale.
  5. The same at half size: OpenCV ``resize(fx=fy=1/2, INTER_CUBIC)`` of the float grey image; 36 features,
     full scale first.
  6. Features scaled to [−1, 1] by the model's per-feature min/max, then the ε-SVR with RBF kernel
     ``f(x) = Σ_i c_i · exp(−γ‖s_i − x‖²) − ρ`` (libsvm's ``svm_predict`` for an ε-SVR; γ = 0.05, 770 support
     vectors) is the score.

Where this differs from the paper: the package (and so we) fits the MSCN coefficients with the AGGD too and uses
``(σ_l² + σ_r²)/2`` as their variance, where the paper fits a symmetric GGD (α, σ²); the shape is solved exactly
(a bracketing root finder; the package uses ``scipy.optimize.root`` from 0.2, the paper's code a 0.001 grid on
[0.2, 10]); a ratio outside the attainable range takes the nearer end of [0.05, 20].

Model: ``brisque_svr.safetensors`` next to this file, converted once by ``bench/brisque_check.py --convert`` from the
package's ``brisque/models/svm.txt`` (libsvm model) and ``normalize.pickle`` (feature ranges). Copyright 2024 Rehan
Guha, Apache License 2.0 — see ``LICENSE-brisque.txt`` next to this file.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from .base import ImageContext, Metric, finite

MODEL_FILE = Path(__file__).with_name("brisque_svr.safetensors")
GRAY_WEIGHTS = np.array([0.2125, 0.7154, 0.0721])  # scikit-image rgb2gray (ITU-R BT.709)
WINDOW, WINDOW_SIGMA, MSCN_C = 7, 7 / 6, 1 / 255
ALPHA_RANGE = (0.05, 20.0)


# ------------------------------------------------------------------------------------------------ features
def grayscale(rgb: np.ndarray) -> np.ndarray:
    """uint8 ``(H, W, 3|4)`` (or ``(H, W)``) → float64 ``(H, W)`` in [0, 1] (scikit-image's ``rgb2gray``)."""
    array = np.asarray(rgb)
    if array.dtype != np.uint8:
        raise ValueError(f"BRISQUE takes uint8 images, got {array.dtype}")
    unit = array[..., :3] * (1 / 255) if array.ndim == 3 else array * (1 / 255)  # × (1/255), as img_as_float
    return unit @ GRAY_WEIGHTS if array.ndim == 3 else unit


def gaussian_window() -> np.ndarray:
    """The 7×7 Gaussian window, σ = 7/6, normalised to sum 1."""
    y, x = np.indices((WINDOW, WINDOW)) - WINDOW // 2
    weights = 1 / (2 * np.pi * WINDOW_SIGMA ** 2) * np.exp(-(x ** 2 + y ** 2) / (2 * WINDOW_SIGMA ** 2))
    return weights / np.sum(weights)


def mscn(gray: np.ndarray) -> np.ndarray:
    """Mean-subtracted contrast-normalised coefficients of a float grey image ``(H, W)`` (paper Eq. 1-3).

    The window sums are formed exactly as the package forms them (the same 2-D window, ``convolve2d``): in flat
    regions ``I − μ`` is rounding noise whose sign decides which side of the AGGD fit a coefficient counts on; a
    separable filter and a grey conversion dividing by 255 (not × 1/255) moved scores of photos with saturated
    areas by up to 0.04 (bench/brisque_check.py).
    """
    from scipy.signal import convolve2d

    window = gaussian_window()
    mean = convolve2d(gray, window, "same")
    deviation = np.sqrt(np.abs(mean ** 2 - convolve2d(gray ** 2, window, "same")))
    return (gray - mean) / (deviation + MSCN_C)


def pair_products(coefficients: np.ndarray) -> list[np.ndarray]:
    """MSCN, then its products with the horizontal, vertical, main- and secondary-diagonal neighbours."""
    m = coefficients
    return [m, m[:, :-1] * m[:, 1:], m[:-1, :] * m[1:, :], m[:-1, :-1] * m[1:, 1:], m[1:, :-1] * m[:-1, 1:]]


def _rho(alpha: float | np.ndarray) -> float | np.ndarray:
    """Γ(2/α)² / (Γ(1/α) Γ(3/α)), increasing in α: 1/2 at α = 1 (Laplace), 2/π at α = 2 (Gaussian), → 3/4."""
    from scipy.special import gammaln

    return np.exp(2 * gammaln(2 / alpha) - gammaln(1 / alpha) - gammaln(3 / alpha))


def aggd_fit(x: np.ndarray) -> tuple[float, float, float, float]:
    """Moment fit of an asymmetric generalised Gaussian → ``(α, η, σ_l, σ_r)`` (see the module docstring)."""
    from scipy.optimize import brentq
    from scipy.special import gamma

    values = np.asarray(x, dtype=np.float64).ravel()
    squares = values * values
    negative = values < 0
    with np.errstate(invalid="ignore", divide="ignore"):
        sigma_l = float(np.sqrt(squares[negative].mean())) if negative.any() else float("nan")
        sigma_r = float(np.sqrt(squares[~negative].mean())) if (~negative).any() else float("nan")
        r_hat = float(np.abs(values).mean() ** 2 / squares.mean())
        ratio = sigma_l / sigma_r
        target = r_hat * (ratio ** 3 + 1) * (ratio + 1) / (ratio ** 2 + 1) ** 2
    if not np.isfinite(target):
        return float("nan"), float("nan"), sigma_l, sigma_r
    low, high = ALPHA_RANGE
    if target <= _rho(low):
        alpha = low
    elif target >= _rho(high):
        alpha = high
    else:
        alpha = brentq(lambda a: _rho(a) - target, low, high, xtol=1e-12, rtol=1e-12)
    eta = (sigma_r - sigma_l) * np.sqrt(gamma(1 / alpha) / gamma(3 / alpha)) * gamma(2 / alpha) / gamma(1 / alpha)
    return float(alpha), float(eta), sigma_l, sigma_r


def scale_features(gray: np.ndarray) -> list[float]:
    """The 18 features of one scale: MSCN ``[α, (σ_l²+σ_r²)/2]``, then ``[α, η, σ_l², σ_r²]`` per pair product."""
    features: list[float] = []
    for index, values in enumerate(pair_products(mscn(gray))):
        alpha, eta, sigma_l, sigma_r = aggd_fit(values)
        features += [alpha, (sigma_l ** 2 + sigma_r ** 2) / 2] if index == 0 else [alpha, eta, sigma_l ** 2,
                                                                                    sigma_r ** 2]
    return features


def brisque_features(rgb: np.ndarray) -> np.ndarray:
    """The 36 BRISQUE features of a uint8 image ``(H, W, 3)``: 18 at full size, then 18 at half size."""
    import cv2

    gray = grayscale(rgb)
    half = cv2.resize(gray, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_CUBIC)
    return np.array(scale_features(gray) + scale_features(half))


# --------------------------------------------------------------------------------------------------- model
class BrisqueSVR:
    """The ε-SVR with RBF kernel of a libsvm model (support vectors, dual coefficients, γ, ρ) and the feature
    ranges it was trained with, evaluated in NumPy."""

    def __init__(self, path: Path = MODEL_FILE):
        from safetensors.numpy import load_file

        tensors = load_file(str(path))
        self.support_vectors = tensors["support_vectors"]
        self.dual_coef = tensors["dual_coef"]
        self.gamma = float(tensors["gamma"][0])
        self.rho = float(tensors["rho"][0])
        self.feature_min, self.feature_max = tensors["feature_min"], tensors["feature_max"]

    def scale(self, features: np.ndarray) -> np.ndarray:
        """Features → [−1, 1] by the training ranges (libsvm's svm-scale convention)."""
        return -1 + 2 * (features - self.feature_min) / (self.feature_max - self.feature_min)

    def predict(self, features: np.ndarray) -> float:
        """``Σ_i c_i exp(−γ‖s_i − x‖²) − ρ`` for the raw 36 features (scaled here)."""
        x = self.scale(np.asarray(features, dtype=np.float64))
        if not np.all(np.isfinite(x)):
            return float("nan")
        distances = ((self.support_vectors - x) ** 2).sum(axis=1)
        return float(self.dual_coef @ np.exp(-self.gamma * distances) - self.rho)


@lru_cache(maxsize=1)
def load_model() -> BrisqueSVR:
    return BrisqueSVR()


def brisque(image: torch.Tensor | np.ndarray, model: BrisqueSVR | None = None) -> float:
    """BRISQUE of one image: a tensor ``(3, H, W)`` in [0, 1] or a uint8 array ``(H, W, 3)``; NaN on a flat
    image (no contrast to fit)."""
    if isinstance(image, torch.Tensor):
        array = np.rint(image.detach().float().clamp(0, 1).cpu().numpy().transpose(1, 2, 0) * 255).astype(np.uint8)
    else:
        array = np.asarray(image)
    return (model or load_model()).predict(brisque_features(array))


class BrisqueMetric(Metric):
    name = "brisque"

    def __init__(self):
        self.model = load_model()

    def score(self, images: Sequence[torch.Tensor], contexts: Sequence[ImageContext]) -> list[float | None]:
        return [finite(brisque(image, self.model)) for image in images]


def build(name: str, **_options) -> BrisqueMetric:
    return BrisqueMetric()
