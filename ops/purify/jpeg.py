"""JPEG compression as a purifier (paper 000 §4.4, paper 001 App. C.1): encode with Pillow, decode, keep the result.

Default quality 75 (DiffShortcut/MetaCloak evaluation); Safe-Zone Training uses 25. Pillow's defaults otherwise
(4:2:0 chroma subsampling, standard tables), so the output equals ``Image.open(save(x, "JPEG", quality=q))``.

``jpeg_scale=S`` applies the JPEG step at another resolution: Pillow bicubic resize so the *short side* is S (aspect
kept), encode → decode, Pillow bicubic back to the input size. Paper 000 (§5.2.4) compresses 512-px photos; on
64-px toy images an 8×8 block is an eighth of the image, so ``jpeg_scale=512`` gives the toy world the paper's
block-to-object ratio (issue 19 §3). ``None`` (default) compresses at the image's own size.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image


def round_trip(image: Image.Image, quality: int, fmt: str = "JPEG", scale: int | None = None) -> Image.Image:
    """One 8-bit RGB Pillow image through the lossy encoder (at short side ``scale`` when given, then back)."""
    if not 1 <= int(quality) <= 100:
        raise ValueError(f"quality must be in 1..100, got {quality}")
    if scale is not None and int(scale) < 8:
        raise ValueError(f"jpeg scale must be >= 8 px, got {scale}")
    size = image.size
    if scale is not None:
        factor = int(scale) / min(size)
        image = image.resize((max(1, round(size[0] * factor)), max(1, round(size[1] * factor))), Image.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, quality=int(quality))
    decoded = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    return decoded.resize(size, Image.BICUBIC) if scale is not None else decoded


def compress(images: torch.Tensor, quality: int, fmt: str = "JPEG", scale: int | None = None) -> torch.Tensor:
    """Round-trip each image ``(B, 3, H, W)`` in [0, 1] through an 8-bit lossy encoder (at short side ``scale`` and
    back when given: :func:`round_trip`).

    Works plane by plane in float32 and uint8 (a 16 MP photo never gets full-size float64 or duplicate float copies).
    """
    if not 1 <= int(quality) <= 100:
        raise ValueError(f"quality must be in 1..100, got {quality}")
    if scale is not None:
        return _compress_at_scale(images, quality, fmt, scale)
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


def _compress_at_scale(images: torch.Tensor, quality: int, fmt: str, scale: int) -> torch.Tensor:
    outputs = []
    for image in images:
        array = np.rint(image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).astype(np.uint8)
        decoded = np.asarray(round_trip(Image.fromarray(array), quality, fmt, scale), dtype=np.float32) / 255.0
        outputs.append(torch.from_numpy(np.ascontiguousarray(decoded)).permute(2, 0, 1))
    return torch.stack(outputs).to(images.device, images.dtype)


def purify(images: torch.Tensor, *, quality: int = 75, jpeg_scale: int | None = None,
           generators: list[torch.Generator] | None = None) -> torch.Tensor:
    return compress(images, quality, "JPEG", jpeg_scale)
