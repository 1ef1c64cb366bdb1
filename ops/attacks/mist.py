"""Mist v1, fused mode (Liang & Wu, "Mist: Towards Improved Adversarial Examples for Diffusion Models", 2023).

Reference: psyker-team/mist ``mist_v3.py`` — ``target_model.forward`` (mode 2) and ``infer``. Mist's mode 2 combines
the semantic (encoder) distance of the PhotoGuard encoder attack with AdvDM's textual loss:

    min_δ  Σ (E(x') − E(x_target))²  −  w · mean ‖ε_θ(z'_t, t, c) − ε‖²,      w = 1e4 (``rate = 10**(1+3)``),

where the first term is ``nn.MSELoss(reduction="sum")`` over the latent's elements (per image) and the second is
the latent-diffusion training loss, a *mean* over the latent's elements (LDM ``p_losses``). The reductions matter:
at 512² (4×64×64 latents) the sum is 16,384× the mean, which is what lets the target compete with 1e4 × the AdvDM
term — with two means the target would only break ties and ``--target`` would hardly matter.
L∞ PGD with sign steps from a uniform random start (``LinfPGDAttack(..., targeted=True)`` with advertorch's default
``rand_init=True``), ε 16/255 and α 1/255 (Mist's 16/255·2 and 1/255·2 in [-1, 1] units), 100 steps.

Defaults (pixel units /255): eps 16, step_size 1, steps 100, random_start True, target ``pattern`` (see :mod:`.ea`;
Mist's own target is its ``MIST.png``, which we may not ship), fused_weight 1e4, prompt "a photo" (Mist's
``object=True`` template; its default ``'a painting'`` is for styles). Differences: latents are the VAE posterior
mean (Mist's ``get_first_stage_encoding`` samples the posterior); Mist's own code admits (ε+1)/255 after rounding;
cloaklab's saved PNG holds ε exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .ea import encoder_distance
from .engine import AttackModels, PGDResult, pgd


def fused_loss(models: AttackModels, target_latents: torch.Tensor, fused_weight: float = 1e4):
    """``loss(x, generators) -> (B,)``: Mist's mode-2 objective, summed encoder distance − w × mean ε-MSE."""
    def loss(x: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
        return encoder_distance(models, x, target_latents, "sum") - fused_weight * models.denoise_loss(x, generators)
    return loss


def attack(images: torch.Tensor, *, models: AttackModels, generators: Sequence[torch.Generator],
           targets: torch.Tensor, eps: float = 16.0, step_size: float = 1.0, steps: int = 100,
           random_start: bool = True, fused_weight: float = 1e4, **options: Any) -> PGDResult:
    """Run Mist's fused objective on ``images`` ``(B, 3, H, W)`` in [0, 1] toward ``targets`` (same shape)."""
    with torch.no_grad():
        target_latents = models.encode(targets.to(images.device))
    return pgd(images, fused_loss(models, target_latents, fused_weight), generators=generators, eps=eps,
               step_size=step_size, steps=steps, ascent=False, random_init=random_start, **options)
