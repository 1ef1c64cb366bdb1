"""SDS(+) and SDS(−) of Diff-Protect (Xue et al., "Toward Effective Protection Against Diffusion-Based Mimicry
through Score Distillation", ICLR 2024); paper 000 App. F.

AdvDM's gradient ``∇_x ‖ε_θ(z_t) − ε‖²`` runs back through the UNet. Score distillation drops the UNet Jacobian:
the residual ``r = ε_θ(z_t, t, c) − target`` is computed without gradient and treated as the latent gradient,

    ∇_x L ≈ (∂z_0/∂x)ᵀ r,     implemented as  L_sds = Σ (r.detach() ⊙ z_0),

so only the VAE encoder is back-propagated (the UNet runs under ``torch.no_grad``: no UNet backward at all —
Diff-Protect's "2× faster, ½ memory"). ``sds+`` ascends (like adm+), ``sds-`` descends (their strongest variant).
The weight w(t) of SDS is 1 (as Diff-Protect's code uses). The reported loss_start/loss_end is the true diffusion
loss on fixed draws, so SDS and AdvDM outputs are comparable.

Reference code: xavihart/Diff-Protect ``code/diff_mist.py``, ``target_model.forward`` with ``mode='sds'``: the
residual ``(ε_θ(z_t) − ε)`` is detached and contracted with the encoder latent (``grad`` through the encoder only),
``g_mode`` ``'+'`` ascends and ``'-'`` descends, with Mist's ``LinfPGDAttack`` (random start). Ours is that loop.

Arguments (pixel units /255): eps 16, step_size 1, steps 100, random_start True; t_range, prompt via ``models``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .. import diffusion
from .engine import AttackModels, PGDResult, pgd


def sds_surrogate(models: AttackModels, images: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Per-sample ``Σ r.detach() ⊙ z_0`` ``(B,)``: its gradient is the SDS direction; the UNet sees no autograd."""
    latents = models.encode(images, generators)
    timesteps, noise = models.draw(latents, generators)
    with torch.no_grad():
        noisy = diffusion.add_noise(models.scheduler, latents.detach(), noise, timesteps)
        prediction = models.predict(noisy, timesteps, tuple(images.shape[-2:]))
        residual = prediction - diffusion.training_target(models.scheduler, latents.detach(), noise, timesteps)
    return (residual * latents).flatten(1).sum(1)


def attack(images: torch.Tensor, *, models: AttackModels, generators: Sequence[torch.Generator],
           ascent: bool = True, eps: float = 16.0, step_size: float = 1.0, steps: int = 100,
           random_start: bool = True, **options: Any) -> PGDResult:
    """Run SDS± on ``images`` ``(B, 3, H, W)`` in [0, 1]; ``options`` go to :func:`engine.pgd`."""
    return pgd(images, lambda x, g: sds_surrogate(models, x, g), generators=generators, eps=eps,
               step_size=step_size, steps=steps, ascent=ascent, random_init=random_start,
               eval_fn=models.denoise_loss, **options)
