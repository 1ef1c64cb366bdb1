"""RetinaFace → 5-point ArcFace alignment → embedding (issue 19 §1.9), on stand-in networks built here with the real
alignment code: the aligned crop puts the landmarks on insightface's template, the transform is the least-squares
similarity (checked against OpenCV and a linear least-squares solve typed here), and the detector/recognizer files
load as TorchScript (ONNX only with onnxruntime)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

# insightface python-package/insightface/utils/face_align.py, arcface_dst (112 × 112)
TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655],
                     [70.7299, 92.2041]])
COLOURS = np.eye(3)[[0, 1, 2, 0, 1]] * 1.0  # dot colours; dots 0/3 and 1/4 share a colour but lie far apart


def _similarity(scale: float, angle: float, tx: float, ty: float) -> np.ndarray:
    c, s = scale * math.cos(angle), scale * math.sin(angle)
    return np.array([[c, -s, tx], [s, c, ty]])


def _apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:, :2].T + matrix[:, 2]


def _synthetic_face(landmarks: np.ndarray, height: int = 180, width: int = 220) -> torch.Tensor:
    """A grey image with a Gaussian dot (σ 2.5 px) of a distinct colour at each landmark."""
    ys, xs = np.mgrid[0:height, 0:width]
    image = np.full((3, height, width), 0.0)
    for (x, y), colour in zip(landmarks, COLOURS):
        blob = np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * 2.5 ** 2))
        image += colour[:, None, None] * blob
    return torch.from_numpy(image.clip(0, 1)).float()


class StandInDetector(nn.Module):
    """Returns fixed detections ``(N, 15)``: a confident face with the given landmarks and a weak one."""

    def __init__(self, landmarks: np.ndarray, score: float = 0.9):
        super().__init__()
        box = [landmarks[:, 0].min() - 20, landmarks[:, 1].min() - 30, landmarks[:, 0].max() + 20,
               landmarks[:, 1].max() + 20]
        strong = box + [score] + landmarks.reshape(-1).tolist()
        weak = [0, 0, 200, 170, 0.1] + [1.0] * 10  # larger box, below the 0.5 threshold: must be ignored
        self.register_buffer("rows", torch.tensor([strong, weak], dtype=torch.float32))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.rows + 0 * image.sum()


class RecordingEncoder(nn.Module):
    """Embeds by flattening and records what it was given."""

    def __init__(self):
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, faces: torch.Tensor) -> torch.Tensor:
        self.seen.append(faces.detach().clone())
        return faces.flatten(1)


def test_template_is_insightfaces():
    from cloaklab.ops.metrics.face_align import ARCFACE_TEMPLATE, template

    assert np.allclose(ARCFACE_TEMPLATE, TEMPLATE, atol=1e-6)
    assert np.allclose(template(224), TEMPLATE * 2)
    assert np.allclose(template(128), TEMPLATE * (128 / 128) + [8, 0])  # estimate_norm's 128 variant


def test_similarity_is_the_least_squares_solution():
    from cloaklab.ops.metrics.face_align import similarity_transform

    generator = np.random.default_rng(0)
    truth = _similarity(1.7, 0.4, 12.0, -5.0)
    source = generator.uniform(0, 100, (5, 2))
    exact = similarity_transform(source, _apply(truth, source))
    assert np.allclose(exact, truth, atol=1e-9)
    import cv2

    opencv, _ = cv2.estimateAffinePartial2D(source.astype(np.float32), _apply(truth, source).astype(np.float32))
    assert np.allclose(exact, opencv, atol=1e-3)
    # noisy targets: x' = a x − b y + tx, y' = b x + a y + ty is linear in (a, b, tx, ty) — solve it directly
    target = _apply(truth, source) + generator.normal(0, 2.0, (5, 2))
    rows = []
    for x, y in source:
        rows += [[x, -y, 1, 0], [y, x, 0, 1]]
    (a, b, tx, ty), *_ = np.linalg.lstsq(np.array(rows), target.reshape(-1), rcond=None)
    assert np.allclose(similarity_transform(source, target), [[a, -b, tx], [b, a, ty]], atol=1e-8)


def _centroid(image: np.ndarray, channel: int, near: np.ndarray, radius: float = 8) -> np.ndarray:
    ys, xs = np.mgrid[0:image.shape[1], 0:image.shape[2]]
    weight = image[channel] * (((xs - near[0]) ** 2 + (ys - near[1]) ** 2) < radius ** 2)
    return np.array([(weight * xs).sum(), (weight * ys).sum()]) / weight.sum()


def test_aligned_crop_puts_the_landmarks_on_the_template():
    from cloaklab.ops.metrics.faces import FaceMetric

    # a face at 1.3× the template's size, rotated 25°, placed off-centre in a 220 × 180 photo
    placement = _similarity(1.3, math.radians(25), 70.0, 20.0)
    landmarks = _apply(placement, TEMPLATE)
    image = _synthetic_face(landmarks)
    encoder = RecordingEncoder()
    metric = FaceMetric("ism", arcface=encoder, face_detector=StandInDetector(landmarks))
    metric.prepare({"c": [image]})
    crop = (encoder.seen[-1][0].numpy() * 127.5 + 127.5) / 255  # undo the ArcFace input normalization
    assert crop.shape == (3, 112, 112)
    for point, colour in zip(TEMPLATE, COLOURS):
        found = _centroid(crop, int(colour.argmax()), point)
        assert np.linalg.norm(found - point) < 0.5, (found, point)
    assert metric.score([image], [type("C", (), {"concept": "c"})()]) == [pytest.approx(1.0, abs=1e-4)]


def test_fdfr_counts_only_confident_detections():
    from cloaklab.ops.metrics.faces import FaceMetric

    landmarks = _apply(_similarity(1.0, 0.0, 40, 30), TEMPLATE)
    image = _synthetic_face(landmarks)
    assert FaceMetric("fdfr", face_detector=StandInDetector(landmarks)).score([image], [None]) == [0.0]
    assert FaceMetric("fdfr", face_detector=StandInDetector(landmarks, score=0.3)).score([image], [None]) == [1.0]


def test_torchscript_detector_through_the_cli(cli, tmp_path):
    from PIL import Image

    landmarks = _apply(_similarity(1.0, 0.0, 40, 30), TEMPLATE)
    image = _synthetic_face(landmarks)
    Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(tmp_path / "f.png")
    detector = tmp_path / "retinaface.pt"
    torch.jit.script(StandInDetector(landmarks)).save(str(detector))
    args = ["score", tmp_path / "f.png", "-m", "fdfr", "--face-detector", detector, "-o", tmp_path / "s.json"]
    code, _, err = cli(args)
    assert code == 2 and "--trust-pickle" in err
    code, _, err = cli(args + ["--trust-pickle"])
    assert code == 0, err
    import json

    document = json.loads((tmp_path / "s.json").read_text())
    assert document["params"]["backbones"]["fdfr"] == str(detector)
    assert '"fdfr": 0.0' in json.dumps(document)  # the stand-in's confident face was found


def test_onnx_needs_onnxruntime(tmp_path):
    from cloaklab.ops.errors import CloakError
    from cloaklab.ops.metrics.faces import FaceMetric

    model = tmp_path / "det.onnx"
    model.write_bytes(b"not really onnx")
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        with pytest.raises(CloakError, match="onnxruntime"):
            FaceMetric("fdfr", face_detector=str(model))


def test_ism_and_ims_are_weighted_cosines_to_the_mean_clean_embedding():
    """Paper 001 §5.1: ISM = cos(ArcFace(gen), mean ArcFace(clean)); IMS = 0.7·that + 0.3·the VGG-Face cosine; no face:
    ISM left out (None), IMS −1. Fixed embeddings per (constant) image, values typed by hand."""
    from cloaklab.ops.metrics.base import ImageContext
    from cloaklab.ops.metrics.faces import FaceMetric

    landmarks = TEMPLATE + 24.0  # the aligned 112² crop lies inside the 160² image: a constant image stays constant
    row = [20.0, 30.0, 140.0, 150.0, 0.9, *landmarks.reshape(-1).tolist()]

    def detector(pixels):  # a face on every image but the nearly black one
        return torch.tensor([row if pixels.mean() > 0.1 else row[:4] + [0.0] + row[5:]])

    def lookup(table):
        def encode(faces):  # faces arrive as (x·255 − 127.5)/127.5 = 2x − 1
            return torch.tensor([table[round(float((face.mean() + 1) / 2), 1)] for face in faces])
        return encode

    arcface = lookup({0.2: [1.0, 0.0], 0.4: [0.0, 2.0], 0.6: [3.0, 4.0]})
    vggface = lookup({0.2: [1.0, 0.0], 0.4: [1.0, 0.0], 0.6: [0.0, 1.0]})
    image = {v: torch.full((3, 160, 160), v) for v in (0.05, 0.2, 0.4, 0.6)}
    contexts = [ImageContext("g", "p"), ImageContext("n", "p")]
    # mean clean ArcFace [0.5, 1]: cos([3, 4], [0.5, 1]) = 5.5 / (5·√1.25) (the mean of the cosines would be 0.7)
    ism_value = 5.5 / (5 * math.sqrt(1.25))
    values = {}
    for name in ("ism", "ims"):
        metric = FaceMetric(name, arcface=arcface, vggface=vggface, face_detector=detector)
        metric.prepare({"p": [image[0.2], image[0.4]]})
        values[name] = metric.score([image[0.6], image[0.05]], contexts)
    assert values["ism"][0] == pytest.approx(ism_value, abs=1e-5) and values["ism"][1] is None
    # VGG-Face: cos([0, 1], mean [1, 0]) = 0
    assert values["ims"] == [pytest.approx(0.7 * ism_value + 0.3 * 0.0, abs=1e-5), -1.0]
