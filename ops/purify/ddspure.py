"""DDSPure: diffusion denoised smoothing (Carlini et al., "(Certified!!) Adversarial Robustness for Free!", ICLR 2023)
as a purifier (paper 001 App. C.1).

Pick the step whose noise level matches the perturbation radius σ: ``(1 − ᾱ_t*) / ᾱ_t* = σ²`` — the nearest ``t`` in
the model's **own** 1000-step training schedule (public code indexes a respaced schedule with this ``t``, which is a
different noise level), clipped to [0, T − 1] — then one SDEdit from ``t*`` (pixel model, resize to its resolution
and back). σ is given on the 0–255 scale (default 11, the budget of the perturbations paper 001 attacks) and
converted to the model's [-1, 1] data scale (× 2/255), where the equation holds. ``steps`` sets the reverse stride
(1000 = every step, DDPM η = 1; Carlini et al.'s one-shot denoiser is ``--steps 1``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..diffusion import num_train_timesteps
from .diffpure_pixel import load_models  # noqa: F401  (same network: the pixel model)
from .sdedit import pixel_sdedit


def dds_timestep(scheduler, sigma_255: float) -> int:
    """t* = argmin_t |(1 − ᾱ_t)/ᾱ_t − σ²| over the model's 1000-step schedule, σ = 2·sigma_255/255 ([-1, 1] scale)."""
    sigma = 2.0 * float(sigma_255) / 255.0
    alpha_bar = scheduler.alphas_cumprod.double()[: num_train_timesteps(scheduler)]
    ratio = (1 - alpha_bar) / alpha_bar
    return int(torch.argmin((ratio - sigma**2).abs()).clamp(0, len(alpha_bar) - 1))


def purify(images: torch.Tensor, *, models, generators: Sequence[torch.Generator], sigma: float = 11.0,
           steps: int = 1000, eta: float = 1.0, resolution: int | None = None,
           **_: Any) -> tuple[torch.Tensor, list[dict]]:
    """Purify ``(B, 3, H, W)`` images in [0, 1]; also returns the chosen ``t*`` per image."""
    t_star = dds_timestep(models.pixel.scheduler, sigma)
    out = pixel_sdedit(models.pixel, images, t_start=t_star, schedule_steps=steps, generators=generators, eta=eta,
                       resolution=resolution)
    return out, [{"t_star": t_star}] * images.shape[0]
