"""Raw RetinaFace decoding (biubug6/Pytorch_Retinaface: prior_box.py, box_utils.py decode/decode_landm, detect.py,
py_cpu_nms.py; issue 19 §1.9). Expectations are hand-computed from the reference's steps/min sizes/variances and
typed here; the end-to-end test feeds a stand-in raw-head network through the real alignment code."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from .test_face_align import COLOURS, TEMPLATE, RecordingEncoder, _centroid, _synthetic_face


def test_prior_grid_count_order_and_ends():
    from cloaklab.ops.metrics.retinaface import prior_boxes

    # 32 × 48: steps 8/16/32 → 4×6, 2×3, 1×2 cells, two min sizes each → (24 + 6 + 2)·2 = 64
    priors = prior_boxes(32, 48).double()
    assert priors.shape == (64, 4)
    expected = {
        0: (0.5 * 8 / 48, 0.5 * 8 / 32, 16 / 48, 16 / 32),   # level 8, cell (0, 0), min size 16
        1: (0.5 * 8 / 48, 0.5 * 8 / 32, 32 / 48, 32 / 32),   # same cell, min size 32
        2: (1.5 * 8 / 48, 0.5 * 8 / 32, 16 / 48, 16 / 32),   # cell (0, 1): columns vary fastest
        12: (0.5 * 8 / 48, 1.5 * 8 / 32, 16 / 48, 16 / 32),  # cell (1, 0)
        48: (0.5 * 16 / 48, 0.5 * 16 / 32, 64 / 48, 64 / 32),  # first prior of level 16
        63: (1.5 * 32 / 48, 0.5 * 32 / 32, 512 / 48, 512 / 32),  # last: level 32, cell (0, 1), min size 512
    }
    for index, row in expected.items():
        assert priors[index].tolist() == pytest.approx(row, abs=1e-6), index
    # ceil, not floor: 33 × 48 → 5×6, 3×3, 2×2 cells
    assert len(prior_boxes(33, 48)) == (30 + 9 + 4) * 2


def test_decode_is_the_closed_form():
    from cloaklab.ops.metrics.retinaface import decode, decode_landm

    priors = torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.1, 0.8, 0.05, 0.05]], dtype=torch.float64)
    loc = torch.tensor([[0.3, -0.5, 0.7, -0.2], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    cx, cy = 0.5 + 0.3 * 0.1 * 0.2, 0.5 - 0.5 * 0.1 * 0.4
    w, h = 0.2 * math.exp(0.7 * 0.2), 0.4 * math.exp(-0.2 * 0.2)
    boxes = decode(loc, priors)
    assert boxes[0].tolist() == pytest.approx([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], abs=1e-12)
    assert boxes[1].tolist() == pytest.approx([0.075, 0.775, 0.125, 0.825], abs=1e-12)
    landm = torch.tensor([[1.0, -1.0, 2.0, 0.5, 0.0, 0.0, -3.0, 1.0, 0.25, 4.0]] * 2, dtype=torch.float64)
    points = decode_landm(landm, priors)[0].reshape(5, 2)
    offsets = landm[0].reshape(5, 2).numpy() * 0.1 * np.array([0.2, 0.4])
    assert points.numpy() == pytest.approx(np.array([0.5, 0.5]) + offsets, abs=1e-12)


def test_nms_keeps_the_best_of_overlapping_boxes():
    from cloaklab.ops.metrics.retinaface import nms

    boxes = np.array([[1, 1, 10, 10], [0, 0, 9, 9], [20, 20, 29, 29]], float)
    # boxes 0/1: intersection 9·9 = 81, areas 10·10 (the +1 convention) → IoU 81/119 ≈ 0.68 > 0.4
    assert nms(boxes, np.array([0.8, 0.9, 0.7]), 0.4) == [1, 2]
    assert nms(boxes, np.array([0.8, 0.9, 0.7]), 0.7) == [1, 0, 2]  # 0.68 ≤ 0.7: both stay
    # half overlap: intersection 5·10 = 50, union 150 → IoU 1/3, kept at 0.4 but not at 0.3
    side = np.array([[0, 0, 9, 9], [5, 0, 14, 9]], float)
    assert nms(side, np.array([0.9, 0.6]), 0.4) == [0, 1]
    assert nms(side, np.array([0.9, 0.6]), 0.3) == [0]


# the stand-in face: the template shifted into a 220 × 180 image, box around it
LANDMARKS = TEMPLATE - [56.0, 72.0] + [106.0, 90.0]
FACE_BOX = (60.0, 40.0, 150.0, 140.0)
# 180 × 220 priors: level 8 has 23·28 cells, level 16 has 12·14; the face sits on level 16, cell (5, 6), size 64:
# centre ((6 + 0.5)·16, (5 + 0.5)·16) = (104, 88), size 64 × 64 pixels
FACE_PRIOR = 23 * 28 * 2 + (5 * 14 + 6) * 2
PRIOR_PX = (104.0, 88.0, 64.0, 64.0)
PRIOR_COUNT = (23 * 28 + 12 * 14 + 6 * 7) * 2
DECOY_PRIOR = FACE_PRIOR + 3  # level 16, cell (5, 7), size 128


def _encode_box(box, prior):
    """The inverse of the reference's decode, in pixels, typed here."""
    x1, y1, x2, y2 = box
    cx, cy, w, h = prior
    return [((x1 + x2) / 2 - cx) / (0.1 * w), ((y1 + y2) / 2 - cy) / (0.1 * h),
            math.log((x2 - x1) / w) / 0.2, math.log((y2 - y1) / h) / 0.2]


class RawHeads(nn.Module):
    """A stand-in raw RetinaFace: fixed (loc, conf, landms) with a confident face at one prior, a larger, less
    confident overlapping decoy (NMS must drop it) and background elsewhere; records its input."""

    def __init__(self):
        super().__init__()
        loc = torch.zeros(1, PRIOR_COUNT, 4)
        landms = torch.zeros(1, PRIOR_COUNT, 10)
        conf = torch.tensor([0.999, 0.001]).repeat(1, PRIOR_COUNT, 1)
        loc[0, FACE_PRIOR] = torch.tensor(_encode_box(FACE_BOX, PRIOR_PX))
        cx, cy, w, h = PRIOR_PX
        landms[0, FACE_PRIOR] = torch.from_numpy(((LANDMARKS - [cx, cy]) / (0.1 * np.array([w, h]))).reshape(-1))
        conf[0, FACE_PRIOR] = torch.tensor([0.05, 0.95])
        decoy = (55.0, 35.0, 160.0, 150.0)  # IoU with the face box ≈ 0.79
        loc[0, DECOY_PRIOR] = torch.tensor(_encode_box(decoy, (120.0, 88.0, 128.0, 128.0)))
        conf[0, DECOY_PRIOR] = torch.tensor([0.3, 0.7])
        self.register_buffer("loc", loc)
        self.register_buffer("conf", conf)
        self.register_buffer("landms", landms)
        self.seen: list[torch.Tensor] = []

    def forward(self, image: torch.Tensor):
        self.seen.append(image.detach().clone())
        return self.loc + 0 * image.sum(), self.conf, self.landms


def test_raw_heads_decode_to_the_face_and_align_onto_the_template():
    from cloaklab.ops.metrics.faces import FaceMetric, LandmarkDetector

    image = _synthetic_face(LANDMARKS)
    assert image.shape == (3, 180, 220)
    heads = RawHeads()
    faces = LandmarkDetector(heads)(image)
    assert len(faces) == 1  # the decoy is suppressed by NMS, the background is below the threshold
    (box, landmarks), = faces
    assert box == (60, 40, 90, 100)
    assert landmarks == pytest.approx(LANDMARKS, abs=1e-3)
    # the reference's input: BGR, 0–255, minus (104, 117, 123)
    pixel = image[:, 90, 106].double() * 255
    expected = [pixel[2] - 104, pixel[1] - 117, pixel[0] - 123]
    assert heads.seen[-1][0, :, 90, 106].tolist() == pytest.approx([float(v) for v in expected], abs=1e-3)

    encoder = RecordingEncoder()
    metric = FaceMetric("ism", arcface=encoder, face_detector=RawHeads())
    metric.prepare({"c": [image]})
    crop = (encoder.seen[-1][0].numpy() * 127.5 + 127.5) / 255
    for point, colour in zip(TEMPLATE, COLOURS):
        found = _centroid(crop, int(colour.argmax()), point)
        assert np.linalg.norm(found - point) < 0.5, (found, point)


class HalfScaleHeads(nn.Module):
    """Expects a 90 × 110 input: the 180 × 220 image at half scale; its face is the stand-in's, halved."""

    def forward(self, image):
        assert image.shape[-2:] == (90, 110)
        count = (12 * 14 + 6 * 7 + 3 * 4) * 2
        loc, landms = torch.zeros(1, count, 4), torch.zeros(1, count, 10)
        conf = torch.tensor([0.99, 0.01]).repeat(1, count, 1)
        index = 12 * 14 * 2 + (2 * 7 + 3) * 2  # level 16, cell (2, 3): centre (56, 40), size 64
        loc[0, index] = torch.tensor(_encode_box([v / 2 for v in FACE_BOX], (56.0, 40.0, 64.0, 64.0)))
        landms[0, index] = torch.from_numpy(((LANDMARKS / 2 - [56, 40]) / 6.4).reshape(-1))
        conf[0, index] = torch.tensor([0.1, 0.9])
        return loc, conf, landms


def test_fixed_input_size_is_letterboxed_and_scaled_back():
    from cloaklab.ops.metrics.retinaface import RawRetinaFace

    rows = RawRetinaFace(HalfScaleHeads(), (90, 110))(_synthetic_face(LANDMARKS)[None]).numpy()
    assert rows.shape == (1, 15)
    assert rows[0, :4] == pytest.approx(FACE_BOX, abs=1e-3)
    assert rows[0, 5:].reshape(5, 2) == pytest.approx(LANDMARKS, abs=1e-3)


def test_three_output_onnx_is_decoded_at_its_fixed_input_size():
    from cloaklab.ops.metrics.faces import LandmarkDetector, OnnxModel

    class FakeOnnx(OnnxModel):  # what OnnxModel reads from a session: 3 outputs, a static 90 × 110 input
        def __init__(self):
            self.output_count, self.input_size, self.net = 3, (90, 110), HalfScaleHeads()

        def __call__(self, pixels):
            return self.net(pixels)

    (box, landmarks), = LandmarkDetector(FakeOnnx())(_synthetic_face(LANDMARKS))
    assert box == (60, 40, 90, 100)
    assert landmarks == pytest.approx(LANDMARKS, abs=1e-3)


class TracedHeads(nn.Module):
    """RawHeads without the recording list, for a TorchScript file."""

    def __init__(self):
        super().__init__()
        heads = RawHeads()
        self.register_buffer("loc", heads.loc)
        self.register_buffer("conf", heads.conf)
        self.register_buffer("landms", heads.landms)

    def forward(self, image: torch.Tensor):
        return self.loc + 0 * image.sum(), self.conf, self.landms


def test_raw_torchscript_detector_through_the_cli(cli, tmp_path):
    import json

    from PIL import Image

    image = _synthetic_face(LANDMARKS)
    Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(tmp_path / "f.png")
    detector = tmp_path / "retinaface_raw.pt"
    torch.jit.trace(TracedHeads(), torch.zeros(1, 3, 180, 220)).save(str(detector))
    code, _, err = cli(["score", tmp_path / "f.png", "-m", "fdfr", "--face-detector", detector, "--trust-pickle",
                        "-o", tmp_path / "s.json"])
    assert code == 0, err
    assert '"fdfr": 0.0' in json.dumps(json.loads((tmp_path / "s.json").read_text()))
