"""Noisy upscaling (Hönig et al., "Adversarial Perturbations Cannot Reliably Protect Artists From Generative AI",
robust-style-mimicry): add Gaussian noise, then let the Stable Diffusion x4 upscaler remove it.

Defaults from the public scripts: noise std ``noise`` = 0.05 (fraction of the [0, 1] range; skimage
``random_noise`` with clipping), upscaler noise level ``noise_level`` = 320 (≤ its maximum 350), 75 steps,
guidance 9 (the upscaler's defaults), prompt "" (they used per-image captions: pass ``--prompt``).
Approximation: the public code upscales the full image (output 4× larger); to keep the input's size we first
downscale to 1/4 (the noise is added at that size, i.e. at the upscaler's input, as there) and upscale back.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .sdedit import pad_to_multiple, per_image_noise, resize


def load_models(*, device: Any = "cpu", dtype: Any = None, upscaler_model: str = "tiny", **_: Any):
    from .models import PurifierModels, load_upscaler

    return PurifierModels(upscaler=load_upscaler(upscaler_model, device, dtype))


def low_resolution(size: tuple[int, int]) -> tuple[int, int]:
    """The x4 upscaler's input size for an output of ``size`` (at least 8 px per side)."""
    return tuple(max(8, round(side / 4)) for side in size)  # type: ignore[return-value]


def upscale_x4(upscaler, low: torch.Tensor, *, prompt: str, steps: int, guidance: float, noise_level: int,
               generators: Sequence[torch.Generator]) -> torch.Tensor:
    """SD x4 upscaler on ``(B, 3, h, w)`` in [0, 1] → ``(B, 3, 4h, 4w)`` in [0, 1] (padded to multiples of 8 for the
    UNet and cropped back)."""
    height, width = low.shape[-2:]
    padded = pad_to_multiple(low.clamp(0, 1), 8)
    out = upscaler(prompt=[prompt] * low.shape[0], image=padded.to(upscaler.unet.dtype), num_inference_steps=steps,
                   guidance_scale=guidance, noise_level=int(noise_level), generator=list(generators),
                   output_type="pt").images
    return out.float()[..., : 4 * height, : 4 * width].clamp(0, 1)


def purify(images: torch.Tensor, *, models, generators: Sequence[torch.Generator], noise: float = 0.05,
           noise_level: int = 320, steps: int = 75, guidance: float = 9.0, prompt: str = "",
           **_: Any) -> torch.Tensor:
    """Noisy-upscale ``(B, 3, H, W)`` images in [0, 1]; returns the same shape and range."""
    height, width = images.shape[-2:]
    low = resize(images, low_resolution((height, width))).clamp(0, 1)
    low = (low + noise * per_image_noise(low.shape[1:], generators, low)).clamp(0, 1)
    high = upscale_x4(models.upscaler, low, prompt=prompt, steps=steps, guidance=guidance, noise_level=noise_level,
                      generators=generators)
    return resize(high, (height, width)).clamp(0, 1)
