"""Face metrics: FDFR (face detection failure rate), ISM (identity score matching) and IMS (identity similarity).

* Detection — OpenCV's bundled Haar cascade ``haarcascade_frontalface_default.xml`` (Viola-Jones), offline.
  APPROXIMATION: papers 001/004 use RetinaFace; Haar misses more profile/small faces, so FDFR reads higher. Images
  with a short side under 256 px are upsampled to 256 before detection (the cascade's 24-px window needs it).
  A face counts as found when at least one box is returned (``len(boxes) >= 1`` — not ``== 1``, a known bug).
* ``fdfr`` per image: 1.0 when no face is found, else 0.0; its mean over a concept is the FDFR (paper 004 §4).
* ``ism`` — cosine between the ArcFace embedding of the largest face and the mean embedding of the clean
  references' faces (paper 004). Images without a face are *excluded* from the mean (counting them as 0 is a known
  bug of public evaluation code); their number shows in ``fdfr``.
* ``ims`` — 0.7·cos(ArcFace) + 0.3·cos(VGG-Face) against the mean clean embeddings; no face → −1 (paper 001 §5.1).

Recognizers: ONNX files run with onnxruntime (``pip install onnxruntime``): ArcFace e.g. insightface antelopev2
``glintr100.onnx`` (``--arcface-model``), VGG-Face any ONNX export taking 224² RGB (``--vggface-model``). Neither is
downloadable here; ``tiny`` builds a small random conv encoder in code (tests and demos only). Faces are cropped
from the detection box enlarged by 20% and resized (no landmark alignment — an approximation of ArcFace's
5-point alignment).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .base import ImageContext, Metric, cosine_matrix

CASCADE = "haarcascade_frontalface_default.xml"
DETECTION_SIZE = 256


def _detector():
    import cv2

    return cv2.CascadeClassifier(str(Path(cv2.data.haarcascades) / CASCADE))


def detect_faces(image: torch.Tensor, detector=None) -> list[tuple[int, int, int, int]]:
    """Face boxes ``(x, y, w, h)`` in pixel coordinates of ``image`` ``(3, H, W)`` in [0, 1], largest first."""
    import cv2

    gray = (image.detach().float().cpu().clamp(0, 1).mean(0).numpy() * 255).round().astype(np.uint8)
    scale = max(1.0, DETECTION_SIZE / min(gray.shape))
    if scale > 1:
        gray = cv2.resize(gray, (round(gray.shape[1] * scale), round(gray.shape[0] * scale)),
                          interpolation=cv2.INTER_CUBIC)
    side = min(gray.shape)
    boxes = (detector or _detector()).detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5,
                                                       minSize=(max(24, side // 16),) * 2)
    found = [tuple(int(round(v / scale)) for v in box) for box in (boxes if len(boxes) >= 1 else [])]
    return sorted(found, key=lambda box: -box[2] * box[3])


def crop_face(image: torch.Tensor, box: tuple[int, int, int, int], size: int) -> torch.Tensor:
    """The box enlarged by 20%, clipped to the image, resized to ``size``² → ``(3, size, size)``."""
    x, y, w, h = box
    cx, cy, half = x + w / 2, y + h / 2, 0.6 * max(w, h)
    height, width = image.shape[-2:]
    top, bottom = max(0, int(cy - half)), min(height, int(cy + half))
    left, right = max(0, int(cx - half)), min(width, int(cx + half))
    crop = image[:, top:bottom, left:right].float()
    return F.interpolate(crop[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]


class TinyFaceEncoder(nn.Module):
    """A random, fixed conv encoder (float ``(B, 3, S, S)`` in [0, 1] → ``(B, 32)``), for tests only."""

    input_size = 112

    def __init__(self, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.conv1, self.conv2 = nn.Conv2d(3, 16, 5, stride=4), nn.Conv2d(16, 32, 3, stride=2)
        with torch.no_grad():
            for parameter in self.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)

    def forward(self, faces: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.relu(self.conv1(faces * 2 - 1))).flatten(1)


class OnnxFaceEncoder:
    """An ONNX face recognizer: RGB ``(B, 3, S, S)`` in [0, 1] → normalized as (x·255 − 127.5)/127.5."""

    def __init__(self, path: str, input_size: int):
        from ..errors import ModelNotFoundError

        if not Path(path).is_file():
            raise ModelNotFoundError(f"face recognizer {path!r} not found: pass an ONNX file (e.g. insightface "
                                     "antelopev2 glintr100.onnx) or 'tiny' for a demo")
        try:
            import onnxruntime
        except ImportError:
            raise ModelNotFoundError("face recognizers run with onnxruntime: pip install onnxruntime") from None
        self.session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.input_size = input_size

    def __call__(self, faces: torch.Tensor) -> torch.Tensor:
        pixels = ((faces.cpu().numpy() * 255 - 127.5) / 127.5).astype(np.float32)
        return torch.from_numpy(self.session.run(None, {self.input_name: pixels})[0])


def load_recognizer(spec: str | None, input_size: int, flag: str):
    from ..errors import UsageError

    if not spec:
        raise UsageError(f"identity metrics need a face recognizer: pass {flag} FILE.onnx (or 'tiny' for a demo)")
    return TinyFaceEncoder().eval() if spec == "tiny" else OnnxFaceEncoder(spec, input_size)


class FaceMetric(Metric):
    def __init__(self, name: str, arcface=None, vggface=None, device="cpu"):
        self.name = name
        self.device = torch.device(device)
        self.detector = _detector()
        self.recognizers = []
        if name in ("ism", "ims"):
            self.recognizers.append((1.0 if name == "ism" else 0.7, load_recognizer(arcface, 112, "--arcface-model")))
        if name == "ims":
            self.recognizers.append((0.3, load_recognizer(vggface, 224, "--vggface-model")))
        self.reference_means: dict[str, list[torch.Tensor]] = {}

    @torch.no_grad()
    def _embeddings(self, image: torch.Tensor) -> list[torch.Tensor] | None:
        boxes = detect_faces(image, self.detector)
        if not boxes:
            return None
        out = []
        for _, recognizer in self.recognizers:
            size = getattr(recognizer, "input_size", 112)
            out.append(recognizer(crop_face(image, boxes[0], size)[None]).float()[0])
        return out

    def prepare(self, references: dict[str, list[torch.Tensor]]) -> None:
        if self.name == "fdfr":
            return
        cache: dict[int, list[torch.Tensor] | None] = {}
        for concept, images in references.items():
            for image in images:
                if id(image) not in cache:
                    cache[id(image)] = self._embeddings(image)
            found = [cache[id(image)] for image in images if cache[id(image)] is not None]
            if found:
                self.reference_means[concept] = [torch.stack(parts).mean(0) for parts in zip(*found)]

    def score(self, images: Sequence[torch.Tensor], contexts: Sequence[ImageContext]) -> list[float | None]:
        if self.name == "fdfr":
            return [0.0 if detect_faces(image, self.detector) else 1.0 for image in images]
        values: list[float | None] = []
        for image, context in zip(images, contexts):
            means = self.reference_means.get(context.concept)
            if means is None:
                from ..errors import CloakError

                raise CloakError(f"{self.name}: no face found in the clean references of concept {context.concept!r}")
            embeddings = self._embeddings(image)
            if embeddings is None:
                values.append(-1.0 if self.name == "ims" else None)
                continue
            values.append(sum(weight * cosine_matrix(embedding[None], mean[None]).item()
                              for (weight, _), embedding, mean in zip(self.recognizers, embeddings, means)))
        return values


def build(name: str, arcface_model: str | None = None, vggface_model: str | None = None, device="cpu",
          **_options) -> FaceMetric:
    return FaceMetric(name, arcface_model, vggface_model, device)
