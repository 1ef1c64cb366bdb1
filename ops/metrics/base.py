"""What every metric shares: the per-image context, the metric interface, preprocessing and backbone loading.

Images are float tensors ``(3, H, W)`` in [0, 1] (sizes may differ within a run); metrics resize them themselves.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..grouping import group_indices_by, shape_of
from ..validate import check_aspect

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class ImageContext:
    """What a metric may need besides the pixels of one scored image."""

    rel: str
    concept: str
    reference: torch.Tensor | None = None  # the same-named reference (paired metrics), (3, H, W) in [0, 1]
    prompt: str | None = None  # the generation prompt with the learned token already removed
    class_name: str | None = None


class Metric:
    """A metric of one run. ``prepare`` sees the clean references once (per concept) before any image;
    ``score`` returns one value per image (``None`` = undefined, excluded from means); ``concept_values`` gives
    concept-level values for metrics defined on sets (FID)."""

    name: str = ""
    device: torch.device = torch.device("cpu")

    def prepare(self, references: dict[str, list[torch.Tensor]]) -> None:
        return None

    def score(self, images: Sequence[torch.Tensor], contexts: Sequence[ImageContext]) -> list[float | None]:
        raise NotImplementedError

    def concept_values(self) -> dict[str, float | None]:
        return {}


def finite(value: float | None) -> float | None:
    """``None`` for NaN/inf (so JSON stays valid and means skip it), else a plain float."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def preprocess(images: Sequence[torch.Tensor], resize: int, crop: int, mean: Sequence[float], std: Sequence[float],
               device: Any = "cpu") -> torch.Tensor:
    """Resize the short side to ``resize`` (bicubic, antialiased), centre-crop ``crop``², normalize.

    ``images``: ``(3, H, W)`` tensors in [0, 1] of any sizes → ``(B, 3, crop, crop)`` on ``device``; images of the
    same size are resized in one call.
    """
    out: list[torch.Tensor | None] = [None] * len(images)
    for shape, indices in group_indices_by(images, shape_of).items():
        batch = torch.stack([images[i] for i in indices]).to(device=device, dtype=torch.float32)
        height, width = shape[-2:]
        check_aspect(width, height)
        scale = resize / min(height, width)
        size = (max(crop, round(height * scale)), max(crop, round(width * scale)))
        if size != (height, width):
            batch = F.interpolate(batch, size=size, mode="bicubic", antialias=True, align_corners=False)
        top, left = (size[0] - crop) // 2, (size[1] - crop) // 2
        for index, image in zip(indices, batch[:, :, top:top + crop, left:left + crop].clamp(0, 1)):
            out[index] = image
    stacked = torch.stack(out)  # type: ignore[arg-type]
    mean_t = torch.tensor(mean, device=stacked.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=stacked.device).view(1, 3, 1, 1)
    return (stacked - mean_t) / std_t


def load_pretrained(model_class, weights: str, what: str, flag: str, **kwargs: Any):
    """``model_class.from_pretrained(weights)`` in eval mode, or one line saying what is missing and what to do."""
    from ..errors import ModelNotFoundError

    try:
        loaded = model_class.from_pretrained(weights, **kwargs)
    except (OSError, ValueError) as exc:
        offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True") else ""
        raise ModelNotFoundError(
            f"{what} weights {weights!r} not found{offline}: download them into the Hugging Face cache (HF_HOME) on "
            f"a connected machine or pass a local folder with {flag} ({type(exc).__name__})") from None
    return loaded.eval() if hasattr(loaded, "eval") else loaded


def features(output: Any) -> torch.Tensor:
    """Embeddings from a transformers call that may return a tensor or a ``ModelOutput`` (transformers ≥ 5)."""
    if isinstance(output, torch.Tensor):
        return output
    return output.pooler_output
