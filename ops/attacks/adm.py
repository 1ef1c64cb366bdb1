"""AdvDM (``adm+``) and its descent twin (``adm-``).

AdvDM — Liang et al., "Adversarial Example Does Good: Preventing Painting Imitation from Diffusion Models via
Adversarial Examples", ICML 2023; paper 000 Eq. 4 and App. F (ADM−). Objective on x' = x + δ:

    adm+:  max_δ  E_{t,ε} ‖ε_θ(z'_t, t, c) − ε‖²      adm−:  min_δ  (the same),   z'_0 = s·E(x'),

one Monte-Carlo draw of (t, ε) per image per step (t ~ U[0, 1000) unless ``t_range``), L∞ PGD with sign steps.
The target follows the model's prediction type (ε, v or flow; :func:`ops.diffusion.training_target`).

Arguments (pixel units /255): eps 16, step_size 1, steps 100, random_start False, t_range None, prompt "a photo"
(the condition c; our choice — AdvDM attacks the textual-inversion prompt, which does not exist before training).
"""

from __future__ import annotations

from typing import Sequence

import torch

from typing import Any

from .engine import AttackModels, PGDResult, pgd


def attack(images: torch.Tensor, *, models: AttackModels, generators: Sequence[torch.Generator],
           ascent: bool = True, eps: float = 16.0, step_size: float = 1.0, steps: int = 100,
           random_start: bool = False, **options: Any) -> PGDResult:
    """Run AdvDM on ``images`` ``(B, 3, H, W)`` in [0, 1]; ``ascent=False`` is ``adm-``.

    ``options`` go to :func:`engine.pgd` (``mask``, ``eot``, ``eot_samples``, ``grad_transform``,
    ``delta_transform``, ``on_step``).
    """
    return pgd(images, models.denoise_loss, generators=generators, eps=eps, step_size=step_size, steps=steps,
               ascent=ascent, random_init=random_start, **options)
