"""Decoding of a raw RetinaFace export (biubug6/Pytorch_Retinaface, the reference detector of the papers' face
pipelines) into the ``(N, 15)`` rows the face metrics take (``x1, y1, x2, y2, score``, then ``x, y`` × 5 landmarks in
input pixels).

A RetinaFace built with ``phase="test"`` (``models/retinaface.py``; ``convert_to_onnx.py`` exports this) returns the
raw heads over a prior-box grid: ``loc (1, P, 4)``, ``conf (1, P, 2)`` — already softmaxed in the test phase, the face
probability is column 1 — and ``landms (1, P, 10)``. Reference facts used (biubug6/Pytorch_Retinaface):

* ``layers/functions/prior_box.py`` ``PriorBox``: for each level ``k`` with step ``steps[k]`` the feature map is
  ``ceil(H/step) × ceil(W/step)``; for every cell ``(i, j)`` (row-major) and every ``min_size`` of the level, one prior
  ``(cx, cy, w, h) = ((j + 0.5)·step/W, (i + 0.5)·step/H, min_size/W, min_size/H)`` in units of the image;
  ``clip`` False (no clamping).
* ``data/config.py`` ``cfg_mnet`` / ``cfg_re50``: ``min_sizes [[16, 32], [64, 128], [256, 512]]``,
  ``steps [8, 16, 32]``, ``variance [0.1, 0.2]``.
* ``utils/box_utils.py`` ``decode``: centre = prior centre + loc[:2]·0.1·prior wh, wh = prior wh·exp(loc[2:]·0.2), then
  corners; ``decode_landm``: each landmark = prior centre + landm·0.1·prior wh. Both scaled by (W, H) to pixels.
* ``detect.py``: input is the BGR image as float 0–255 minus the mean ``(104, 117, 123)`` (not scaled to [0, 1]), at
  its own size (``resize = 1``); keep scores > 0.02, top 5000 by score, greedy NMS at IoU 0.4
  (``utils/nms/py_cpu_nms.py``, areas with the ``+1`` pixel convention), then the first 750. Its drawing threshold
  (``vis_thres``) is 0.6; the face metrics apply their own ``DETECTOR_THRESHOLD`` to the decoded rows.

Where we differ: a detector with a fixed input size (an ONNX export has a static ``1 × 3 × 640 × 640`` input unless
exported with dynamic axes) gets the image resized with its aspect ratio kept and placed top-left on a mean-colour
canvas (zero after mean subtraction), and the rows are scaled back; ``detect.py`` feeds the original size.
"""

from __future__ import annotations

import math

import numpy as np
import torch

MIN_SIZES = ((16, 32), (64, 128), (256, 512))
STEPS = (8, 16, 32)
VARIANCES = (0.1, 0.2)
MEAN_BGR = (104.0, 117.0, 123.0)
CONFIDENCE_THRESHOLD = 0.02
TOP_K = 5000
NMS_THRESHOLD = 0.4
KEEP_TOP_K = 750


def prior_boxes(height: int, width: int, min_sizes=MIN_SIZES, steps=STEPS) -> torch.Tensor:
    """The priors ``(P, 4)`` as ``(cx, cy, w, h)`` in image units for an ``height × width`` input, in the order of
    the network's concatenated heads (level, row, column, min size)."""
    levels = []
    for sizes, step in zip(min_sizes, steps):
        rows, cols = math.ceil(height / step), math.ceil(width / step)
        cy = (torch.arange(rows, dtype=torch.float64) + 0.5) * step / height
        cx = (torch.arange(cols, dtype=torch.float64) + 0.5) * step / width
        grid_y, grid_x = torch.meshgrid(cy, cx, indexing="ij")
        per_size = [torch.stack([grid_x, grid_y, torch.full_like(grid_x, size / width),
                                 torch.full_like(grid_x, size / height)], -1) for size in sizes]
        levels.append(torch.stack(per_size, 2).reshape(-1, 4))
    return torch.cat(levels).float()


def decode(loc: torch.Tensor, priors: torch.Tensor, variances=VARIANCES) -> torch.Tensor:
    """Box offsets ``(P, 4)`` → corners ``(P, 4)`` ``x1, y1, x2, y2`` in image units."""
    centres = priors[:, :2] + loc[:, :2] * variances[0] * priors[:, 2:]
    sizes = priors[:, 2:] * torch.exp(loc[:, 2:] * variances[1])
    return torch.cat([centres - sizes / 2, centres + sizes / 2], 1)


def decode_landm(landms: torch.Tensor, priors: torch.Tensor, variances=VARIANCES) -> torch.Tensor:
    """Landmark offsets ``(P, 10)`` → ``(P, 10)`` ``x, y`` × 5 in image units."""
    points = priors[:, None, :2] + landms.reshape(-1, 5, 2) * variances[0] * priors[:, None, 2:]
    return points.reshape(-1, 10)


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float = NMS_THRESHOLD) -> list[int]:
    """Greedy non-maximum suppression: indices kept, highest score first; a box is dropped when its IoU with a kept
    one exceeds ``threshold`` (areas ``(x2 − x1 + 1)·(y2 − y1 + 1)``, the reference's pixel convention)."""
    boxes, scores = np.asarray(boxes, np.float64), np.asarray(scores, np.float64)
    areas = (boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1)
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while order.size:
        best, rest = order[0], order[1:]
        keep.append(int(best))
        width = np.maximum(0.0, np.minimum(boxes[best, 2], boxes[rest, 2])
                           - np.maximum(boxes[best, 0], boxes[rest, 0]) + 1)
        height = np.maximum(0.0, np.minimum(boxes[best, 3], boxes[rest, 3])
                            - np.maximum(boxes[best, 1], boxes[rest, 1]) + 1)
        inter = width * height
        overlap = inter / (areas[best] + areas[rest] - inter)
        order = rest[overlap <= threshold]
    return keep


def postprocess(loc, conf, landms, height: int, width: int, confidence: float = CONFIDENCE_THRESHOLD,
                top_k: int = TOP_K, nms_threshold: float = NMS_THRESHOLD, keep_top_k: int = KEEP_TOP_K) -> np.ndarray:
    """Raw heads (batch of one) for an ``height × width`` input → detections ``(N, 15)`` in input pixels
    (``detect.py``'s steps)."""
    loc = torch.as_tensor(loc).float().reshape(-1, 4)
    landms = torch.as_tensor(landms).float().reshape(-1, 10)
    conf = torch.as_tensor(conf).float()
    scores = (conf.reshape(-1, conf.shape[-1])[:, 1] if conf.shape[-1] == 2 else conf.reshape(-1)).numpy()
    priors = prior_boxes(height, width)
    if len(priors) != len(loc) or len(loc) != len(landms) or len(scores) != len(loc):
        from ..errors import CloakError

        raise CloakError(f"RetinaFace heads have {len(loc)}/{len(scores)}/{len(landms)} rows, the prior grid of a "
                         f"{height}×{width} input has {len(priors)} (min sizes {MIN_SIZES}, steps {STEPS})")
    boxes = (decode(loc, priors) * torch.tensor([width, height] * 2)).numpy()
    points = (decode_landm(landms, priors) * torch.tensor([width, height] * 5)).numpy()
    chosen = np.where(scores > confidence)[0]
    chosen = chosen[np.argsort(-scores[chosen], kind="stable")][:top_k]
    boxes, points, scores = boxes[chosen], points[chosen], scores[chosen]
    keep = nms(boxes, scores, nms_threshold)[:keep_top_k]
    return np.hstack([boxes[keep], scores[keep, None], points[keep]]).astype(np.float32).reshape(-1, 15)


def to_reference_input(image: torch.Tensor) -> torch.Tensor:
    """RGB ``(B, 3, H, W)`` in [0, 1] → BGR float 0–255 minus ``MEAN_BGR`` (``detect.py``'s input)."""
    mean = torch.tensor(MEAN_BGR, dtype=torch.float32).view(1, 3, 1, 1)
    return image.float().flip(1) * 255 - mean


class RawRetinaFace:
    """Wraps a raw-head RetinaFace (``model(x) → (loc, conf, landms)``) as a ``(1, 3, H, W)`` RGB [0, 1] → ``(N, 15)``
    detector. ``input_size`` ``(h, w)``: a fixed network input (letterboxed top-left, see the module docstring)."""

    def __init__(self, model, input_size: tuple[int, int] | None = None):
        self.model, self.input_size = model, input_size

    @torch.no_grad()
    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        pixels = to_reference_input(image)
        height, width = pixels.shape[-2:]
        scale = 1.0
        if self.input_size is not None and tuple(self.input_size) != (height, width):
            import torch.nn.functional as F

            target_h, target_w = self.input_size
            scale = min(target_h / height, target_w / width)
            new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
            resized = F.interpolate(pixels, size=(new_h, new_w), mode="bilinear", align_corners=False)
            pixels = torch.zeros(1, 3, target_h, target_w)
            pixels[:, :, :new_h, :new_w] = resized
            height, width = target_h, target_w
        outputs = self.model(pixels)
        if not isinstance(outputs, (tuple, list)) or len(outputs) != 3:
            from ..errors import CloakError

            raise CloakError("a raw RetinaFace detector must return (loc, conf, landms)")
        loc, conf, landms = outputs
        rows = postprocess(loc, conf, landms, height, width)
        rows[:, :4] /= scale
        rows[:, 5:] /= scale
        return torch.from_numpy(rows)
