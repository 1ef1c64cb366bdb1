"""Mist v1, fused mode (Liang & Wu, "Mist: Towards Improved Adversarial Examples for Diffusion Models", 2023).

Mist's mode 2 combines the textual loss of AdvDM with the semantic (encoder) loss of the PhotoGuard encoder attack:

    min_δ  ‖E(x') − E(x_target)‖² − w · E_{t,ε} ‖ε_θ(z'_t, t, c) − ε‖²,      w = 1e4 (Mist's rate 10^(1+3)),

L∞ PGD with sign steps. Because the sign step is scale-free, w only sets the balance of the two terms (with w = 1e4
the AdvDM term dominates wherever its gradient is not tiny; the encoder term breaks ties and shapes the texture).

Defaults (pixel units /255): eps 16, step_size 1, steps 100, target ``pattern`` (see :mod:`.ea`), fused_weight 1e4.
Mist's own code admits (ε+1)/255 after saving; cloaklab's saved PNG holds ε exactly.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .ea import encoder_distance
from .engine import AttackModels, PGDResult, pgd


def attack(images: torch.Tensor, *, models: AttackModels, generators: Sequence[torch.Generator],
           targets: torch.Tensor, eps: float = 16.0, step_size: float = 1.0, steps: int = 100,
           random_start: bool = False, fused_weight: float = 1e4, **options: Any) -> PGDResult:
    """Run Mist's fused objective on ``images`` ``(B, 3, H, W)`` in [0, 1] toward ``targets`` (same shape)."""
    with torch.no_grad():
        target_latents = models.encode(targets.to(images.device))

    def loss(x: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
        return encoder_distance(models, x, target_latents) - fused_weight * models.denoise_loss(x, generators)

    return pgd(images, loss, generators=generators, eps=eps, step_size=step_size, steps=steps, ascent=False,
               random_init=random_start, **options)
