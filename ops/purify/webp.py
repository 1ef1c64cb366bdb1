"""WebP compression as a purifier (paper 004 robustness study): Pillow encode → decode, quality 75 by default."""

from __future__ import annotations

import torch

from .jpeg import compress


def purify(images: torch.Tensor, *, quality: int = 75, generators: list[torch.Generator] | None = None) -> torch.Tensor:
    return compress(images, quality, "WEBP")
