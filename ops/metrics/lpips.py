"""LPIPS (Zhang et al., "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric", CVPR 2018) via
torchmetrics' implementation: AlexNet features (torchvision ImageNet weights, downloaded on first use) and the
LPIPS v0.1 linear heads that torchmetrics ships. Lower = more similar; images are compared at their own size
(both must match), inputs scaled to [-1, 1] as LPIPS expects.

``net="tiny"`` is :class:`TinyLPIPS`, LPIPS's computation on a tiny random backbone (no download) — for tests and
demos only. ``cloak purify -m impress`` loads its LPIPS term through the same :func:`load_lpips`.
The real backbones need the optional extra ``metrics`` (torchmetrics, torchvision); ``tiny`` needs neither.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ModelNotFoundError, UsageError
from ..extras import require
from ..grouping import group_indices_by, shape_of
from ..models import quiet_loading
from . import LPIPS_DEFAULT_NET
from .base import ImageContext, Metric, finite
from .pixel import require_reference


class TinyLPIPS(nn.Module):
    """LPIPS's computation (Zhang et al. 2018) on a tiny random conv backbone: unit-normalize each layer's features
    over channels, squared difference, non-negative 1×1 linear weights, spatial mean, sum over layers. ``(B,)``."""

    def __init__(self, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        widths = (3, 8, 16, 16)
        self.layers = nn.ModuleList()
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            conv = nn.Conv2d(c_in, c_out, 3, stride=2, padding=1)
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) / (c_in * 9) ** 0.5)
                conv.bias.zero_()
            self.layers.append(conv)
        self.lins = nn.ParameterList([nn.Parameter(torch.full((1, c, 1, 1), 1.0 / c)) for c in widths[1:]])
        self.requires_grad_(False)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        fa, fb, total = a * 2 - 1, b * 2 - 1, 0.0
        for conv, lin in zip(self.layers, self.lins):
            fa, fb = F.relu(conv(fa)), F.relu(conv(fb))
            na = fa / (fa.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            nb = fb / (fb.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + ((na - nb).pow(2) * lin).sum(1).mean((1, 2))
        return total


class LPIPSNet(nn.Module):
    """torchmetrics' LPIPS network as ``f(a, b) -> (B,)`` on images in [0, 1]."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.net(a.float(), b.float(), normalize=True).reshape(-1)


def _backbone_cached(name: str) -> bool:
    """Whether torchvision's ImageNet weights for the LPIPS backbone are already in the torch hub cache."""
    from torchvision import models

    weights = {"vgg": models.VGG16_Weights, "alex": models.AlexNet_Weights,
               "squeeze": models.SqueezeNet1_1_Weights}[name].IMAGENET1K_V1
    return (Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name).is_file()


def load_lpips(name: str, device: Any = "cpu") -> nn.Module:
    """``tiny`` or an LPIPS backbone name (``vgg``, ``alex``, ``squeeze``); returns ``f(a, b) -> (B,)`` on [0, 1]."""
    if name == "tiny":
        return TinyLPIPS().to(device)
    if name not in ("vgg", "alex", "squeeze"):
        raise UsageError(f"LPIPS backbone must be vgg, alex, squeeze or tiny, got {name!r}")
    require(("torchmetrics.functional.image.lpips", "torchvision"), "metrics",
            f"LPIPS backbone {name!r} needs torchmetrics and torchvision",
            "the tiny demo backbone (--lpips-net tiny in score, --lpips-model tiny in purify)")
    from torchmetrics.functional.image.lpips import _NoTrainLpips

    if os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True") and not _backbone_cached(name):
        raise ModelNotFoundError(f"LPIPS backbone {name!r} weights are not in the torch hub cache and HF_HUB_OFFLINE "
                                 "is set: put torchvision's ImageNet weights in TORCH_HOME, or use the tiny backbone")
    try:
        with quiet_loading():
            net = _NoTrainLpips(net=name, pretrained=True)
    except Exception as exc:  # torchvision downloads the ImageNet backbone on first use
        raise ModelNotFoundError(f"LPIPS backbone {name!r} weights not found ({type(exc).__name__}): put torchvision's "
                                 "ImageNet weights in the torch hub cache (TORCH_HOME) on a connected machine, or "
                                 "use the tiny backbone") from None
    return LPIPSNet(net.eval().requires_grad_(False)).to(device)


class LpipsMetric(Metric):
    name = "lpips"

    def __init__(self, net: str = LPIPS_DEFAULT_NET, device="cpu"):
        self.device = torch.device(device)
        self.model = load_lpips(net, self.device)

    @torch.no_grad()
    def score(self, images: Sequence[torch.Tensor], contexts: Sequence[ImageContext]) -> list[float | None]:
        references = [require_reference(self.name, image, context) for image, context in zip(images, contexts)]
        values: list[float | None] = [None] * len(images)
        for indices in group_indices_by(images, shape_of).values():  # one forward per image size
            a = torch.stack([images[i] for i in indices]).to(self.device, torch.float32)
            b = torch.stack([references[i] for i in indices]).to(self.device, torch.float32)
            for index, value in zip(indices, self.model(a, b).flatten().tolist()):
                values[index] = finite(value)
        return values


def build(name: str, lpips_net: str = LPIPS_DEFAULT_NET, device="cpu", **_options) -> LpipsMetric:
    return LpipsMetric(lpips_net, device)
