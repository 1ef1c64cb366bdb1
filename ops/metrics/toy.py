"""Toy-world metrics (``--model toy`` experiments): the toy classifier plays DINOv2 and a concept classifier.

* ``toy-acc`` — 1 when the toy classifier names the concept's shape in the image, else 0 (the mean is the share of
  samples that show the concept). The concept's shape is ``--class`` when it is a toy shape name, otherwise the
  classifier's majority vote over the concept's clean references (``--ref``).
* ``toy-sim`` — cosine similarity of the classifier's *shape* features (trained on colour-scrambled images, so colour
  cannot fake similarity) to every clean reference of the concept, averaged — the toy world's DINOv2 score.

Backbone: :mod:`cloaklab.ops.toy.classifier` (``ops/toy/classifier.safetensors``, bundled, offline).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch

from ..similarity import cosine_matrix
from .base import ImageContext, Metric, finite


class ToyMetric(Metric):
    def __init__(self, name: str, device="cpu", judge=None):
        from ..toy.classifier import load_judge

        self.name = name
        self.device = torch.device(device)
        self.judge = judge if judge is not None else load_judge(None, str(self.device))
        self.reference_features: dict[str, torch.Tensor] = {}
        self.reference_shape: dict[str, str] = {}

    @staticmethod
    def _stack(images: Sequence[torch.Tensor]) -> torch.Tensor:
        import torch.nn.functional as F

        return torch.stack([F.interpolate(image[None].float(), size=(64, 64), mode="bilinear", antialias=True,
                                          align_corners=False)[0] for image in images])

    def prepare(self, references: dict[str, list[torch.Tensor]]) -> None:
        for concept, images in references.items():
            if not images:
                continue
            batch = self._stack(images).to(self.device)
            self.reference_features[concept] = self.judge.features(batch)
            votes = Counter(p["shape"] for p in self.judge.predict(batch))
            self.reference_shape[concept] = votes.most_common(1)[0][0]

    def _missing(self, concept: str):
        from ..errors import CloakError

        return CloakError(f"{self.name}: no clean reference images for concept {concept!r} under --ref (or pass "
                          "--class with a toy shape name for toy-acc)")

    def score(self, images: Sequence[torch.Tensor], contexts: Sequence[ImageContext]) -> list[float | None]:
        from ..toy.dataset import ALL_SHAPES

        batch = self._stack(images).to(self.device)
        values: list[float | None] = []
        if self.name == "toy-sim":
            for feature, context in zip(self.judge.features(batch), contexts):
                references = self.reference_features.get(context.concept)
                if references is None:
                    raise self._missing(context.concept)
                values.append(finite(cosine_matrix(feature[None], references).mean().item()))
            return values
        for prediction, context in zip(self.judge.predict(batch), contexts):
            target = context.class_name if context.class_name in ALL_SHAPES else \
                self.reference_shape.get(context.concept)
            if target is None:
                raise self._missing(context.concept)
            values.append(float(prediction["shape"] == target))
        return values


def build(name: str, device="cpu", **_options) -> ToyMetric:
    return ToyMetric(name, device)
