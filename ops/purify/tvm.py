"""Total-variance minimization purifier (Guo et al., "Countering Adversarial Images using Input Transformations",
ICLR 2018), with the settings of paper 001 App. C.1: resize to 64², drop 2% of the pixels at random (X = 1 where
dropped), solve

    min_Z ‖(1 − X) ⊙ (Z − x)‖₂ + λ · TV₂(Z),
    TV₂(Z) = Σ_c Σ_i ‖Z[c, i+1, :] − Z[c, i, :]‖₂ + Σ_c Σ_j ‖Z[c, :, j+1] − Z[c, :, j]‖₂

(Guo et al.'s row/column TV with p = 2), λ = 0.01, and upsample back to the input size. Solved with Adam (lr 0.01,
``iters`` steps from Z = x). Paper 001 upsamples with two super-resolution steps; we upsample bicubically.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def total_variation_rows_cols(images: torch.Tensor) -> torch.Tensor:
    """Guo et al.'s TV with p = 2 per image ``(B,)``: L2 norms of row and column differences, summed."""
    rows = (images[:, :, 1:, :] - images[:, :, :-1, :]).pow(2).sum(3).add(1e-12).sqrt().sum((1, 2))
    cols = (images[:, :, :, 1:] - images[:, :, :, :-1]).pow(2).sum(2).add(1e-12).sqrt().sum((1, 2))
    return rows + cols


def purify(images: torch.Tensor, *, resolution: int = 64, drop: float = 0.02, tv_weight: float = 0.01,
           iters: int = 200, generators: list[torch.Generator] | None = None) -> torch.Tensor:
    batch, _, height, width = images.shape
    small = F.interpolate(images.float(), size=(resolution, resolution), mode="bicubic", antialias=True,
                          align_corners=False).clamp(0, 1)
    generators = generators or [None] * batch
    dropped = torch.stack([torch.rand(1, resolution, resolution, generator=g) < drop for g in generators]).to(small)
    keep = 1 - dropped
    solution = small.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([solution], lr=0.01)
    with torch.enable_grad():  # callers run purifiers under no_grad; this one optimizes
        for _ in range(iters):
            optimizer.zero_grad()
            fidelity = (keep * (solution - small)).flatten(1).norm(dim=1)
            loss = (fidelity + tv_weight * total_variation_rows_cols(solution)).sum()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        restored = F.interpolate(solution.detach().clamp(0, 1), size=(height, width), mode="bicubic",
                                 align_corners=False)
    return restored.clamp_(0, 1).to(images.dtype)
