"""PixelDiffPure (Nie et al., "Diffusion Models for Adversarial Purification", ICML 2022; paper 001 App. C.1).

Resize to the pixel model's resolution (256 for guided-diffusion's ImageNet ``256x256_diffusion_uncond`` that paper
001 used; our default Hub model ``google/ddpm-ema-celebahq-256`` is 256² too), noise to ``t`` = 100 of 1000, run the
DDPM ancestral reverse process (η = 1, the discretized reverse SDE) over every step (``steps`` = 1000; fewer steps =
DDIM-like stride, faster), resize back to the input size.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .sdedit import pixel_sdedit


def load_models(*, device: Any = "cpu", dtype: Any = None, pixel_model: str = "tiny", **_: Any):
    from .models import PurifierModels, load_pixel_model

    return PurifierModels(pixel=load_pixel_model(pixel_model, device, dtype))


def purify(images: torch.Tensor, *, models, generators: Sequence[torch.Generator], t: int = 100, steps: int = 1000,
           eta: float = 1.0, resolution: int | None = None, **_: Any) -> torch.Tensor:
    """Purify ``(B, 3, H, W)`` images in [0, 1]; returns the same shape and range."""
    return pixel_sdedit(models.pixel, images, t_start=t, schedule_steps=steps, generators=generators, eta=eta,
                        resolution=resolution)
