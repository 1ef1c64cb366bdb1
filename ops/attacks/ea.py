"""PhotoGuard's encoder attack (``ea``) and the targets of the targeted attacks (ea, mist, da).

Salman et al., "Raising the Cost of Malicious AI-Powered Image Editing", ICML 2023; paper 000 Eq. 5:

    min_δ ‖E(x + δ) − E(x_target)‖²      (scaled VAE latents, posterior mean; L∞ PGD with sign steps)

Defaults (pixel units /255): eps 16, step_size 1, steps 100 (paper 000 App. F), target ``pattern``, random start
(paper 000 ran EA as Mist v1's mode 1, psyker-team/mist ``mist_v3.py`` ``infer``: ``LinfPGDAttack`` with its
default ``rand_init=True``). PhotoGuard's own encoder attack (MadryLab/photoguard notebook ``pgd``) starts from a
uniform draw as well and takes ``‖E(x') − z_target‖₂``; with sign steps any per-image monotone reduction (norm, sum,
mean) gives the same step, so we take the mean.

Targets (``--target``): ``pattern`` — our own high-contrast periodic image (see :func:`contrast_pattern`; paper 000
used the "MIST" image of the Mist library as a better target than gray, which we may not copy), ``gray`` (0.5
everywhere), ``zero`` (black, 0 everywhere), or the path of an image (resized to the working size, bicubic).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import UsageError
from .engine import AttackModels, PGDResult, pgd

TARGET_KINDS = ("pattern", "gray", "zero")


def contrast_pattern(height: int, width: int, period: int = 32) -> torch.Tensor:
    """A high-contrast periodic target ``(3, H, W)`` in {0, 1}: a checkerboard of ``period``-pixel cells overlaid
    with concentric rings and diagonal stripes, each colour channel phase-shifted so edges of all orientations,
    several spatial frequencies and saturated colours are present (a strong, content-free latent to pull toward).
    Deterministic; no randomness, no external data."""
    y = torch.arange(height, dtype=torch.float64)[:, None]
    x = torch.arange(width, dtype=torch.float64)[None, :]
    cells = torch.sign(torch.sin(2 * math.pi * (x + 0.5) / period) * torch.sin(2 * math.pi * (y + 0.5) / period))
    radius = torch.sqrt((x - width / 2) ** 2 + (y - height / 2) ** 2)
    channels = []
    for shift in (0.0, 2 * math.pi / 3, 4 * math.pi / 3):
        rings = torch.sin(2 * math.pi * radius / (period / 2) + shift)
        stripes = torch.sin(2 * math.pi * (x + y) / (period / 4) + shift)
        channels.append(((cells + rings + 0.5 * stripes) > 0).double())
    return torch.stack(channels).float()


def make_target(target: str, height: int, width: int) -> torch.Tensor:
    """``(3, H, W)`` target image in [0, 1] for ``--target pattern|gray|zero|PATH``."""
    if target == "pattern":
        return contrast_pattern(height, width)
    if target == "gray":
        return torch.full((3, height, width), 0.5)
    if target == "zero":
        return torch.zeros(3, height, width)
    path = Path(target)
    if not path.is_file():
        raise UsageError(f"--target {target!r} is neither {', '.join(TARGET_KINDS)} nor an image file")
    from ..errors import RejectedInput
    from ..io import read_image

    try:
        image = read_image(path).rgb
    except RejectedInput as exc:
        raise UsageError(f"--target {target}: {exc}") from None
    return F.interpolate(image[None], size=(height, width), mode="bicubic", align_corners=False)[0].clamp(0, 1)


def encoder_distance(models: AttackModels, images: torch.Tensor, target_latents: torch.Tensor,
                     reduction: str = "mean") -> torch.Tensor:
    """Per-sample ``‖E(x) − z_target‖²`` ``(B,)``, averaged (``"mean"``) or summed (``"sum"``: Mist v1's
    ``nn.MSELoss(reduction="sum")``) over the latent's elements."""
    squared = (models.encode(images) - target_latents).pow(2).flatten(1)
    if reduction == "sum":
        return squared.sum(1)
    if reduction == "mean":
        return squared.mean(1)
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


def attack(images: torch.Tensor, *, models: AttackModels, generators: Sequence[torch.Generator],
           targets: torch.Tensor, eps: float = 16.0, step_size: float = 1.0, steps: int = 100,
           random_start: bool = True, **options: Any) -> PGDResult:
    """Pull the latents of ``images`` ``(B, 3, H, W)`` toward those of ``targets`` (same shape), descending."""
    with torch.no_grad():
        target_latents = models.encode(targets.to(images.device))
    return pgd(images, lambda x, g: encoder_distance(models, x, target_latents), generators=generators, eps=eps,
               step_size=step_size, steps=steps, ascent=False, random_init=random_start, **options)
