"""LatentDiffPure (paper 001 App. C.1): DiffPure's SDEdit run in Stable Diffusion's latent space.

Reference: DiffShortcut ``diffshortcut/defenses/diffpure_main.py``, ``diffpure_denoise``: the latent is a VAE
posterior *sample* (``latent_dist.sample()``), noised to ``opt_t`` = 300 with ``DDPMScheduler.add_noise``, then
denoised by ``DDPMScheduler.step`` over ``set_timesteps(timesteps=list(range(opt_t, -1, -1)))`` — stochastic DDPM
ancestral steps (posterior variance β̃, ``fixed_small``) on every step 300, 299, …, 0 (301 UNet calls), CFG 7.5,
prompt "a photo of a {class_name}, clear, high resolution, high quality, noise-free" (``--empty_condition``: "").
Our defaults match: ``steps`` 1000 (stride 1 in the 1000-step schedule), ``eta`` 1 (generalized DDIM with η = 1 on
consecutive steps is exactly the DDPM posterior, :func:`.sdedit.reverse_step`), posterior-sample encoding; every
draw comes from the image's own generator (the run's seed). The last step returns the clean estimate x̂0, as
``DDPMScheduler.step`` at t = 0 does.

Variant (option): ``steps=50, eta=0`` is the deterministic DDIM/ODE form cloaklab used before (300, 280, …, 0;
16 UNet calls; posterior-mean encoding, so it is fully deterministic; paper 001's text describes no sampler).
Without ``--class-name`` the template falls back to the empty prompt — the paper's LatentDiffPure-∅ variant (the
release defaults the class to "person"). Where we differ: the release resizes/centre-crops to 512² first and draws
from the global RNG seeded once with 0; we work at the input size (multiple of 8) with per-image generators.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .regen import load_models  # noqa: F401  (same network: the SD pipeline)
from .sdedit import latent_sdedit, prompt_for

PROMPT = "a photo of a {class}, clear, high resolution, high quality, noise-free"


def purify(images: torch.Tensor, *, models, generators: Sequence[torch.Generator], t: int = 300, steps: int = 1000,
           guidance: float = 7.5, prompt: str = PROMPT, class_name: str | None = None, eta: float = 1.0,
           **_: Any) -> tuple[torch.Tensor, list[dict]]:
    """Purify ``(B, 3, H, W)`` images in [0, 1]; also returns the prompt actually used per image."""
    text = prompt_for(prompt, class_name)
    out = latent_sdedit(models.pipe, images, t_start=t, schedule_steps=steps, prompt=text, guidance=guidance,
                        generators=generators, eta=eta, posterior_sample=eta > 0)
    return out, [{"prompt": text}] * images.shape[0]
