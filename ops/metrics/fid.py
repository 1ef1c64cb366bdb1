"""FID (Heusel et al. 2017) per concept — generated images vs the concept's clean training images (paper 000
§5.1.3, App. K) — through torchmetrics' ``FrechetInceptionDistance``.

Default features: the 2048-d pool3 of the TF-ported InceptionV3 that torchmetrics takes from torch-fidelity
(``pip install torch-fidelity``; its weights ``pt_inception-2015-12-05`` are downloaded on first use). Reference
features are extracted once per concept per run (``reset_real_features=False``). Statistics in float64. With few
images per concept (paper 000: 5 generated per prompt) the covariances are rank-deficient and FID is biased upwards;
it is comparable only between runs with the same counts. A concept with < 2 images on either side gets ``None``.

``features="tiny"`` uses a small random conv net built in code (offline; tests and demos only). Every choice needs
the optional extra ``metrics`` (torchmetrics computes the statistics; torch-fidelity holds InceptionV3).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..grouping import group_indices_by, shape_of
from . import FID_DEFAULT_FEATURES
from .base import ImageContext, Metric, finite


class TinyFeatures(nn.Module):
    """A random, fixed 16-d conv feature extractor on 64² inputs (float ``(B, 3, H, W)`` in [0, 1])."""

    num_features = 16

    def __init__(self, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        with torch.no_grad():
            for parameter in self.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        scale = 255.0 if images.dtype == torch.uint8 else 1.0
        images = images.to(self.conv1.weight.dtype) / scale  # torchmetrics may move the extractor to float64
        images = F.interpolate(images, size=(64, 64), mode="bilinear", antialias=True, align_corners=False)
        return self.conv2(torch.relu(self.conv1(images * 2 - 1))).mean((2, 3))


def require_fid(features: str) -> None:
    """One line naming the ``metrics`` extra when torchmetrics (and, for InceptionV3, torch-fidelity) is missing."""
    from ..extras import require

    require("torchmetrics.image.fid", "metrics", "fid needs torchmetrics (for every --fid-features, tiny too)")
    if features == "inception":
        require("torch_fidelity", "metrics", "fid needs torch-fidelity for the InceptionV3 features")


def _new_fid(features: str | nn.Module, device):
    from torchmetrics.image.fid import FrechetInceptionDistance

    from ..errors import ModelNotFoundError

    try:
        fid = FrechetInceptionDistance(feature=2048 if features == "inception" else features,
                                       reset_real_features=False, normalize=True)
    except ModuleNotFoundError as exc:
        raise ModelNotFoundError(f"fid needs torch-fidelity for the standard InceptionV3 features ({exc}): "
                                 "pip install 'cloaklab[metrics]', or use --fid-features tiny for a demo") from None
    except Exception as exc:  # the weight download failed
        raise ModelNotFoundError(f"fid: InceptionV3 weights could not be loaded ({type(exc).__name__}: {exc}); "
                                 "run once on a connected machine (TORCH_HOME cache)") from None
    return fid.set_dtype(torch.float64).to(device)


class FidMetric(Metric):
    name = "fid"

    def __init__(self, features: str = FID_DEFAULT_FEATURES, device="cpu"):
        require_fid(features)
        self.device = torch.device(device)
        self.extractor: str | nn.Module = TinyFeatures() if features == "tiny" else features
        self.per_concept: dict[str, object] = {}

    def _fid(self, concept: str):
        if concept not in self.per_concept:
            self.per_concept[concept] = _new_fid(self.extractor, self.device)
        return self.per_concept[concept]

    @torch.no_grad()
    def prepare(self, references: dict[str, list[torch.Tensor]]) -> None:
        for concept, images in references.items():
            fid = self._fid(concept)
            for indices in group_indices_by(images, shape_of).values():
                fid.update(torch.stack([images[i] for i in indices]).to(self.device), real=True)

    @torch.no_grad()
    def score(self, images: Sequence[torch.Tensor], contexts: Sequence[ImageContext]) -> list[float | None]:
        by_concept: dict[str, list[torch.Tensor]] = {}
        for image, context in zip(images, contexts):
            by_concept.setdefault(context.concept, []).append(image)
        for concept, group in by_concept.items():
            for indices in group_indices_by(group, shape_of).values():
                self._fid(concept).update(torch.stack([group[i] for i in indices]).to(self.device), real=False)
        return [None] * len(images)  # FID is a set statistic: see concept_values

    def concept_values(self) -> dict[str, float | None]:
        values: dict[str, float | None] = {}
        for concept, fid in self.per_concept.items():
            enough = int(fid.real_features_num_samples) >= 2 and int(fid.fake_features_num_samples) >= 2
            values[concept] = finite(fid.compute().item()) if enough else None
        return values


def build(name: str, fid_features: str = FID_DEFAULT_FEATURES, device="cpu", **_options) -> FidMetric:
    return FidMetric(fid_features, device)
