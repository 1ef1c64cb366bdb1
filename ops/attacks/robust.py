"""Robust variants (``--robust jpeg,resize,blur``): expectation over transformations (EoT) inside the loss.

EoT (Athalye et al. 2018): each PGD step differentiates ``E_T L(T(x'))``, estimated with ``eot_samples`` draws of a
random differentiable transform ``T``; per image and draw, one of the requested transforms is chosen uniformly and
its parameters drawn from that image's generator (so batching never changes the draws).

* ``jpeg`` — :func:`diff_jpeg`, a differentiable JPEG of our own, modelled on libjpeg/Pillow's baseline encoder:
  JFIF RGB→YCbCr, 4:2:0 chroma subsampling (2×2 mean), 8×8 orthonormal block DCT-II, quantization with the IJG
  standard tables scaled by quality (the libjpeg formula), rounding, dequantization, IDCT, bilinear chroma
  upsampling (libjpeg's "fancy" triangle filter ≈ bilinear), YCbCr→RGB. Rounding uses the straight-through form of
  Shin & Song's approximation ("JPEG-resistant adversarial images", 2017): the forward pass rounds exactly, the
  backward pass uses the derivative of ``⌊x⌉ + (x − ⌊x⌉)³``. Quality per draw ~ U{50..90} (``quality`` fixes it).
* ``resize`` — bilinear (antialiased) down-scaling by a factor ~ U[0.5, 1) and back up: what platforms do.
* ``blur`` — Gaussian blur, kernel 5, σ ~ U[0.5, 1.5].
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..errors import UsageError
from .lowfreq import dct_matrix

ROBUST_TRANSFORMS = ("jpeg", "resize", "blur")

# ITU-T T.81 Annex K tables (the IJG defaults): luminance and chrominance.
_LUMA = [16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
         14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
         49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99]
_CHROMA = [17, 18, 24, 47, 99, 99, 99, 99, 18, 21, 26, 66, 99, 99, 99, 99, 24, 26, 56, 99, 99, 99, 99, 99,
           47, 66, 99, 99, 99, 99, 99, 99] + [99] * 32


def quant_table(quality: int, chroma: bool = False) -> torch.Tensor:
    """The ``(8, 8)`` quantization table libjpeg uses at ``quality`` (1-100)."""
    quality = int(min(100, max(1, quality)))
    scale = 5000 / quality if quality < 50 else 200 - 2 * quality
    base = torch.tensor(_CHROMA if chroma else _LUMA, dtype=torch.float64).reshape(8, 8)
    return ((base * scale + 50) / 100).floor().clamp(1, 255).float()


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    rounded = torch.round(x)
    smooth = rounded.detach() + (x - rounded.detach()) ** 3
    return smooth + (rounded - smooth).detach()


def _blocks_roundtrip(plane: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """8×8 block DCT → quantize/round → dequantize → IDCT of a ``(B, H, W)`` plane (H, W multiples of 8)."""
    batch, height, width = plane.shape
    blocks = plane.reshape(batch, height // 8, 8, width // 8, 8).permute(0, 1, 3, 2, 4)
    basis = dct_matrix(8, plane.device, plane.dtype)
    coefficients = basis @ blocks @ basis.T
    table = table.to(plane.device, plane.dtype)
    restored = basis.T @ (_round_ste(coefficients / table) * table) @ basis
    return restored.permute(0, 1, 3, 2, 4).reshape(batch, height, width)


def diff_jpeg(images: torch.Tensor, quality: int = 75) -> torch.Tensor:
    """Differentiable JPEG encode→decode of ``(B, 3, H, W)`` in [0, 1] (4:2:0, IJG tables); same shape out."""
    batch, _, height, width = images.shape
    pad_h, pad_w = (-height) % 16, (-width) % 16
    x = F.pad(images, (0, pad_w, 0, pad_h), mode="replicate") * 255
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    luma = 0.299 * r + 0.587 * g + 0.114 * b
    cb = -0.168736 * r - 0.331264 * g + 0.5 * b + 128
    cr = 0.5 * r - 0.418688 * g - 0.081312 * b + 128
    luma = _blocks_roundtrip(luma - 128, quant_table(quality)) + 128
    chroma = F.avg_pool2d(torch.stack([cb, cr], 1), 2)
    table = quant_table(quality, chroma=True)
    chroma = torch.stack([_blocks_roundtrip(chroma[:, i] - 128, table) + 128 for i in range(2)], 1)
    chroma = F.interpolate(chroma, scale_factor=2, mode="bilinear", align_corners=False)
    cb, cr = chroma[:, 0] - 128, chroma[:, 1] - 128
    rgb = torch.stack([luma + 1.402 * cr, luma - 0.344136 * cb - 0.714136 * cr, luma + 1.772 * cb], 1)
    return (rgb[:, :, :height, :width] / 255).clamp(0, 1)


def _rand(generator: torch.Generator) -> float:
    return float(torch.rand((), generator=generator))


def _gaussian_blur(image: torch.Tensor, sigma: float, kernel: int = 5) -> torch.Tensor:
    offsets = torch.arange(kernel, dtype=image.dtype, device=image.device) - kernel // 2
    weights = torch.exp(-offsets**2 / (2 * sigma**2))
    weights = weights / weights.sum()
    padded = F.pad(image, (kernel // 2,) * 4, mode="reflect")
    rows = F.conv2d(padded, weights.view(1, 1, 1, -1).expand(3, 1, 1, -1), groups=3)
    return F.conv2d(rows, weights.view(1, 1, -1, 1).expand(3, 1, -1, 1), groups=3)


def _resize_roundtrip(image: torch.Tensor, factor: float) -> torch.Tensor:
    height, width = image.shape[-2:]
    small = (max(8, round(height * factor)), max(8, round(width * factor)))
    down = F.interpolate(image, size=small, mode="bilinear", antialias=True, align_corners=False)
    return F.interpolate(down, size=(height, width), mode="bilinear", align_corners=False)


def apply_transform(name: str, image: torch.Tensor, generator: torch.Generator, quality: int | None = None
                    ) -> torch.Tensor:
    """One random draw of transform ``name`` on a single image ``(1, 3, H, W)``."""
    if name == "jpeg":
        return diff_jpeg(image, quality if quality is not None else 50 + int(_rand(generator) * 41))
    if name == "resize":
        return _resize_roundtrip(image, 0.5 + 0.5 * _rand(generator))
    if name == "blur":
        return _gaussian_blur(image, 0.5 + _rand(generator))
    raise UsageError(f"unknown --robust transform {name!r}; choose from {', '.join(ROBUST_TRANSFORMS)}")


def parse_robust(text: str | None) -> list[str]:
    """``"jpeg,resize"`` → ``["jpeg", "resize"]`` (validated); empty/None/"none" → ``[]``."""
    if not text or text.strip().lower() == "none":
        return []
    names = [part.strip().lower() for part in text.split(",") if part.strip()]
    for name in names:
        if name not in ROBUST_TRANSFORMS:
            raise UsageError(f"--robust {text!r}: unknown transform {name!r}; choose from "
                             f"{', '.join(ROBUST_TRANSFORMS)} (comma-separated)")
    return list(dict.fromkeys(names))


def make_eot(names: Sequence[str], quality: int | None = None):
    """The engine's ``eot(x, generators) -> x'`` for ``names`` (``None`` when empty)."""
    names = list(names)
    if not names:
        return None

    def eot(images: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
        out = []
        for image, generator in zip(images, generators):
            name = names[min(len(names) - 1, int(_rand(generator) * len(names)))]
            out.append(apply_transform(name, image[None], generator, quality)[0])
        return torch.stack(out)

    return eot
