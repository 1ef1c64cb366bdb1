"""LPIPS (Zhang et al., "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric", CVPR 2018) via
torchmetrics' implementation: AlexNet features (torchvision ImageNet weights, downloaded on first use) and the
LPIPS v0.1 linear heads that torchmetrics ships. Lower = more similar; images are compared at their own size
(both must match), inputs scaled to [-1, 1] as LPIPS expects.

``net="tiny"`` keeps the bundled heads but a *random* AlexNet (no download) — for tests and demos only.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .base import ImageContext, Metric, finite, same_size_groups
from .pixel import require_reference


def load_lpips(net: str = "alex", device="cpu"):
    """The torchmetrics LPIPS network; ``tiny`` = random backbone with the real heads (offline)."""
    from torchmetrics.functional.image.lpips import _LPIPS

    from ..errors import ModelNotFoundError

    random_backbone = net == "tiny"
    try:
        model = _LPIPS(pretrained=True, net="alex" if random_backbone else net, pnet_rand=random_backbone)
    except Exception as exc:  # torchvision raises URLError/RuntimeError when the download is impossible
        raise ModelNotFoundError(f"LPIPS backbone {net!r}: torchvision ImageNet weights are not cached and cannot "
                                 f"be downloaded ({type(exc).__name__}); set TORCH_HOME to a folder that has them, "
                                 "or use --lpips-net tiny for a demo") from None
    return model.eval().to(device)


class LpipsMetric(Metric):
    name = "lpips"

    def __init__(self, net: str = "alex", device="cpu"):
        self.device = torch.device(device)
        self.model = load_lpips(net, self.device)

    @torch.no_grad()
    def score(self, images: Sequence[torch.Tensor], contexts: Sequence[ImageContext]) -> list[float | None]:
        references = [require_reference(self.name, image, context) for image, context in zip(images, contexts)]
        values: list[float | None] = [None] * len(images)
        for indices in same_size_groups(images).values():  # one forward per image size
            a = torch.stack([images[i] for i in indices]).to(self.device, torch.float32) * 2 - 1
            b = torch.stack([references[i] for i in indices]).to(self.device, torch.float32) * 2 - 1
            for index, value in zip(indices, self.model(a, b).flatten().tolist()):
                values[index] = finite(value)
        return values


def build(name: str, lpips_net: str = "alex", device="cpu", **_options) -> LpipsMetric:
    return LpipsMetric(lpips_net, device)
