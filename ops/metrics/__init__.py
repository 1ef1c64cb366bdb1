"""Image metrics (``cloak score --metrics LIST``): one small module per family, registered here by name.

This registry imports nothing heavy, so the CLI can list metrics without loading torch. Each spec says how the
metric is computed (``kind``), its backbone, the default weights and whether it runs offline out of the box:

* ``paired`` — image vs the reference with the same relative name (purification faithfulness, poison visibility);
* ``set`` — image vs the concept's clean reference *set* (reference features are computed once per run);
* ``single`` — no reference (quality, prompt fidelity, face detection);
* ``concept`` — defined on a whole concept only (FID): no per-image value.

``basic`` holds psnr/ssim/rmse as plain functions, which other commands also record per file.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class MetricSpec:
    name: str
    module: str
    summary: str
    kind: str  # paired | set | single | concept
    backbone: str
    default_weights: str | None
    offline: bool
    higher_is_better: bool
    needs_prompt: bool = False
    needs_class: bool = False

    def build(self, **options):
        """Instantiate the metric (loads its backbone); ``options`` are the ``--*-model`` choices."""
        module = importlib.import_module(f"{__name__}.{self.module}")
        return module.build(self.name, **options)


METRICS: dict[str, MetricSpec] = {}


def register(spec: MetricSpec) -> MetricSpec:
    METRICS[spec.name] = spec
    return spec


def get_metric(name: str) -> MetricSpec:
    from ..errors import UsageError

    if name not in METRICS:
        raise UsageError(f"unknown metric {name!r}; choose from: {', '.join(METRICS)}")
    return METRICS[name]


def parse_metrics(text: str) -> list[MetricSpec]:
    """``"psnr,ssim"`` → specs (order kept, duplicates dropped); ``all-offline`` expands to the offline ones."""
    from ..errors import UsageError

    names: list[str] = []
    for raw in text.split(","):
        name = raw.strip().lower()
        if not name:
            continue
        expanded = [spec.name for spec in METRICS.values() if spec.offline] if name == "all-offline" else [name]
        names += [item for item in expanded if item not in names]
    if not names:
        raise UsageError("--metrics is empty; give a comma-separated list, e.g. psnr,ssim,brisque")
    return [get_metric(name) for name in names]


# Default weights and settings of the metric options (``cloak score --clip-model`` …), stated once here: the
# registry is light, so the settings of ``cloak score`` and the metric modules both read them.
DEFAULT_METRICS = "psnr,ssim,rmse"  # cloak score --metrics
CLIP_DEFAULT = "openai/clip-vit-base-patch32"
DINOV2_DEFAULT = "facebook/dinov2-base"
CLIPSCORE_W = 2.5  # Hessel et al. 2021: CLIP-S = w · max(cos, 0), w = 2.5
LPIPS_DEFAULT_NET = "alex"
FID_DEFAULT_FEATURES = "inception"
register(MetricSpec("dinov2", "dino", "cosine similarity of DINOv2 CLS embeddings to every clean reference of the "
                    "concept, averaged (paper 000 §5.1.3)", "set", "DINOv2 ViT-B/14 (transformers Dinov2Model)",
                    DINOV2_DEFAULT, False, True))
register(MetricSpec("fid", "fid", "Fréchet Inception Distance of the concept's images vs its clean references "
                    "(torchmetrics; per concept, paper 000)", "concept", "InceptionV3 pool3 (torch-fidelity via "
                    "torchmetrics)", "pt_inception-2015-12-05 (torch-fidelity download)", False, False))
register(MetricSpec("clip", "clip", "CLIPScore 2.5·max(cos(image, prompt), 0) (Hessel et al.; --clip-scale "
                    "100 for torchmetrics' scale), prompt from the generate manifest with the token removed "
                    "(paper 000)", "single", "CLIP (transformers CLIPModel)", CLIP_DEFAULT,
                    False, True, needs_prompt=True))
register(MetricSpec("clip-iqa", "clip", "CLIP-IQA: softmax(100·cos) of 'Good photo.' vs 'Bad photo.', probability "
                    "of good (Wang et al. 2023)", "single", "CLIP (transformers CLIPModel)", CLIP_DEFAULT, False,
                    True))
register(MetricSpec("clip-iqac", "clip", "CLIP-IQAC: softmax(100·cos) of 'a good photo of {class}' minus 'a bad "
                    "photo of {class}', in [-1, 1] (paper 001 A.2)", "single", "CLIP (transformers CLIPModel)",
                    CLIP_DEFAULT, False, True, needs_class=True))
register(MetricSpec("liqe", "clip", "LIQE quality 1-5: expected quality level under CLIP softmax over scene × "
                    "distortion × quality prompts (Zhang et al. 2023); zero-shot CLIP unless LIQE weights are "
                    "given", "single", "CLIP ViT-B/32 (transformers CLIPModel)", CLIP_DEFAULT, False, True))
register(MetricSpec("q", "clip", "DiffShortcut's composite (((LIQE−1)/4)·2−1)/2 + CLIP-IQAC/2, in [-1, 1] "
                    "(paper 001)", "single", "CLIP (as liqe and clip-iqac)", CLIP_DEFAULT, False, True,
                    needs_class=True))
register(MetricSpec("lpips", "lpips", "LPIPS distance to the reference with the same name (torchmetrics; lower = "
                    "closer)", "paired", "AlexNet + LPIPS v0.1 linear heads (torchmetrics bundles the heads)",
                    "torchvision alexnet IMAGENET1K_V1 (download)", False, False))
register(MetricSpec("psnr", "pixel", "PSNR in dB vs the reference with the same name (scikit-image, float64)",
                    "paired", "none", None, True, True))
register(MetricSpec("ssim", "pixel", "SSIM vs the reference with the same name (scikit-image, 7×7, per channel)",
                    "paired", "none", None, True, True))
register(MetricSpec("rmse", "pixel", "root mean squared error in [0, 1] units vs the reference with the same name",
                    "paired", "none", None, True, False))
register(MetricSpec("brisque", "brisque_score", "BRISQUE no-reference quality (NumPy; the brisque package's "
                    "trained SVR, shipped; higher = worse, paper 004)", "single", "NSS features + SVR",
                    "shipped ops/metrics/brisque_svr.safetensors (from brisque 0.2.0)",
                    True, False))
register(MetricSpec("fdfr", "faces", "face detection failure: 1 when no face is found, 0 otherwise; the mean is "
                    "the FDFR (paper 004 uses RetinaFace: --face-detector FILE; default the offline OpenCV Haar "
                    "cascade)", "single",
                    "OpenCV Haar cascade (frontal face), or RetinaFace with --face-detector",
                    "Haar bundled with opencv (cv2.data); RetinaFace: your file", True, False))
register(MetricSpec("ism", "faces", "identity score matching: cosine of ArcFace embeddings to the mean embedding "
                    "of the clean references; images without a face are excluded from the mean (paper 004)", "set",
                    "ArcFace (ONNX via onnxruntime)", "insightface antelopev2 glintr100.onnx (user-supplied)",
                    False, True))
register(MetricSpec("ims", "faces", "identity similarity 0.7·cos(ArcFace) + 0.3·cos(VGG-Face) to the mean clean "
                    "embedding; no face → −1 (paper 001 §5.1)", "set", "ArcFace + VGG-Face (ONNX via onnxruntime)",
                    "antelopev2 glintr100.onnx + a VGG-Face ONNX export (user-supplied)", False, True))
register(MetricSpec("toy-acc", "toy", "toy world: 1 when the toy classifier names the concept's shape (--class, or "
                    "the majority shape of its clean references), else 0", "set", "toy classifier CNN (ops/toy)",
                    "bundled ops/toy/classifier.safetensors", True, True))
register(MetricSpec("toy-sim", "toy", "toy world's DINOv2: cosine of colour-blind toy-classifier shape features to "
                    "every clean reference of the concept, averaged", "set", "toy classifier CNN (ops/toy)",
                    "bundled ops/toy/classifier.safetensors", True, True))
