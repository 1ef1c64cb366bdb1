"""Diffusion regeneration (Zhao et al., "Invisible Image Watermarks Are Provably Removable Using Generative AI",
the WatermarkAttacker "Regen" baseline used as a defence in paper 000 Table 1).

VAE-encode (posterior mean), noise the latent to step ``t`` = 60 of SD's 1000-step schedule, and denoise the rest of
a ``steps`` = 50-step DDIM schedule from there (60, 40, 20, 0 — four UNet calls) with CFG ``guidance`` 7.5 and
prompt "" (with an empty prompt CFG is the identity, so one pass per step). Decode at the input size (rounded to a
multiple of 8 for the VAE, mapped back). Deterministic DDIM (η = 0) after the seeded noise draw.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .sdedit import latent_sdedit


def load_models(*, device: Any = "cpu", dtype: Any = None, model: str | None = None, trust_pickle: bool = False,
                **_: Any):
    from ..models import load_pipeline
    from .models import PurifierModels, quiet_loading

    with quiet_loading():
        pipe = load_pipeline(model, device, dtype, trust_pickle=trust_pickle)
    return PurifierModels(pipe=pipe)


def purify(images: torch.Tensor, *, models, generators: Sequence[torch.Generator], t: int = 60, steps: int = 50,
           guidance: float = 7.5, prompt: str = "", **_: Any) -> torch.Tensor:
    """Regenerate ``(B, 3, H, W)`` images in [0, 1]; returns the same shape and range."""
    return latent_sdedit(models.pipe, images, t_start=t, schedule_steps=steps, prompt=prompt, guidance=guidance,
                         generators=generators)
