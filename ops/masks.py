"""Concept masks with Segment Anything (Kirillov et al. 2023), as paper 000 §5.1.1 makes them for loss masking.

One binary mask per image (``True`` = the concept), at the image's own size (EXIF applied):
  * automatic (default): SAM's automatic mask generator (a grid of point prompts), then the *central* object — the
    largest mask that contains the image centre, ignoring masks that touch all four borders (background) — or, with
    ``select="largest"``, the largest such mask; if SAM keeps no mask, fall back to a centre-point prompt;
  * prompted: ``box=(x0, y0, x1, y1)`` and/or positive ``points=[(x, y), …]`` in image pixels, or ``center=True``
    (one point at the image centre); SAM's three multimask outputs → the one with the best predicted IoU.
Dilation (paper 000 App. J, "LM-D16": 16 px on its 512² training images): Pillow ``ImageFilter.MaxFilter(2N'+1)``
at the image's own size with ``N' = round(N · min(W, H) / 512)``, so that once training resizes the short side to
512 (``ops.train.data.resize_and_crop``) the dilation is N pixels on every aspect ratio (at another training
resolution R it is N·R/512 pixels: the same fraction of the image, e.g. 2 px at the toy world's 64); a single
on-pixel becomes a (2N'+1)² square.

Checkpoints (Meta, Apache-2.0): ``vit_h`` sam_vit_h_4b8939.pth, ``vit_l`` sam_vit_l_0b3195.pth, ``vit_b``
sam_vit_b_01ec64.pth from https://dl.fbaipublicfiles.com/segment_anything/ ; looked up in ``--sam-checkpoint``,
``$CLOAK_SAM_CHECKPOINT`` or ``~/.cache/segment_anything/``. They are loaded as plain state dicts
(``torch.load(weights_only=True)``, no code runs) or from ``.safetensors``. ``sam_type="tiny"`` is a tiny random
SAM built in code from segment-anything's own modules (tests and demos; its masks mean nothing).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ModelNotFoundError, RejectedInput, UsageError
from .extras import require

if TYPE_CHECKING:
    import numpy as np

SAM_TYPES = ("vit_h", "vit_l", "vit_b", "tiny")  # --sam-type
DEFAULT_SAM_TYPE = "vit_h"  # the model paper 000 names
SELECT_MODES = ("central", "largest")  # --select: which automatic mask is the concept (see _pick_automatic)
SAM_FILES = {"vit_h": "sam_vit_h_4b8939.pth", "vit_l": "sam_vit_l_0b3195.pth", "vit_b": "sam_vit_b_01ec64.pth"}
SAM_URL = "https://dl.fbaipublicfiles.com/segment_anything/"
DILATION_REFERENCE = 512  # paper 000 App. J dilates masks of 512×512 training images


# ---------------------------------------------------------------------------------------------------- dilation
def scaled_dilation(pixels: int, size: tuple[int, int], resolution: int = DILATION_REFERENCE) -> int:
    """Native dilation radius for an image of ``size`` (W, H): ``round(N · min(W, H) / resolution)`` — N pixels once
    the short side is resized to ``resolution`` (512: paper 000's training size), whatever the aspect ratio (0 stays
    0). Scaling by ``max(W, H)`` instead turned LM-D16 into D24 on a 1536×1024 photo."""
    if pixels < 0:
        raise UsageError(f"--dilate must be >= 0, got {pixels}")
    return int(round(pixels * min(size) / resolution))


def dilate_mask(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary ``(H, W)`` (bool, or uint8 > 127, or float > 0.5) → dilated bool ``(H, W)`` by Pillow's
    ``MaxFilter(2·radius + 1)`` — a single on-pixel grows into a (2·radius+1)² square, clipped at the border."""
    import numpy as np
    from PIL import Image, ImageFilter

    array = np.asarray(mask)
    on = array > 127 if array.dtype == np.uint8 else array > 0.5 if array.dtype.kind == "f" else array.astype(bool)
    if radius <= 0:
        return on.copy()
    image = Image.fromarray(on.astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(2 * radius + 1))
    return np.asarray(image) > 127


def read_mask(path: Path) -> np.ndarray:
    """A mask file → bool ``(H, W)``: grey > 127 (an all-black image with alpha uses the alpha instead)."""
    import numpy as np
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
            gray = np.asarray(image.convert("L"))
            if gray.max() == 0 and ("A" in image.getbands() or "transparency" in image.info):
                gray = np.asarray(image.convert("RGBA").getchannel("A"))
    except (OSError, ValueError) as exc:
        raise RejectedInput(f"mask {path} is unreadable ({exc})") from None
    return gray > 127


# ----------------------------------------------------------------------------------------------------- models
def require_sam() -> None:
    """Raise one line naming the ``sam`` extra when segment-anything or torchvision is not installed."""
    require(("segment_anything", "torchvision"), "sam", "cloak mask needs Segment Anything")


def build_tiny_sam(seed: int = 0):
    """A tiny random SAM (image 64 px, patch 8, width 32) from segment-anything's modules: same code path as the
    real models (predictor, automatic generator), for tests. Deterministic for a seed."""
    import torch
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        dim, size, patch = 32, 64, 8
        sam = Sam(
            image_encoder=ImageEncoderViT(img_size=size, patch_size=patch, embed_dim=32, depth=2, num_heads=2,
                                          out_chans=dim, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
                                          use_rel_pos=True, window_size=4, global_attn_indexes=(1,)),
            prompt_encoder=PromptEncoder(embed_dim=dim, image_embedding_size=(size // patch, size // patch),
                                         input_image_size=(size, size), mask_in_chans=4),
            mask_decoder=MaskDecoder(num_multimask_outputs=3, transformer_dim=dim, iou_head_depth=2,
                                     iou_head_hidden_dim=32,
                                     transformer=TwoWayTransformer(depth=1, embedding_dim=dim, mlp_dim=64,
                                                                   num_heads=2)),
            pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375])
    return sam.eval()


def find_sam_checkpoint(sam_type: str, checkpoint: str | None) -> Path:
    """The checkpoint file for ``sam_type``: the given path, ``$CLOAK_SAM_CHECKPOINT``, or the default cache."""
    given = checkpoint or os.environ.get("CLOAK_SAM_CHECKPOINT")
    if given:
        path = Path(given).expanduser()
        if not path.is_file():
            raise ModelNotFoundError(f"SAM checkpoint {path} not found (download {SAM_FILES.get(sam_type, '')} "
                                     f"from {SAM_URL})")
        return path
    cache = Path(os.environ.get("CLOAK_SAM_CACHE", "~/.cache/segment_anything")).expanduser()
    path = cache / SAM_FILES[sam_type]
    if not path.is_file():
        raise ModelNotFoundError(f"SAM {sam_type} checkpoint not found at {path}: download {SAM_FILES[sam_type]} "
                                 f"from {SAM_URL} into {cache} or pass --sam-checkpoint PATH (--sam-type tiny "
                                 "gives a random demo model)")
    return path


def load_sam(sam_type: str = DEFAULT_SAM_TYPE, checkpoint: str | None = None, device: Any = "cpu"):
    """A SAM model on ``device`` in eval mode; the checkpoint's weights are loaded as a plain state dict."""
    import torch

    if sam_type not in SAM_TYPES:
        raise UsageError(f"--sam-type {sam_type!r}: choose one of {', '.join(SAM_TYPES)}")
    require_sam()
    if sam_type == "tiny":
        return build_tiny_sam().to(device)
    from segment_anything import sam_model_registry

    path = find_sam_checkpoint(sam_type, checkpoint)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        sam = sam_model_registry[sam_type](checkpoint=None)
        sam.load_state_dict(state)
    except (RuntimeError, OSError, ValueError) as exc:
        raise ModelNotFoundError(f"{path} is not a SAM {sam_type} checkpoint ({str(exc).splitlines()[0][:160]}); "
                                 "check --sam-type") from None
    return sam.to(device).eval()


# ------------------------------------------------------------------------------------------------ segmentation
@dataclass
class MaskPrompt:
    """What to segment: nothing (automatic), a box and/or points (image pixels), or the image centre."""

    box: tuple[float, float, float, float] | None = None
    points: Sequence[tuple[float, float]] = ()
    center: bool = False
    select: str = "central"
    points_per_side: int = 32

    @property
    def automatic(self) -> bool:
        return self.box is None and not self.points and not self.center


def _prompted(predictor, prompt: MaskPrompt, width: int, height: int) -> tuple[np.ndarray, float]:
    import numpy as np

    points = [tuple(p) for p in prompt.points]
    if prompt.center:
        points.append(((width - 1) / 2, (height - 1) / 2))
    coords = np.array(points, dtype=np.float32) if points else None
    labels = np.ones(len(points), dtype=np.int64) if points else None
    box = np.array(prompt.box, dtype=np.float32) if prompt.box is not None else None
    masks, scores, _ = predictor.predict(point_coords=coords, point_labels=labels, box=box, multimask_output=True)
    best = int(np.argmax(scores))
    return masks[best].astype(bool), float(scores[best])


def _pick_automatic(candidates: list[dict], width: int, height: int, select: str) -> dict | None:
    def background(mask: np.ndarray) -> bool:
        return bool(mask[0].any() and mask[-1].any() and mask[:, 0].any() and mask[:, -1].any())

    kept = [c for c in candidates if c["segmentation"].any() and not background(c["segmentation"])]
    if select == "central":
        cx, cy = width // 2, height // 2
        central = [c for c in kept if c["segmentation"][cy, cx]]
        kept = central or kept
    return max(kept, key=lambda c: int(c["segmentation"].sum()), default=None)


def box_problem(box: Sequence[float] | None, width: int, height: int) -> str | None:
    """Why a ``box`` prompt cannot be used on a ``width``×``height`` image (it must lie inside it), or None."""
    if box is None:
        return None
    x0, y0, x1, y1 = box
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        return f"--box {x0},{y0},{x1},{y1} is outside this {width}x{height} image"
    return None


def segment(sam, rgb: np.ndarray, prompt: MaskPrompt, **generator_kwargs: Any) -> tuple[np.ndarray, dict[str, Any]]:
    """``rgb`` uint8 ``(H, W, 3)`` → bool mask ``(H, W)`` and stats (mode, SAM score)."""
    from segment_anything import SamAutomaticMaskGenerator, SamPredictor

    height, width = rgb.shape[:2]
    problem = box_problem(prompt.box, width, height)
    if problem:
        raise RejectedInput(problem)
    if prompt.automatic:
        generator = SamAutomaticMaskGenerator(sam, points_per_side=prompt.points_per_side, **generator_kwargs)
        picked = _pick_automatic(generator.generate(rgb), width, height, prompt.select)
        if picked is not None:
            return picked["segmentation"].astype(bool), {"mode": f"auto-{prompt.select}",
                                                         "score": float(picked["predicted_iou"])}
        prompt = MaskPrompt(center=True)
        mode = "auto-fallback-center"
    else:
        mode = "prompted"
    predictor = SamPredictor(sam)
    predictor.set_image(rgb)
    mask, score = _prompted(predictor, prompt, width, height)
    return mask, {"mode": mode, "score": score}


def overlay(rgb: np.ndarray, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """A preview: the image with the mask tinted red, uint8 ``(H, W, 3)``."""
    import numpy as np

    tinted = rgb.astype(np.float32)
    red = np.array([255, 0, 0], dtype=np.float32)
    tinted[mask] = (1 - alpha) * tinted[mask] + alpha * red
    return np.rint(tinted).clip(0, 255).astype(np.uint8)
