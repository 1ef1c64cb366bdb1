"""LatentDiffPure (paper 001 App. C.1): DiffPure's SDEdit run in Stable Diffusion's latent space.

Noise the VAE latent to ``t`` = 300 of the 1000-step schedule, denoise the remaining part of a ``steps`` = 50-step
DDIM schedule (300, 280, …, 0) with CFG ``guidance`` 7.5 and the prompt "a photo of a {class}, clear, high
resolution, high quality, noise-free" (METHODS.md; paper 001 wrote "a photo of [class_name], high quality, highres").
Without ``--class-name`` the template falls back to the empty prompt — the paper's LatentDiffPure-∅ variant.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .regen import load_models  # noqa: F401  (same network: the SD pipeline)
from .sdedit import latent_sdedit, prompt_for

PROMPT = "a photo of a {class}, clear, high resolution, high quality, noise-free"


def purify(images: torch.Tensor, *, models, generators: Sequence[torch.Generator], t: int = 300, steps: int = 50,
           guidance: float = 7.5, prompt: str = PROMPT, class_name: str | None = None,
           **_: Any) -> tuple[torch.Tensor, list[dict]]:
    """Purify ``(B, 3, H, W)`` images in [0, 1]; also returns the prompt actually used per image."""
    text = prompt_for(prompt, class_name)
    out = latent_sdedit(models.pipe, images, t_start=t, schedule_steps=steps, prompt=text, guidance=guidance,
                        generators=generators)
    return out, [{"prompt": text}] * images.shape[0]
