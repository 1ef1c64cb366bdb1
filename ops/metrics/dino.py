"""DINOv2 similarity (paper 000 §5.1.3, following DreamBooth's DINO metric): the cosine between the DINOv2 CLS
embedding of a generated image and that of every clean training image of its concept, averaged over the references.

Backbone: transformers ``Dinov2Model``, default weights ``facebook/dinov2-base`` (Hub download; not offline).
Embedding = ``pooler_output`` (the layer-normed CLS token). Preprocessing as the model's image processor: short side
256 (bicubic), centre crop 224, ImageNet mean/std — done in torch so a batch is one resize + one forward.
Reference embeddings are computed once per run (each reference image once, even if several concepts share it).
``weights="tiny"`` builds a small random Dinov2Model in code (offline; tests and demos only).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..similarity import cosine_matrix
from . import DINOV2_DEFAULT as DEFAULT_WEIGHTS  # stated once, in the registry
from .base import IMAGENET_MEAN, IMAGENET_STD, ImageContext, Metric, features, finite, load_pretrained, preprocess


def tiny_dinov2():
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          image_size=224, patch_size=28)
    return Dinov2Model(config).eval()


def load_dinov2(weights: str = DEFAULT_WEIGHTS, device="cpu"):
    from transformers import Dinov2Model

    model = tiny_dinov2() if weights == "tiny" else load_pretrained(Dinov2Model, weights, "DINOv2", "--dinov2-model")
    return model.to(device)


class DinoSimilarity(Metric):
    name = "dinov2"
    resize, crop = 256, 224

    def __init__(self, weights: str = DEFAULT_WEIGHTS, device="cpu", model=None):
        self.device = torch.device(device)
        self.model = model if model is not None else load_dinov2(weights, self.device)
        self.reference_embeddings: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def embed(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """CLS embeddings ``(B, D)`` of ``(3, H, W)`` images in [0, 1]."""
        pixels = preprocess(images, self.resize, self.crop, IMAGENET_MEAN, IMAGENET_STD, self.device)
        return features(self.model(pixel_values=pixels.to(self.model.dtype))).float()

    def prepare(self, references: dict[str, list[torch.Tensor]]) -> None:
        cache: dict[int, torch.Tensor] = {}
        for concept, images in references.items():
            missing = [image for image in images if id(image) not in cache]
            if missing:
                for image, embedding in zip(missing, self.embed(missing)):
                    cache[id(image)] = embedding
            if images:
                self.reference_embeddings[concept] = torch.stack([cache[id(image)] for image in images])

    def score(self, images: Sequence[torch.Tensor], contexts: Sequence[ImageContext]) -> list[float | None]:
        embeddings = self.embed(images)
        values: list[float | None] = []
        for embedding, context in zip(embeddings, contexts):
            references = self.reference_embeddings.get(context.concept)
            if references is None:
                from ..errors import CloakError

                raise CloakError(f"dinov2: no clean reference images for concept {context.concept!r} under --ref")
            values.append(finite(cosine_matrix(embedding[None], references).mean().item()))
        return values


def build(name: str, dinov2_model: str = DEFAULT_WEIGHTS, device="cpu", **_options) -> DinoSimilarity:
    return DinoSimilarity(dinov2_model, device)
