"""Training data for personalization: instance images at a training resolution, prompt templates, the JPEG
preprocessing of Safe-Zone Training and concept masks (loading, dilation, latent-size masks).

Shapes and ranges: images ``(N, 3, R, R)`` float in [0, 1]; masks ``(N, 1, R, R)`` float in {0, 1} (``None`` when the
run has no masks). ``R`` is the training resolution (512 for SD1.5, 768 for SD2.1-v, 1024 for SDXL).

Preprocessing order per image (paper 000 Eq. 7, ``x'_j = JPEG(x'_p)``): decode (EXIF applied) → JPEG at quality Q
through Pillow, at the file's own size (as ``cloak purify --method jpeg`` would; ``--jpeg-scale S`` compresses at
short side S and resizes back, as ``cloak purify -m jpeg --jpeg-scale S``) → resize the short side to R
(bicubic, like the diffusers TI example) → centre crop to R×R. Masks follow the same geometry: binarize (> 127) →
dilate (max filter of size 2N'+1 at the mask's own size, N' = round(N · min(W, H) / 512): N pixels at paper 000's
512 training resolution on every aspect ratio, N·R/512 at resolution R; App. J) → resize (nearest) and crop exactly
like the image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import CloakError, RejectedInput, UsageError
from ..io import InputItem, read_image
from ..masks import dilate_mask, read_mask, scaled_dilation
from ..validate import check_aspect

# Object templates of the Textual Inversion paper (Gal et al. 2022), the "object" set of the diffusers TI example
# that paper 000 trains with (§5.1.2). "{}" is replaced by the placeholder token.
OBJECT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}", "a cropped photo of a {}",
    "a photo of the {}", "a good photo of the {}", "a photo of one {}", "a close-up photo of the {}",
    "a rendition of the {}", "a photo of the clean {}", "a rendition of a {}", "a photo of a nice {}",
    "a good photo of a {}", "a photo of the nice {}", "a photo of the small {}", "a photo of the weird {}",
    "a photo of the large {}", "a photo of a cool {}", "a photo of a small {}",
)
STYLE_TEMPLATES: tuple[str, ...] = (
    "a painting in the style of {}", "a rendering in the style of {}", "a cropped painting in the style of {}",
    "the painting in the style of {}", "a clean painting in the style of {}", "a dirty painting in the style of {}",
    "a dark painting in the style of {}", "a picture in the style of {}", "a cool painting in the style of {}",
    "a close-up painting in the style of {}", "a bright painting in the style of {}", "a good painting in the style "
    "of {}", "a rendition in the style of {}", "a nice painting in the style of {}", "a small painting in the style "
    "of {}", "a weird painting in the style of {}", "a large painting in the style of {}",
)
TEMPLATE_SETS = {"object": OBJECT_TEMPLATES, "style": STYLE_TEMPLATES}


def load_templates(source: str) -> tuple[str, ...]:
    """A named template set (``object``, ``style``) or a text file of templates, one per line (``#`` comments), each
    with ``{}`` or ``{token}`` where the placeholder goes — e.g. a model's own caption style."""
    from ..prompts import PLACEHOLDER, load_prompt_templates

    if source in TEMPLATE_SETS:
        return TEMPLATE_SETS[source]
    if not Path(source).is_file():
        raise UsageError(f"--templates {source!r}: not a template set ({', '.join(TEMPLATE_SETS)}) nor a file")
    templates = tuple(t.replace(PLACEHOLDER, "{}") for t in load_prompt_templates(source, "--templates"))
    for template in templates:
        if "{}" not in template:
            raise UsageError(f"--templates {source}: {template!r} has no {{}} (or {PLACEHOLDER}) for the token")
    return templates


def fill_templates(templates: Sequence[str], placeholder: str) -> list[str]:
    """``["a photo of a {}", …]`` → ``["a photo of a <R*>", …]`` (templates without ``{}`` are kept as they are)."""
    return [template.replace("{}", placeholder) for template in templates]


# ------------------------------------------------------------------------------------------------------- JPEG
def jpeg_compress(rgb: torch.Tensor, quality: int, scale: int | None = None) -> torch.Tensor:
    """JPEG round trip through Pillow (``Image.save(format="JPEG", quality=Q)``, default 4:2:0 subsampling).

    ``rgb``: ``(3, H, W)`` float in [0, 1] (quantized to 8 bit first, as a saved file would be). Returns the decoded
    ``(3, H, W)`` float in [0, 1] — bit-identical to compressing the PNG with Pillow and reading it back. ``scale``:
    compress at short side ``scale`` and resize back (``--jpeg-scale``; :func:`ops.purify.jpeg.round_trip`).
    """
    from ..purify.jpeg import compress

    if not 1 <= quality <= 100:
        raise UsageError(f"JPEG quality must be 1-100, got {quality}")
    if scale is not None and scale < 8:
        raise UsageError(f"--jpeg-scale must be >= 8 px, got {scale}")
    return compress(rgb.detach()[None].float().cpu(), int(quality), "JPEG", scale)[0]


# ---------------------------------------------------------------------------------------------------- geometry
def resize_and_crop(rgb: torch.Tensor, resolution: int, resample: int = Image.BICUBIC) -> torch.Tensor:
    """``(C, H, W)`` in [0, 1] → ``(C, R, R)``: short side to R with Pillow, then a centre crop."""
    channels, height, width = rgb.shape
    check_aspect(width, height)  # short side → R would make a huge strip of an extreme panorama
    scale = resolution / min(height, width)
    new_w, new_h = max(resolution, round(width * scale)), max(resolution, round(height * scale))
    planes = []
    for plane in rgb.float().cpu().numpy():
        image = Image.fromarray(plane.astype(np.float32), mode="F")
        planes.append(np.asarray(image.resize((new_w, new_h), resample), dtype=np.float32))
    stacked = np.clip(np.stack(planes), 0, 1)
    top, left = (new_h - resolution) // 2, (new_w - resolution) // 2
    return torch.from_numpy(np.ascontiguousarray(stacked[:, top:top + resolution, left:left + resolution]))


# ------------------------------------------------------------------------------------------------------ masks
def find_mask(mask_dir: Path, rel: str | Path) -> Path:
    """The mask for image ``rel``: ``MASKS/<same relative path, .png>`` (what ``cloak mask`` writes)."""
    rel = Path(rel)
    candidates = [mask_dir / rel.with_suffix(".png"), mask_dir / rel, mask_dir / (rel.stem + ".png")]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise CloakError(f"no mask for {rel} in {mask_dir} (expected {candidates[0]}; make masks with `cloak mask`)")


# ------------------------------------------------------------------------------------------------- datasets
@dataclass
class InstanceData:
    """Preprocessed training images: ``images (N, 3, R, R)``, ``masks (N, 1, R, R)`` or ``None``, and names."""

    images: torch.Tensor
    masks: torch.Tensor | None
    names: list[str]
    mask_area: list[float] | None = None

    def __len__(self) -> int:
        return int(self.images.shape[0])


def load_instance_images(items: Sequence[InputItem], resolution: int, *, jpeg_quality: int | None = None,
                         jpeg_scale: int | None = None,
                         mask_dir: Path | None = None, dilate: int = 0, max_pixels: int | None = None,
                         rejected: list[tuple[str, str]] | None = None) -> InstanceData:
    """Load, JPEG-compress (``jpeg_quality``, at short side ``jpeg_scale`` when given), resize/crop the instance
    images and their masks (``mask_dir``).

    A mask whose size differs from its (EXIF-oriented) image is an error that names both sizes: masks are made per
    image by ``cloak mask`` and must line up pixel for pixel. Unreadable images raise :class:`RejectedInput`, or,
    when ``rejected`` is a list, are appended to it as ``(name, reason)`` and skipped.
    """
    if resolution < 8 or resolution % 8:
        raise UsageError(f"--resolution must be a positive multiple of 8, got {resolution}")
    images, masks, names, areas = [], [], [], []
    for item in items:
        try:
            loaded = read_image(item.path, **({"max_pixels": max_pixels} if max_pixels else {}))
        except RejectedInput as exc:
            if rejected is None:
                raise
            rejected.append((item.rel.as_posix(), str(exc)))
            continue
        rgb = loaded.rgb
        if jpeg_quality is not None:
            rgb = jpeg_compress(rgb, jpeg_quality, jpeg_scale)
        images.append(resize_and_crop(rgb, resolution))
        names.append(item.rel.as_posix())
        if mask_dir is not None:
            mask_path = find_mask(Path(mask_dir), item.rel)
            mask = read_mask(mask_path)
            if (mask.shape[1], mask.shape[0]) != loaded.size:
                raise CloakError(f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} but image {item.rel} is "
                                 f"{loaded.size[0]}x{loaded.size[1]}: masks must have the image's size "
                                 "(remake them with `cloak mask`)")
            if not mask.any():
                raise CloakError(f"mask {mask_path} is empty (no pixel on): training with it would learn nothing")
            dilated = dilate_mask(mask.astype(np.uint8) * 255, scaled_dilation(dilate, loaded.size))
            resized = resize_and_crop(torch.from_numpy(dilated.astype(np.float32))[None], resolution,
                                      Image.NEAREST)
            masks.append((resized > 0.5).float())
            areas.append(float(masks[-1].mean()))
    if not images:
        raise CloakError("no readable training images")
    return InstanceData(torch.stack(images), torch.stack(masks) if masks else None, names,
                        areas if masks else None)
