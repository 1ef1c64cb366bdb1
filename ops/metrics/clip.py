"""The CLIP family: CLIP score, CLIP-IQA, CLIP-IQAC, LIQE and DiffShortcut's Q, on one shared CLIP backbone.

Backbone: transformers ``CLIPModel`` + its tokenizer, default weights ``openai/clip-vit-base-patch32`` (Hub
download; not offline). Images: short side 224 (bicubic), centre crop 224, CLIP mean/std, done in torch. Image
embeddings of a batch are computed once and shared by every CLIP metric of the run; prompt embeddings are cached.

* ``clip`` — CLIPScore, ``w·max(cos(image, prompt), 0)`` with Hessel et al.'s ``w = 2.5`` (EMNLP 2021 Eq. 1;
  jmhessel/clipscore ``clipscore.py``, ``get_clip_score(..., w=2.5)``), the scale of paper 000's Tables 8, 11, 14, 16
  (0.44–0.54). ``clip_scale`` names another scale explicitly: 100 is torchmetrics' ``CLIPScore``. The prompt comes
  from the ``cloak generate`` manifest with the learned token removed (paper 000 §5.1.3). Where we differ from
  Hessel's code: it prefixes every caption with "A photo depicts " (our ``clip_prefix``, default "" because
  generation prompts already read "a photo of …" and paper 000 does not say it used one) and uses OpenAI's ``clip``
  package ViT-B/32 with PIL preprocessing; we use transformers' CLIP and torch preprocessing (below).
* ``clip-iqa`` — softmax(100·cos) over ("Good photo.", "Bad photo."), the probability of "good" (Wang et al.,
  "Exploring CLIP for Assessing the Look and Feel of Images", AAAI 2023), in [0, 1].
* ``clip-iqac`` — p("a good photo of {class}") − p("a bad photo of {class}") under softmax(100·cos), in [-1, 1]
  (paper 001 A.2).
* ``liqe`` — expected quality level 1..5 under softmax(100·cos) over LIQE's 9 scenes × 11 distortions × 5 levels
  prompts "a photo of a(n) {scene} with {distortion} artifacts, which is of {level} quality" (Zhang et al.,
  CVPR 2023). APPROXIMATION: zero-shot with the given CLIP weights and one centre crop; the official LIQE uses its
  own fine-tuned CLIP ViT-B/32 checkpoint and averages random 224² patches. Pass converted LIQE weights (a
  transformers CLIP folder) with ``--liqe-model`` for the real metric.
* ``q`` — (((LIQE − 1)/4)·2 − 1)/2 + CLIP-IQAC/2, in [-1, 1] (paper 001, DiffShortcut's quality score).

``weights="tiny"`` builds a small random CLIPModel with the real CLIP tokenizer (offline; tests and demos only).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..similarity import cosine_matrix
from . import CLIP_DEFAULT as DEFAULT_WEIGHTS  # defaults stated once, in the registry
from . import CLIPSCORE_W
from .base import CLIP_MEAN, CLIP_STD, ImageContext, Metric, features, load_pretrained, preprocess

IQA_PROMPTS = ("Good photo.", "Bad photo.")
LIQE_LEVELS = ("bad", "poor", "fair", "good", "perfect")
LIQE_SCENES = ("animal", "cityscape", "human", "indoor", "landscape", "night", "plant", "still_life", "others")
LIQE_DISTORTIONS = ("jpeg2000 compression", "jpeg compression", "noise", "blur", "color", "contrast",
                    "overexposure", "underexposure", "spatial", "quantization", "other")
LOGIT_SCALE = 100.0


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def liqe_prompts() -> list[str]:
    """The 495 LIQE prompts, level-minor (index = (scene·11 + distortion)·5 + level)."""
    return [f"a photo of {_article(scene)} {scene} with {distortion} artifacts, which is of {level} quality"
            for scene in LIQE_SCENES for distortion in LIQE_DISTORTIONS for level in LIQE_LEVELS]


def tiny_clip():
    from transformers import CLIPConfig, CLIPModel

    from ..models.tokenizer import VOCAB_SIZE, clip_tokenizer

    torch.manual_seed(0)
    config = CLIPConfig(text_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=64, vocab_size=VOCAB_SIZE, max_position_embeddings=77),
                        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                           intermediate_size=64, image_size=224, patch_size=32),
                        projection_dim=32)
    return CLIPModel(config).eval(), clip_tokenizer()


class ClipBackbone:
    """A CLIP model with cached prompt embeddings and a one-batch memo of image embeddings."""

    def __init__(self, weights: str = DEFAULT_WEIGHTS, device="cpu", model=None, tokenizer=None):
        self.device = torch.device(device)
        if model is None:
            if weights == "tiny":
                model, tokenizer = tiny_clip()
            else:
                from transformers import CLIPModel, CLIPTokenizer

                model = load_pretrained(CLIPModel, weights, "CLIP", "--clip-model")
                tokenizer = load_pretrained(CLIPTokenizer, weights, "CLIP tokenizer", "--clip-model")
        self.model = model.to(self.device)
        self.tokenizer = tokenizer
        self._text: dict[str, torch.Tensor] = {}
        self._memo: tuple[tuple, torch.Tensor] | None = None

    @torch.no_grad()
    def text(self, prompts: Sequence[str]) -> torch.Tensor:
        """Embeddings ``(N, D)`` of ``prompts`` (cached per prompt)."""
        missing = [prompt for prompt in dict.fromkeys(prompts) if prompt not in self._text]
        for start in range(0, len(missing), 256):
            chunk = missing[start:start + 256]
            tokens = self.tokenizer(chunk, padding=True, truncation=True, max_length=77, return_tensors="pt")
            output = self.model.get_text_features(input_ids=tokens.input_ids.to(self.device),
                                                  attention_mask=tokens.attention_mask.to(self.device))
            for prompt, embedding in zip(chunk, features(output).float()):
                self._text[prompt] = embedding
        return torch.stack([self._text[prompt] for prompt in prompts])

    @torch.no_grad()
    def images(self, images: Sequence[torch.Tensor], key: tuple) -> torch.Tensor:
        """Embeddings ``(B, D)``; the same ``key`` (the batch's names) reuses the last computation."""
        if self._memo is not None and self._memo[0] == key:
            return self._memo[1]
        pixels = preprocess(images, 224, 224, CLIP_MEAN, CLIP_STD, self.device).to(self.model.dtype)
        embeddings = features(self.model.get_image_features(pixel_values=pixels)).float()
        self._memo = (key, embeddings)
        return embeddings


_BACKBONES: dict[tuple[str, str], ClipBackbone] = {}


def backbone(weights: str, device) -> ClipBackbone:
    key = (weights, str(device))
    if key not in _BACKBONES:
        _BACKBONES[key] = ClipBackbone(weights, device)
    return _BACKBONES[key]


def _class_of(context: ImageContext, name: str) -> str:
    if not context.class_name:
        from ..errors import UsageError

        raise UsageError(f"{name} needs the concept's class: pass --class (e.g. --class person)")
    return context.class_name


class ClipMetric(Metric):
    def __init__(self, name: str, clip: ClipBackbone, liqe: ClipBackbone | None = None, *,
                 scale: float = CLIPSCORE_W, prefix: str = ""):
        self.name = name
        self.clip = clip
        self.liqe_clip = liqe or clip
        self.scale = float(scale)
        self.prefix = prefix

    def _embed(self, clip: ClipBackbone, images, contexts) -> torch.Tensor:
        return clip.images(images, tuple(context.rel for context in contexts))

    def clip_score(self, images, contexts) -> list[float]:
        missing = [context.rel for context in contexts if not context.prompt]
        if missing:
            from ..errors import CloakError

            raise CloakError(f"clip: no prompt for {missing[0]}: score a folder written by cloak generate (its "
                             "cloak.json records each prompt) or pass --prompt")
        similarity = cosine_matrix(self._embed(self.clip, images, contexts),
                                   self.clip.text([self.prefix + context.prompt for context in contexts])).diagonal()
        return (self.scale * similarity.clamp_min(0)).tolist()

    def clip_iqa(self, images, contexts) -> list[float]:
        logits = LOGIT_SCALE * cosine_matrix(self._embed(self.clip, images, contexts), self.clip.text(IQA_PROMPTS))
        return logits.softmax(-1)[:, 0].tolist()

    def clip_iqac(self, images, contexts) -> list[float]:
        embeddings = self._embed(self.clip, images, contexts)
        values = []
        for embedding, context in zip(embeddings, contexts):
            cls = _class_of(context, "clip-iqac")
            texts = self.clip.text([f"a good photo of {_article(cls)} {cls}", f"a bad photo of {_article(cls)} {cls}"])
            probabilities = (LOGIT_SCALE * cosine_matrix(embedding[None], texts)).softmax(-1)[0]
            values.append(float(probabilities[0] - probabilities[1]))
        return values

    def liqe(self, images, contexts) -> list[float]:
        logits = LOGIT_SCALE * cosine_matrix(self._embed(self.liqe_clip, images, contexts),
                                             self.liqe_clip.text(liqe_prompts()))
        by_level = logits.softmax(-1).reshape(len(images), -1, len(LIQE_LEVELS)).sum(1)
        levels = torch.arange(1, len(LIQE_LEVELS) + 1, dtype=by_level.dtype, device=by_level.device)
        return (by_level * levels).sum(-1).tolist()

    def score(self, images: Sequence[torch.Tensor], contexts: Sequence[ImageContext]) -> list[float | None]:
        if self.name == "clip":
            return self.clip_score(images, contexts)
        if self.name == "clip-iqa":
            return self.clip_iqa(images, contexts)
        if self.name == "clip-iqac":
            return self.clip_iqac(images, contexts)
        if self.name == "liqe":
            return self.liqe(images, contexts)
        if self.name == "q":
            return [q_score(liqe, iqac) for liqe, iqac in zip(self.liqe(images, contexts),
                                                              self.clip_iqac(images, contexts))]
        raise ValueError(f"not a CLIP metric: {self.name}")


def q_score(liqe: float, clip_iqac: float) -> float:
    """DiffShortcut's Q from LIQE (1..5) and CLIP-IQAC ([-1, 1]): ``(((liqe−1)/4)·2−1)/2 + clip_iqac/2``."""
    return (((liqe - 1) / 4) * 2 - 1) / 2 + clip_iqac / 2


def build(name: str, clip_model: str = DEFAULT_WEIGHTS, liqe_model: str | None = None, device="cpu",
          clip_scale: float | None = None, clip_prefix: str | None = None, **_options) -> ClipMetric:
    clip = backbone(clip_model, device)
    liqe = backbone(liqe_model, device) if liqe_model else None
    return ClipMetric(name, clip, liqe, scale=CLIPSCORE_W if clip_scale is None else clip_scale,
                      prefix=clip_prefix or "")
