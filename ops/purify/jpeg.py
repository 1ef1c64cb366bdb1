"""JPEG compression as a purifier (paper 000 §4.4, paper 001 App. C.1): encode with Pillow, decode, keep the result.

Default quality 75 (DiffShortcut/MetaCloak evaluation); Safe-Zone Training uses 25. Pillow's defaults otherwise
(4:2:0 chroma subsampling, standard tables), so the output equals ``Image.open(save(x, "JPEG", quality=q))``.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image


def compress(images: torch.Tensor, quality: int, fmt: str = "JPEG") -> torch.Tensor:
    """Round-trip each image ``(B, 3, H, W)`` in [0, 1] through an 8-bit lossy encoder."""
    if not 1 <= int(quality) <= 100:
        raise ValueError(f"quality must be in 1..100, got {quality}")
    outputs = []
    for image in images:
        array = np.rint(image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format=fmt, quality=int(quality))
        buffer.seek(0)
        decoded = np.asarray(Image.open(buffer).convert("RGB"), dtype=np.float32) / 255.0
        outputs.append(torch.from_numpy(decoded).permute(2, 0, 1))
    return torch.stack(outputs).to(images.device, images.dtype)


def purify(images: torch.Tensor, *, quality: int = 75, generators: list[torch.Generator] | None = None) -> torch.Tensor:
    return compress(images, quality, "JPEG")
