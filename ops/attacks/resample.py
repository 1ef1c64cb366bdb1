"""Native-size protection: the differentiable resize a mimic's training script applies, as the model's view.

A photo is usually larger than the size a model trains at; every fine-tuning script shrinks it first (diffusers'
``train_dreambooth.py``/``train_text_to_image.py``: ``transforms.Resize(resolution, BILINEAR)`` + ``CenterCrop`` or
``RandomCrop``; kohya's sd-scripts: cv2 ``INTER_AREA`` to a bucket, then a centre or random crop; many people simply
PIL-resize with BICUBIC or LANCZOS). A perturbation optimized at the working size and upsampled onto the photo loses
most of its effect on that trip back down. With :class:`NativeView` installed on
:class:`ops.attacks.engine.AttackModels` (``models.view``), the attack optimizes ``δ`` in the photo's own pixels and
every image the model encodes first goes through one random draw of that chain, per image and from the image's own
generator (expectation over transformations, Athalye et al. 2018):

* a resampling filter, uniform over ``filters`` — PIL's ``bilinear`` (triangle), ``bicubic`` (Keys, a = −0.5),
  ``lanczos`` (Lanczos-3) and ``area`` (PIL's box filter, ≈ cv2 ``INTER_AREA``), each antialiased as PIL does: the
  kernel is stretched by the shrink factor, so every native pixel under it contributes;
* a crop (``crop_probability``, default 0 — see below): the whole photo (a resize to exactly the working size), or
  with that probability a window ``1/u`` of the photo per side, ``u ~ U[1, 1 + jitter]``, at a random position —
  a random crop plus a small scale mismatch, which moves the sampling grid and the VAE's 8-pixel latent grid by
  sub-pixel and whole-pixel amounts. The window is resized to the working size, so every draw has the same shape.
  (Measured on the tiny model, 4 photos, 20 adm+ steps: with crops in half the draws and ``u`` up to 1.15 the rise
  kept after an exact PIL resize fell to 0.69–0.73 of the working-size rise, against 0.84–0.90 without crops and
  0.79–0.83 with 20 % crops up to 1.05, and 0.79–0.84 with 10 % (``bench/poison.py --native``); hence crops are
  opt-in — ``cloak poison --native-crops P`` — for a mimic known to random-crop.)

The weights follow Pillow's ``ImagingResample`` (``Resample.c``: centre ``(i + ½)·scale``, support ``filter
support × max(scale, 1)``, weights normalized to sum 1), so the ``bilinear``/``bicubic``/``lanczos`` forward pass
equals ``PIL.Image.resize`` up to Pillow's 8-bit rounding. The resize is separable and banded: a custom autograd
function does one pass per axis (width first), each as dense blocks of 16 outputs times the contiguous input span
they read (a matmul per block); the backward pass is the transposed blocks, added into one gradient buffer. Nothing
photo-sized is stored for the backward pass beyond the
leaf itself (the gradient buffer is photo-sized, as every PGD step's gradient is); the intermediates are
``(working height or photo height) × working width``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

FILTERS = ("bicubic", "bilinear", "lanczos", "area")


def _triangle(x: torch.Tensor) -> torch.Tensor:
    return (1 - x.abs()).clamp_min(0)


def _cubic(x: torch.Tensor, a: float = -0.5) -> torch.Tensor:
    x = x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def _sinc(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x == 0, torch.ones_like(x), torch.sin(math.pi * x) / (math.pi * x).where(x != 0,
                                                                                              torch.ones_like(x)))


def _lanczos(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x.abs() < 3, _sinc(x) * _sinc(x / 3), torch.zeros_like(x))


def _box(x: torch.Tensor) -> torch.Tensor:
    return ((x > -0.5) & (x <= 0.5)).to(x.dtype)  # Pillow: (−½, ½]


_KERNELS: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], float]] = {
    "bilinear": (_triangle, 1.0), "bicubic": (_cubic, 2.0), "lanczos": (_lanczos, 3.0), "area": (_box, 0.5)}


def resample_weights(in_size: int, out_size: int, name: str, box: tuple[float, float] | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pillow's 1-D resampling band for ``in_size`` → ``out_size`` samples of the window ``box`` (default the whole
    axis): ``(index, weight)``, both ``(out_size, taps)``; output ``i`` is ``Σ_k weight[i,k] · x[index[i,k]]``."""
    if name not in _KERNELS:
        raise ValueError(f"unknown resampling filter {name!r} (choose from {', '.join(FILTERS)})")
    kernel, support = _KERNELS[name]
    start, end = box if box is not None else (0.0, float(in_size))
    scale = (end - start) / out_size
    filterscale = max(scale, 1.0)
    support = support * filterscale
    taps = int(math.ceil(support)) * 2 + 1
    centre = start + (torch.arange(out_size, dtype=torch.float64) + 0.5) * scale
    low = (centre - support + 0.5).floor().clamp(0, in_size - 1)  # Pillow truncates; ≥ 0 here, so floor agrees
    high = (centre + support + 0.5).floor().clamp(max=in_size)
    index = low[:, None] + torch.arange(taps, dtype=torch.float64)[None]
    weight = kernel((index - centre[:, None] + 0.5) / filterscale)
    weight = torch.where(index < high[:, None], weight, torch.zeros_like(weight))
    weight = weight / weight.sum(1, keepdim=True)
    return index.clamp(max=in_size - 1).long(), weight.float()


CHUNK = 16  # outputs per dense block of the band


def _blocks(index: torch.Tensor, weight: torch.Tensor, device, dtype) -> list[tuple[int, int, int, int, torch.Tensor]]:
    """The band as dense blocks ``(out_start, out_end, in_start, in_end, W)``: ``CHUNK`` outputs each, ``W`` their
    weights over the contiguous input span they read (a BLAS matmul per block instead of a gather per tap)."""
    blocks = []
    for i0 in range(0, index.shape[0], CHUNK):
        i1 = min(i0 + CHUNK, index.shape[0])
        idx, w = index[i0:i1], weight[i0:i1]
        lo, hi = int(idx.min()), int(idx.max()) + 1
        dense = torch.zeros(i1 - i0, hi - lo, dtype=torch.float64)
        dense.scatter_add_(1, idx - lo, w.double())
        blocks.append((i0, i1, lo, hi, dense.to(device, dtype)))
    return blocks


class _Band(torch.autograd.Function):
    """``out[..., i, ...] = Σ_k w[i,k] · x[..., idx[i,k], ...]`` along ``dim`` (-1 or -2); backward is the adjoint,
    accumulated into one gradient buffer (nothing input-sized is saved: only the small weight blocks)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, blocks: list, out_size: int, dim: int) -> torch.Tensor:
        ctx.blocks, ctx.dim, ctx.shape = blocks, dim, x.shape
        parts = []
        for _, _, lo, hi, dense in blocks:
            if dim == -1:
                parts.append(x[..., lo:hi] @ dense.T)
            else:
                parts.append(dense @ x[..., lo:hi, :])
        return torch.cat(parts, dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out = grad.new_zeros(ctx.shape)
        for i0, i1, lo, hi, dense in ctx.blocks:
            if ctx.dim == -1:
                out[..., lo:hi] += grad[..., i0:i1] @ dense
            else:
                out[..., lo:hi, :] += dense.T @ grad[..., i0:i1, :]
        return out, None, None, None


def resize(images: torch.Tensor, size: tuple[int, int], name: str = "bicubic",
           box: tuple[float, float, float, float] | None = None) -> torch.Tensor:
    """Differentiable Pillow-style resize of ``(B, C, H, W)`` (or ``(C, H, W)``) to ``size`` ``(h, w)`` with filter
    ``name``; ``box`` ``(left, top, right, bottom)`` in input pixels resizes that window (``Image.resize(box=…)``)."""
    height, width = images.shape[-2:]
    left, top, right, bottom = box if box is not None else (0.0, 0.0, float(width), float(height))
    out = images
    if not (left == 0 and right == width == size[1]):
        index, weight = resample_weights(width, size[1], name, (left, right))
        out = _Band.apply(out, _blocks(index, weight, out.device, out.dtype), size[1], -1)
    if not (top == 0 and bottom == height == size[0]):
        index, weight = resample_weights(height, size[0], name, (top, bottom))
        out = _Band.apply(out, _blocks(index, weight, out.device, out.dtype), size[0], -2)
    return out


@dataclass
class NativeView:
    """The mimic's resize from a photo's own size to the working ``size`` ``(h, w)``, drawn per image.

    ``filters``: the resamplers drawn from (uniformly); ``jitter``: the random-crop window is ``1/u`` of the photo per
    side with ``u ~ U[1, 1 + jitter]``; ``crop_probability``: the chance of a random crop instead of the whole photo.
    ``generators`` (one per image, seeded from the run's seed) serve encodes that pass none of their own.
    """

    size: tuple[int, int]
    filters: Sequence[str] = FILTERS
    jitter: float = 0.05
    crop_probability: float = 0.0
    generators: Sequence[torch.Generator] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in self.filters:
            if name not in _KERNELS:
                raise ValueError(f"unknown resampling filter {name!r} (choose from {', '.join(FILTERS)})")
        if not self.filters:
            raise ValueError("NativeView needs at least one resampling filter")

    def applies(self, images: torch.Tensor) -> bool:
        """Whether ``images`` are photos to shrink (anything already at the working size passes untouched)."""
        return tuple(images.shape[-2:]) != tuple(self.size)

    def draw(self, generator: torch.Generator, height: int, width: int
             ) -> tuple[str, tuple[float, float, float, float]]:
        """One ``(filter, box)`` from ``generator``: always three draws, so the stream advances the same way."""
        pick, crop, where = torch.rand(3, generator=generator).tolist()
        scale_x, scale_y = torch.rand(2, generator=generator).tolist()
        name = self.filters[min(int(pick * len(self.filters)), len(self.filters) - 1)]
        if crop >= self.crop_probability or self.jitter <= 0:
            return name, (0.0, 0.0, float(width), float(height))
        u = 1 + self.jitter * scale_x
        box_w, box_h = width / u, height / u
        left, top = (width - box_w) * where, (height - box_h) * scale_y
        return name, (left, top, left + box_w, top + box_h)

    def __call__(self, images: torch.Tensor, generators: Sequence[torch.Generator] | None = None) -> torch.Tensor:
        """``(B, 3, H, W)`` photos → ``(B, 3, h, w)``: one random resample per image (differentiable)."""
        gens = list(generators) if generators is not None else list(self.generators)
        if len(gens) != images.shape[0]:
            raise ValueError(f"NativeView needs one generator per image: {len(gens)} for {images.shape[0]}")
        height, width = images.shape[-2:]
        out = []
        for image, generator in zip(images, gens):
            name, box = self.draw(generator, height, width)
            out.append(resize(image[None], self.size, name, box))
        return torch.cat(out)
