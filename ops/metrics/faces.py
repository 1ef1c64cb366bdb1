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

Recognizers: ONNX files run with onnxruntime (``pip install onnxruntime``, imported only when an ``.onnx`` file is
given), any other file is a TorchScript module (``torch.jit.save``; needs ``--trust-pickle``): ArcFace e.g.
insightface antelopev2 ``glintr100.onnx`` (``--arcface-model``), VGG-Face any export taking 224² RGB
(``--vggface-model``). Neither is downloadable here; ``tiny`` builds a small random conv encoder in code (tests and
demos only). Inputs are RGB normalized as ``(x·255 − 127.5)/127.5`` (insightface ``ArcFaceONNX``).

Two pipelines:
  * **Haar (default, offline fallback)** — faces are cropped from the Haar box enlarged by 20 % and resized, with
    no landmark alignment (an approximation of the papers' pipeline).
  * **RetinaFace + aligned ArcFace (the papers' pipeline; ``--face-detector FILE``)** — a user-supplied detector
    (ONNX or TorchScript) returns boxes, scores and five landmarks; faces with score ≥ ``DETECTOR_THRESHOLD`` (0.5,
    insightface's ``det_thresh``) count as found (FDFR), and the largest one is aligned onto ArcFace's 112² template
    by :func:`.face_align.norm_crop` (insightface ``face_align.norm_crop``) before the ArcFace embedding; VGG-Face
    (``ims``) gets the detector's box crop at 224². The detector contract: input ``(1, 3, H, W)`` float RGB in
    [0, 1]; output ``(N, 15)`` = ``x1, y1, x2, y2, score`` and the landmarks ``x, y`` × 5 (left eye, right eye,
    nose, left mouth corner, right mouth corner) in input pixels — i.e. RetinaFace *after* its prior-box decoding
    and NMS. **Raw RetinaFace exports** (biubug6/Pytorch_Retinaface ``phase="test"``: ``loc (1, P, 4)``,
    ``conf (1, P, 2)`` softmaxed, ``landms (1, P, 10)``) are recognized automatically — an ONNX file with three
    outputs, or a model whose first answer is three tensors — and decoded by :mod:`.retinaface` as that repository's
    ``layers/functions/prior_box.py``, ``utils/box_utils.py`` (``decode``, ``decode_landm``) and ``detect.py`` do
    (BGR 0–255 minus (104, 117, 123) input, scores > 0.02, top 5000, NMS 0.4, keep 750).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..similarity import cosine_matrix
from .base import ImageContext, Metric

CASCADE = "haarcascade_frontalface_default.xml"
DETECTION_SIZE = 256
DETECTOR_THRESHOLD = 0.5


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


def _normalize(faces: torch.Tensor) -> torch.Tensor:
    return (faces.float() * 255 - 127.5) / 127.5


class OnnxModel:
    """An ONNX model run with onnxruntime (imported here, so the core never needs it): ``(B, 3, S, S)`` → outputs."""

    def __init__(self, path: str):
        from ..errors import ModelNotFoundError

        try:
            import onnxruntime
        except ImportError:
            raise ModelNotFoundError(f"{path}: ONNX face models run with onnxruntime (pip install onnxruntime), or "
                                     "pass a TorchScript file") from None
        self.session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        model_input = self.session.get_inputs()[0]
        self.input_name = model_input.name
        self.output_count = len(self.session.get_outputs())
        shape = list(model_input.shape)[-2:]
        self.input_size = tuple(shape) if all(isinstance(side, int) and side > 0 for side in shape) else None

    def __call__(self, pixels: torch.Tensor):
        """The first output, or all of them as a tuple when the model has several (a raw RetinaFace's heads)."""
        outputs = self.session.run(None, {self.input_name: pixels.cpu().numpy().astype(np.float32)})
        if self.output_count > 1:
            return tuple(torch.from_numpy(output) for output in outputs)
        return torch.from_numpy(outputs[0])


def load_face_model(spec, flag: str, trust_pickle: bool = False):
    """A face network from ``spec``: an ``nn.Module`` as it is, an ``.onnx`` file (onnxruntime), or a TorchScript
    file (``--trust-pickle``: a TorchScript archive carries code)."""
    from ..errors import ModelNotFoundError, UsageError

    if isinstance(spec, nn.Module) or callable(spec) and not isinstance(spec, (str, Path)):
        return spec
    path = Path(str(spec))
    if not path.is_file():
        raise ModelNotFoundError(f"{flag} {spec!r} not found: pass an ONNX or TorchScript file (or 'tiny' for a "
                                 "demo where offered)")
    if path.suffix.lower() == ".onnx":
        return OnnxModel(str(path))
    if not trust_pickle:
        raise UsageError(f"{flag} {path}: TorchScript files can run code; pass --trust-pickle to load it")
    return torch.jit.load(str(path), map_location="cpu").eval()


class FaceEncoder:
    """A face recognizer: RGB ``(B, 3, S, S)`` in [0, 1] → ``(B, D)`` embeddings, input normalized as
    ``(x·255 − 127.5)/127.5`` (insightface ``ArcFaceONNX.get_feat``: input_mean = input_std = 127.5, RGB)."""

    def __init__(self, model, input_size: int):
        self.model, self.input_size = model, input_size

    def __call__(self, faces: torch.Tensor) -> torch.Tensor:
        return self.model(_normalize(faces))


def load_recognizer(spec: str | None, input_size: int, flag: str, trust_pickle: bool = False):
    from ..errors import UsageError

    if spec is None or spec == "":
        raise UsageError(f"identity metrics need a face recognizer: pass {flag} FILE (.onnx, or TorchScript with "
                         "--trust-pickle; or 'tiny' for a demo)")
    if isinstance(spec, str) and spec == "tiny":
        return TinyFaceEncoder().eval()
    return FaceEncoder(load_face_model(spec, flag, trust_pickle), input_size)


class LandmarkDetector:
    """A RetinaFace-style detector (module docstring): decoded ``(N, 15)`` rows, or a raw RetinaFace's three heads,
    recognized automatically (an ONNX file by its output count, any other model by its first answer) and decoded by
    :class:`.retinaface.RawRetinaFace`."""

    def __init__(self, model, threshold: float = DETECTOR_THRESHOLD):
        from .retinaface import RawRetinaFace

        self.model, self.threshold = model, threshold
        self.raw = isinstance(model, RawRetinaFace) or None
        if isinstance(model, OnnxModel):
            self.raw = model.output_count == 3
            if self.raw:
                self.model = RawRetinaFace(model, model.input_size)

    @torch.no_grad()
    def __call__(self, image: torch.Tensor) -> list[tuple[tuple[int, int, int, int], np.ndarray]]:
        """Faces ``[(box (x, y, w, h), landmarks (5, 2))]`` with score ≥ threshold, largest box first."""
        pixels = image.detach().float().cpu().clamp(0, 1)[None]
        output = self.model(pixels)
        if self.raw is None:  # first call: which contract does this model follow?
            self.raw = isinstance(output, (tuple, list)) and len(output) == 3
            if self.raw:
                from .retinaface import RawRetinaFace

                self.model = RawRetinaFace(self.model)
                output = self.model(pixels)
        rows = torch.as_tensor(output).reshape(-1, 15).float().numpy()
        faces = []
        for row in rows[rows[:, 4] >= self.threshold]:
            x1, y1, x2, y2 = row[:4]
            faces.append(((int(round(x1)), int(round(y1)), int(round(x2 - x1)), int(round(y2 - y1))),
                          row[5:15].reshape(5, 2).astype(np.float64)))
        return sorted(faces, key=lambda face: -face[0][2] * face[0][3])


class FaceMetric(Metric):
    """FDFR / ISM / IMS with the Haar fallback (``face_detector`` None or ``"haar"``) or a RetinaFace-style detector
    with ArcFace alignment (``face_detector`` = a file or module; see the module docstring)."""

    def __init__(self, name: str, arcface=None, vggface=None, device="cpu", face_detector=None,
                 trust_pickle: bool = False):
        from .face_align import norm_crop

        self.name = name
        self.device = torch.device(device)
        self.aligned = face_detector not in (None, "haar")
        self.detector = (LandmarkDetector(load_face_model(face_detector, "--face-detector", trust_pickle))
                         if self.aligned else _detector())
        self.norm_crop = norm_crop
        self.recognizers = []
        if name in ("ism", "ims"):
            self.recognizers.append((1.0 if name == "ism" else 0.7,
                                     load_recognizer(arcface, 112, "--arcface-model", trust_pickle)))
        if name == "ims":
            self.recognizers.append((0.3, load_recognizer(vggface, 224, "--vggface-model", trust_pickle)))
        self.reference_means: dict[str, list[torch.Tensor]] = {}

    def faces(self, image: torch.Tensor) -> list[tuple[tuple[int, int, int, int], np.ndarray | None]]:
        """``[(box, landmarks or None)]``, largest first."""
        if self.aligned:
            return self.detector(image)
        return [(box, None) for box in detect_faces(image, self.detector)]

    @torch.no_grad()
    def _embeddings(self, image: torch.Tensor) -> list[torch.Tensor] | None:
        faces = self.faces(image)
        if not faces:
            return None
        box, landmarks = faces[0]
        out = []
        for index, (_, recognizer) in enumerate(self.recognizers):
            size = getattr(recognizer, "input_size", 112)
            if landmarks is not None and index == 0:  # ArcFace: the 5-point aligned crop
                crop = self.norm_crop(image, landmarks, size)
            else:
                crop = crop_face(image, box, size)
            out.append(recognizer(crop[None]).float()[0])
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
            return [0.0 if self.faces(image) else 1.0 for image in images]
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
          face_detector=None, trust_pickle: bool = False, **_options) -> FaceMetric:
    return FaceMetric(name, arcface_model, vggface_model, device, face_detector, trust_pickle)
