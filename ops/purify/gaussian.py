"""Gaussian blur purifier, as DiffShortcut ran it (paper 001 App. C.1).

Reference: DiffShortcut ``diffshortcut/defenses/gau.py``, ``gaussian_smooth_image``: ``img.filter(
ImageFilter.GaussianBlur(radius=kernel_size))`` with ``kernel_size`` 5 (``scripts/sub/defense/gau.sh``). Pillow's
``radius`` is the standard deviation σ in pixels (not a kernel half-width), so the published row is a σ = 5 blur
with Pillow's own kernel extent (its extended-box approximation of a Gaussian). We call Pillow itself, so the output
equals DiffShortcut's on the same 8-bit image.

Where we differ: the input batch is float in [0, 1]; each image is rounded to 8 bits first (Pillow blurs only 8-bit
images; the reference read 8-bit PNGs anyway), so a float input gets 8-bit precision out; ``sigma`` must be
> 0 (issue 17: 0 is a usage error, not a silent no-op). ``sigma`` (= Pillow's ``radius``) may be set to another
value; there is no kernel-size
parameter (Pillow derives the extent from σ).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageFilter

DIFFSHORTCUT_SIGMA = 5.0


def purify(images: torch.Tensor, *, sigma: float = DIFFSHORTCUT_SIGMA,
           generators: list[torch.Generator] | None = None) -> torch.Tensor:
    """Blur ``(B, 3, H, W)`` images in [0, 1] with Pillow's ``GaussianBlur(radius=sigma)``; returns the same shape."""
    if not sigma > 0:
        raise ValueError(f"--sigma (Pillow's GaussianBlur radius) must be > 0, got {sigma}")
    # One 8-bit plane at a time, written straight into the output (Pillow blurs each band independently, so this
    # equals blurring the RGB image; a 12 MP photo stays within the runner's memory budget, issue 17 §4).
    out = torch.empty(images.shape, dtype=torch.float32)
    for index, image in enumerate(images):
        for channel, plane in enumerate(image.detach()):
            scaled = plane.float().clamp(0, 1).cpu().numpy() * np.float32(255)
            pixels = np.rint(scaled, out=scaled).astype(np.uint8)
            del scaled
            blurred = Image.fromarray(pixels, "L").filter(ImageFilter.GaussianBlur(radius=sigma))
            np.divide(np.asarray(blurred), np.float32(255), out=out[index, channel].numpy(), dtype=np.float32,
                      casting="unsafe")
    return out.to(images.device, images.dtype)
