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
    """Round-trip each image ``(B, 3, H, W)`` in [0, 1] through an 8-bit lossy encoder.

    Works plane by plane in float32 and uint8 (a 16 MP photo never gets full-size float64 or duplicate float copies).
    """
    if not 1 <= int(quality) <= 100:
        raise ValueError(f"quality must be in 1..100, got {quality}")
    outputs = None  # allocated after the first encode, so the encoder's buffers and the output never coexist
    for index, image in enumerate(images):
        image = image.detach().float().cpu()
        array = np.empty((image.shape[1], image.shape[2], 3), dtype=np.uint8)
        for channel in range(3):
            scaled = np.clip(image[channel].numpy(), 0, 1, dtype=np.float32) * np.float32(255)
            array[..., channel] = np.rint(scaled, out=scaled)
            del scaled
        buffer = io.BytesIO()
        pil = Image.fromarray(array)
        del array
        pil.save(buffer, format=fmt, quality=int(quality))
        del pil
        buffer.seek(0)
        with Image.open(buffer) as encoded:
            encoded.load()
            decoded = np.asarray(encoded if encoded.mode == "RGB" else encoded.convert("RGB"))
        del buffer
        if outputs is None:
            outputs = torch.empty(images.shape, dtype=torch.float32)
        for channel in range(3):
            np.divide(decoded[..., channel], np.float32(255), out=outputs[index, channel].numpy(), dtype=np.float32,
                      casting="unsafe")
        del decoded
    if outputs is None:  # an empty batch
        return images.clone()
    return outputs.to(images.device, images.dtype)


def purify(images: torch.Tensor, *, quality: int = 75, generators: list[torch.Generator] | None = None) -> torch.Tensor:
    return compress(images, quality, "JPEG")
