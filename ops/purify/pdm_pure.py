"""PDM-Pure (Xue et al., "Pixel is a Barrier"; paper 000 [77]): SDEdit with a strong pixel-space diffusion model
(DeepFloyd IF stage II) at 256², then the SD x4 upscaler, resized back to the input size.

Defaults from the public script: prompt "a picture", seed 0 (cloaklab's per-file seeds derive from ``--seed``,
default 0), stage II guidance 7 with IF's respaced schedule "10,10,10,10,10,0,…" started 5 steps in — i.e. noise to
``t`` ≈ 444 of 1000 and ~45 denoising steps (here: ``t`` = 444, ``steps`` = 100 → stride 10), conditioned on the
64² version of the image (IF noise-augmentation level 250, diffusers' default); upscaler 50 steps, guidance 4,
noise level 20. With ``--stage2-model tiny`` stage II is the tiny unconditional pixel model (a plain pixel SDEdit:
no text, no low-res conditioning) — for tests and demos only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .models import PixelDiffusion
from .noisy_upscale import upscale_x4
from .sdedit import pixel_sdedit, resize


def load_models(*, device: Any = "cpu", dtype: Any = None, stage2_model: str = "tiny", upscaler_model: str = "tiny",
                **_: Any):
    from .models import PurifierModels, load_stage2, load_upscaler

    return PurifierModels(stage2=load_stage2(stage2_model, device, dtype),
                          upscaler=load_upscaler(upscaler_model, device, dtype))


def stage2_sdedit(stage2, images: torch.Tensor, *, t: int, steps: int, guidance: float, prompt: str,
                  resolution: int, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Stage II SDEdit of ``(B, 3, H, W)`` in [0, 1] → ``(B, 3, r, r)`` in [0, 1] at the stage's resolution."""
    if isinstance(stage2, PixelDiffusion):
        work = resize(images, (stage2.resolution, stage2.resolution)).clamp(0, 1)
        return pixel_sdedit(stage2, work, t_start=t, schedule_steps=steps, generators=generators, eta=1.0)
    original = resize(images, (resolution, resolution)).clamp(0, 1) * 2 - 1
    low = resize(images, (resolution // 4, resolution // 4)).clamp(0, 1) * 2 - 1
    out = stage2(prompt=[prompt] * images.shape[0], image=low.to(stage2.unet.dtype),
                 original_image=original.to(stage2.unet.dtype), strength=t / 1000, num_inference_steps=steps,
                 guidance_scale=guidance, generator=list(generators), output_type="pt", clean_caption=False).images
    return ((out.float() + 1) / 2).clamp(0, 1)


def purify(images: torch.Tensor, *, models, generators: Sequence[torch.Generator], t: int = 444, steps: int = 100,
           guidance: float = 7.0, prompt: str = "a picture", resolution: int = 256, upscaler_steps: int = 50,
           upscaler_guidance: float = 4.0, noise_level: int = 20, **_: Any) -> torch.Tensor:
    """PDM-Pure on ``(B, 3, H, W)`` images in [0, 1]; returns the same shape and range."""
    height, width = images.shape[-2:]
    mid = stage2_sdedit(models.stage2, images.float(), t=t, steps=steps, guidance=guidance, prompt=prompt,
                        resolution=resolution, generators=generators)
    high = upscale_x4(models.upscaler, mid, prompt=prompt, steps=upscaler_steps, guidance=upscaler_guidance,
                      noise_level=noise_level, generators=generators)
    return resize(high, (height, width)).clamp(0, 1)
