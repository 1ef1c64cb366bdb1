"""PSNR, SSIM and RMSE against the reference image with the same relative name (see :mod:`.basic`).

Paired metrics need the two images to be the same size; a size mismatch is an error for that image (resizing would
change the number being measured). All arithmetic is float64, so uint8 data cannot overflow (a known bug of public
evaluation scripts, METHODS.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import basic
from .base import ImageContext, Metric, finite

_FUNCTIONS = {"psnr": basic.psnr, "ssim": basic.ssim, "rmse": basic.rmse}


class PixelMetric(Metric):
    def __init__(self, name: str):
        self.name = name
        self.function = _FUNCTIONS[name]

    def score(self, images: Sequence[torch.Tensor], contexts: Sequence[ImageContext]) -> list[float | None]:
        values: list[float | None] = []
        for image, context in zip(images, contexts):
            reference = require_reference(self.name, image, context)
            values.append(finite(self.function(image, reference)))
        return values


def require_reference(name: str, image: torch.Tensor, context: ImageContext) -> torch.Tensor:
    """The paired reference of ``context``, checked for presence and size."""
    from ..errors import RejectedInput

    if context.reference is None:
        raise RejectedInput(f"{name}: no reference image named like {context.rel} under --ref")
    if tuple(context.reference.shape) != tuple(image.shape):
        raise RejectedInput(f"{name}: size {tuple(image.shape[1:])} differs from its reference "
                         f"{tuple(context.reference.shape[1:])}")
    return context.reference


def build(name: str, **_options) -> PixelMetric:
    return PixelMetric(name)
