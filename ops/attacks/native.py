"""A photo's native pixels ↔ an attack's working grid, and the budget on the stored integers: library code shared
by ``cloak poison``'s folder run (:mod:`ops.commands.poison`) and the single-image :func:`ops.images.poison_image`.

* :func:`working_size` — short side ``resolution`` (512 for SD 1.x), aspect kept, both sides multiples of 8
  (``resolution=0``: the native size rounded to multiples of 8);
* :func:`native_applies` — single-image attacks on a photo larger than that (both sides) optimize ``δ`` in the
  photo's own pixels through a mimic's resize (:class:`ops.attacks.resample.NativeView`); ``lf-*`` (a DCT low-pass
  defined on the working grid), ``da`` (an L2 budget defined at the working size) and set-level attacks do not;
* :func:`resize` / :func:`to_native` — otherwise the photo is resized to the working size (bicubic, antialiased
  when shrinking), attacked there, and ``δ = x' − x`` is mapped back to the native size (bicubic) and added;
* :func:`native_mask` / :func:`working_mask` — ``--mask`` at the photo's size and on the working grid;
* :func:`project_stored`: ``|q(x') − q(x)| ≤ ⌊ε⌋`` per stored sample (ε in /255 units; ``ε·257`` levels for
  16-bit images), so the PNG holds the budget exactly (not ε+1 as Mist admits).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..io import LoadedImage

WORKING_SIZE_ONLY = ("da",)  # budgets/transforms defined on the working grid: never optimized at native size


def native_applies(spec: Any, native_shape: Sequence[int], work_shape: Sequence[int]) -> bool:
    """Whether a photo is optimized at its own size: single-image attack, not ``lf-*``/``da``, photo larger than the
    working size on both sides."""
    return (not spec.set_level and spec.base is None and spec.name not in WORKING_SIZE_ONLY
            and native_shape[0] > work_shape[0] and native_shape[1] > work_shape[1])


# ------------------------------------------------------------------------------------------- geometry
def working_size(height: int, width: int, resolution: int) -> tuple[int, int]:
    """``(h, w)`` with the short side ≈ ``resolution``, aspect kept, both multiples of 8 (≥ 8)."""
    scale = 1.0 if resolution <= 0 else resolution / min(height, width)
    return (max(8, int(height * scale / 8 + 0.5) * 8), max(8, int(width * scale / 8 + 0.5) * 8))


def resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic resize of ``(B, C, H, W)`` (antialiased when shrinking); identity when the size matches."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    shrinking = size[0] < images.shape[-2] or size[1] < images.shape[-1]
    return F.interpolate(images, size=size, mode="bicubic", align_corners=False, antialias=shrinking)


def to_native(adversarial: torch.Tensor, clean_working: torch.Tensor, clean_native: torch.Tensor,
              mask_native: torch.Tensor | None = None) -> torch.Tensor:
    """Map a working-resolution result back: native + resized perturbation, zeroed outside the mask, in [0, 1]."""
    delta = resize((adversarial - clean_working)[None].float(), tuple(clean_native.shape[-2:]))[0]
    if mask_native is not None:
        delta = delta * mask_native
    return (clean_native + delta).clamp(0, 1)


def project_stored(rgb: torch.Tensor, like: LoadedImage, eps: float) -> torch.Tensor:
    """``rgb`` ``(3, H, W)`` moved so that its quantization differs from the input's by at most ⌊ε⌋ levels.

    Works on the integer values :func:`ops.io.quantize` will store (8 or 16 bit), so the budget holds on the PNG.
    """
    scale = like.max_value
    levels = math.floor(eps * scale / 255 + 1e-9)
    clean = torch.from_numpy(np.rint(like.rgb.double().numpy() * scale))
    stored = torch.round(rgb.double().cpu().clamp(0, 1) * scale)
    stored = torch.minimum(torch.maximum(stored, clean - levels), clean + levels).clamp(0, scale)
    return (stored / scale).float()


# ----------------------------------------------------------------------------------------------- masks
def native_mask(path: Path, size: tuple[int, int]) -> torch.Tensor:
    """Binary ``(1, H, W)`` mask (white = perturb) at the photo's ``(H, W)`` (nearest if the sizes differ)."""
    from ..masks import read_mask

    mask = torch.from_numpy(read_mask(path).astype(np.float32))[None, None]
    if tuple(mask.shape[-2:]) != tuple(size):
        mask = F.interpolate(mask, size=size, mode="nearest")
    return mask[0]


def working_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Working-resolution mask: a cell is free if any of its native pixels is (the native mask cuts the rest)."""
    return (F.interpolate(mask[None], size=size, mode="area")[0] > 0).float()
