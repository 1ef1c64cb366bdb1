"""Low-frequency DCT subspace of paper 004 (InMark, Eq. 5-8) and the ``lf-<attack>`` variants (LF-PGD).

Per channel, the orthonormal 2-D DCT-II ``X = C_H x C_Wᵀ`` with ``C[u, i] = c_u cos(π(i + ½)u / d)``,
``c_0 = √(1/d)``, ``c_u = √(2/d)`` (Eq. 5-6; orthonormal, so the IDCT of Eq. 7 is the transpose). The mask
``m_η`` keeps the top-left ``⌈η·H⌉ × ⌈η·W⌉`` coefficients (the paper writes ``ηd × ηd`` for square ``d × d``
images; we apply the ratio to each side of non-square ones). Eq. 8 replaces the PGD gradient by
``IDCT(DCT(∇) ⊙ m_η)``: :func:`lowpass` is that projection and is what ``lf-*`` passes to the engine as its
``grad_transform``: the low-pass acts on the gradient *before* the sign, and δ is not projected further (Eq. 8 in
Eq. 4: ``x̃ ← Π_γ(x̃ + α·SGN(IDCT(DCT(∇) ⊙ m_η)))``; InMark's own LF epochs, :mod:`.inmark`, do exactly this). The
sign re-introduces some high frequencies; that is the paper's method. ``lf_project=True`` (``-p lf_project=true``)
is our optional addition: it also projects the perturbation on the block after every step (:func:`project_delta`
as the engine's ``delta_transform``), keeping δ in the subspace up to the ε clip.

η default 0.25: not stated in paper 004; LF-PGD (Guo et al. 2020) kept about a quarter of each side.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import torch

from .engine import PGDResult


@lru_cache(maxsize=16)
def _dct_matrix_cpu(size: int) -> torch.Tensor:
    index = torch.arange(size, dtype=torch.float64)
    basis = torch.cos(math.pi * (index[None, :] + 0.5) * index[:, None] / size)  # [u, i]
    scale = torch.full((size, 1), math.sqrt(2 / size), dtype=torch.float64)
    scale[0] = math.sqrt(1 / size)
    return basis * scale


def dct_matrix(size: int, device: Any = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Orthonormal DCT-II matrix ``(size, size)``, rows = frequencies u, columns = positions i (Eq. 5-6)."""
    return _dct_matrix_cpu(size).to(device, dtype)


def dct2(x: torch.Tensor) -> torch.Tensor:
    """2-D DCT over the last two dims of ``(..., H, W)`` (Eq. 5)."""
    rows = dct_matrix(x.shape[-2], x.device, x.dtype)
    cols = dct_matrix(x.shape[-1], x.device, x.dtype)
    return rows @ x @ cols.T


def idct2(coefficients: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`dct2` (Eq. 7)."""
    rows = dct_matrix(coefficients.shape[-2], coefficients.device, coefficients.dtype)
    cols = dct_matrix(coefficients.shape[-1], coefficients.device, coefficients.dtype)
    return rows.T @ coefficients @ cols


def lowfreq_mask(height: int, width: int, ratio: float, device: Any = "cpu") -> torch.Tensor:
    """Binary ``m_η`` ``(H, W)``: 1 on the top-left ``⌈η H⌉ × ⌈η W⌉`` block of coefficients, 0 elsewhere."""
    if not 0 < ratio <= 1:
        raise ValueError(f"lf ratio η must be in (0, 1], got {ratio}")
    mask = torch.zeros(height, width, device=device)
    mask[: max(1, math.ceil(ratio * height)), : max(1, math.ceil(ratio * width))] = 1
    return mask


def lowpass(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """``IDCT(DCT(x) ⊙ m_η)`` per channel for ``(B, C, H, W)`` (Eq. 8) — the lf-* gradient transform."""
    mask = lowfreq_mask(x.shape[-2], x.shape[-1], ratio, x.device).to(x.dtype)
    return idct2(dct2(x) * mask)


def project_delta(delta: torch.Tensor, ratio: float) -> torch.Tensor:
    """Project a perturbation on the low-frequency subspace (same operator as :func:`lowpass`)."""
    return lowpass(delta, ratio)


def highfreq_energy(delta: torch.Tensor, ratio: float) -> torch.Tensor:
    """Fraction ``(B,)`` of the perturbation's energy outside the kept DCT block (0 = purely low-frequency)."""
    coefficients = dct2(delta.double())
    mask = lowfreq_mask(delta.shape[-2], delta.shape[-1], ratio, delta.device).double()
    outside = (coefficients * (1 - mask)).pow(2).flatten(1).sum(1)
    return (outside / coefficients.pow(2).flatten(1).sum(1).clamp_min(1e-30)).float()


def transforms(ratio: float, grad_transform: Any = None, delta_transform: Any = None,
               project: bool = False) -> dict[str, Any]:
    """The engine options of LF-PGD (composed after any transforms already given): the gradient low-pass of Eq. 8,
    and with ``project`` also the perturbation's."""

    def grad_lowpass(grad: torch.Tensor) -> torch.Tensor:
        return lowpass(grad_transform(grad) if grad_transform is not None else grad, ratio)

    def delta_lowpass(delta: torch.Tensor) -> torch.Tensor:
        return project_delta(delta_transform(delta) if delta_transform is not None else delta, ratio)

    return {"grad_transform": grad_lowpass, "delta_transform": delta_lowpass if project else delta_transform}


def attack(images: torch.Tensor, *, models: Any, generators: Sequence[torch.Generator], base: str,
           lf_ratio: float = 0.25, lf_project: bool = False, grad_transform: Any = None,
           delta_transform: Any = None, **params: Any) -> PGDResult:
    """``lf-<base>``: run the single-image attack ``base`` with its gradient low-passed before the sign (Eq. 8);
    ``lf_project`` also projects the perturbation."""
    from . import get_attack

    options = transforms(lf_ratio, grad_transform, delta_transform, lf_project)
    return get_attack(base).load().attack(images, models=models, generators=generators, **options, **params)


def attack_set(images: list[torch.Tensor], *, base: str, lf_ratio: float = 0.25, lf_project: bool = False,
               grad_transform: Any = None, delta_transform: Any = None, **params: Any) -> list[PGDResult]:
    """``lf-<set-level attack>`` (LF-ASPL, LF-FSMG of paper 004): the base set attack with the LF transforms."""
    from . import get_attack

    options = transforms(lf_ratio, grad_transform, delta_transform, lf_project)
    return get_attack(base).load().attack_set(images, **options, **params)
