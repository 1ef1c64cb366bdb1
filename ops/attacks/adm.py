"""AdvDM (``adm+``) and its descent twin (``adm-``).

AdvDM — Liang et al., "Adversarial Example Does Good: Preventing Painting Imitation from Diffusion Models via
Adversarial Examples", ICML 2023; paper 000 Eq. 4 and App. F (ADM−). Objective on x' = x + δ:

    adm+:  max_δ  E_{t,ε} ‖ε_θ(z'_t, t, c) − ε‖²      adm−:  min_δ  (the same),   z'_0 = s·E(x'),

one Monte-Carlo draw of (t, ε) per image per step (t ~ U[0, 1000) unless ``t_range``), L∞ PGD with sign steps.
The target follows the model's prediction type (ε, v or flow; :func:`ops.diffusion.training_target`).

Reference code: paper 000 made ADM+ as Mist v1's mode 0 (psyker-team/mist ``mist_v3.py``, ``target_model.forward``
returns ``−loss_semantic`` and ``infer`` runs advertorch's targeted ``LinfPGDAttack``, i.e. ascent on the mean
ε-MSE, with its default ``rand_init=True``); Diff-Protect (xavihart/Diff-Protect ``code/diff_mist.py``,
``target_model.forward``, ``g_mode='+'``/``'-'``) is the same loop with ``'-'`` the descent twin. We follow them:
uniform random start in the ε-ball, sign steps, projection to the ball and [0, 1]. Differences: latents are the VAE
posterior mean (LDM's ``get_first_stage_encoding`` samples; ``latent_sample`` in set-level runs does too).

Arguments (pixel units /255): eps 16, step_size 1, steps 100, random_start True, t_range None, prompt "a photo"
(the condition c; our choice — AdvDM attacks the textual-inversion prompt, which does not exist before training).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .engine import AttackModels, PGDResult, pgd


def attack(images: torch.Tensor, *, models: AttackModels, generators: Sequence[torch.Generator],
           ascent: bool = True, eps: float = 16.0, step_size: float = 1.0, steps: int = 100,
           random_start: bool = True, **options: Any) -> PGDResult:
    """Run AdvDM on ``images`` ``(B, 3, H, W)`` in [0, 1]; ``ascent=False`` is ``adm-``.

    ``options`` go to :func:`engine.pgd` (``mask``, ``eot``, ``eot_samples``, ``grad_transform``,
    ``delta_transform``, ``on_step``).
    """
    return pgd(images, models.denoise_loss, generators=generators, eps=eps, step_size=step_size, steps=steps,
               ascent=ascent, random_init=random_start, **options)
