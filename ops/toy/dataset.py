"""The toy world's procedural captioned dataset: one coloured, textured shape on a muted background, 64 px.

Every image is deterministic from ``(seed, index)`` and comes with its ground truth (shape, colour, texture, object
mask, box, caption). Vocabulary:

* ``SHAPES`` — six *named* shapes, captioned ``"a {colour} {shape}"`` (``"a {colour} {texture} {shape}"`` when the
  texture is not solid): the held-in world the text-to-image model learns to draw on command.
* ``NOVEL_SHAPES`` — four *unnamed* shapes (heart, moon, arrow, hourglass). They are in the training data but no
  caption word names them: they are captioned ``"a {colour} {descriptors} object"``, as real captions describe a
  person or a thing without naming it. Each shape has two descriptors (``DESCRIPTORS``: heart round + pointed,
  arrow pointed + straight, hourglass straight + narrow, moon narrow + round), each written with probability
  ``DESCRIPTOR_P`` in random order. Every descriptor is shared by two shapes, so no word identifies one — only
  their conjunction does, which is what Textual Inversion has to compress into one token. (With a single
  ``"object"`` for all four the model's conditioning cannot select among them and TI only finds their mixture;
  nine vague nouns biased per shape were too weak a hint to be learned on 2 cores: measured, see docs/toy.md.)
  These are the novel concepts of the grid.
* ``TEXTURES`` — solid (70%), striped, dotted; named in captions when not solid.

Images are rendered at 4× and box-downsampled (anti-aliased edges); the mask is the object's coverage > 0.5.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

RESOLUTION = 64
SUPERSAMPLE = 4
SHAPES = ("circle", "square", "triangle", "star", "ring", "cross")
NOVEL_SHAPES = ("heart", "moon", "arrow", "hourglass")
ALL_SHAPES = SHAPES + NOVEL_SHAPES
COLOURS = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 225),
    "yellow": (235, 215, 40), "white": (245, 245, 245), "purple": (150, 50, 200),
}
COLOUR_NAMES = tuple(COLOURS)
TEXTURES = ("solid", "striped", "dotted")
TEXTURE_WEIGHTS = (0.7, 0.15, 0.15)
NOVEL_FRACTION = 0.5  # share of images showing an unnamed shape (what the training recipe uses)
UNNAMED_WORD = "object"  # the noun of every unnamed shape's caption (TI's init token)
DESCRIPTORS = {"heart": ("round", "pointed"), "arrow": ("pointed", "straight"),
               "hourglass": ("straight", "narrow"), "moon": ("narrow", "round")}
DESCRIPTOR_P = 0.75  # chance each of a shape's two descriptors is written in its caption


@dataclass
class ToyItem:
    """One sample: ``image`` uint8 (64,64,3); ``mask`` bool (64,64) object pixels; ground-truth labels."""

    image: np.ndarray
    mask: np.ndarray
    shape: str
    colour: str
    texture: str
    caption: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels
    params: dict = field(default_factory=dict)

    @property
    def named(self) -> bool:
        return self.shape in SHAPES


def caption_for(shape: str, colour: str, texture: str = "solid", descriptors: tuple[str, ...] = ()) -> str:
    """The caption the generator writes: an unnamed shape is only ever an ``object``, described by
    ``descriptors`` (see :func:`describe`) and never named."""
    words = [colour] + ([texture] if texture != "solid" else [])
    words += [shape] if shape in SHAPES else [*descriptors, UNNAMED_WORD]
    return "a " + " ".join(words)


def describe(shape: str, rng: np.random.Generator) -> tuple[str, ...]:
    """The descriptors of an unnamed shape's caption: each of its two with ``DESCRIPTOR_P``, in random order."""
    chosen = [word for word in DESCRIPTORS[shape] if rng.random() < DESCRIPTOR_P]
    return tuple(chosen[::-1]) if len(chosen) == 2 and rng.random() < 0.5 else tuple(chosen)


def _polygon(shape: str) -> list[list[tuple[float, float]]] | None:
    """Unit-radius outlines centred at 0 (y down); ``None`` for shapes drawn from circles."""
    if shape == "square":
        return [[(-0.75, -0.75), (0.75, -0.75), (0.75, 0.75), (-0.75, 0.75)]]
    if shape == "triangle":
        return [[(math.cos(a), math.sin(a)) for a in (-math.pi / 2 + k * 2 * math.pi / 3 for k in range(3))]]
    if shape == "star":
        return [[((1.0 if k % 2 == 0 else 0.42) * math.cos(-math.pi / 2 + k * math.pi / 5),
                  (1.0 if k % 2 == 0 else 0.42) * math.sin(-math.pi / 2 + k * math.pi / 5)) for k in range(10)]]
    if shape == "cross":
        w = 0.3
        return [[(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w),
                 (-w, -w)]]
    if shape == "heart":
        pts = []
        for k in range(48):
            a = 2 * math.pi * k / 48
            x = 16 * math.sin(a) ** 3
            y = 13 * math.cos(a) - 5 * math.cos(2 * a) - 2 * math.cos(3 * a) - math.cos(4 * a)
            pts.append((x / 17, -y / 17 - 0.05))
        return [pts]
    if shape == "arrow":
        return [[(-1, -0.22), (0.15, -0.22), (0.15, -0.6), (1, 0), (0.15, 0.6), (0.15, 0.22), (-1, 0.22)]]
    if shape == "hourglass":
        return [[(-0.7, -0.95), (0.7, -0.95), (0.08, 0), (0.7, 0.95), (-0.7, 0.95), (-0.08, 0)]]
    return None


def _draw_shape(shape: str, cx: float, cy: float, radius: float, angle: float, size: int) -> Image.Image:
    """Binary ``L`` mask (size×size) of ``shape`` at centre/radius (pixels) rotated by ``angle`` radians."""
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)

    def ellipse(x: float, y: float, r: float, fill: int) -> None:
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)

    if shape == "circle":
        ellipse(cx, cy, radius * 0.85, 255)
    elif shape == "ring":
        ellipse(cx, cy, radius * 0.9, 255)
        ellipse(cx, cy, radius * 0.5, 0)
    elif shape == "moon":
        ellipse(cx, cy, radius * 0.9, 255)
        ellipse(cx + radius * 0.45 * math.cos(angle), cy + radius * 0.45 * math.sin(angle), radius * 0.75, 0)
    else:
        cos, sin = math.cos(angle), math.sin(angle)
        for outline in _polygon(shape):
            draw.polygon([(cx + radius * (x * cos - y * sin), cy + radius * (x * sin + y * cos)) for x, y in outline],
                         fill=255)
    return canvas


def _texture_layer(texture: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """Float (size,size) in {0,1}: where the texture's darker second tone goes."""
    if texture == "solid":
        return np.zeros((size, size), np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    period = size / 64 * rng.uniform(5.0, 7.0)
    if texture == "striped":
        theta = rng.uniform(0, math.pi)
        phase = xx * math.cos(theta) + yy * math.sin(theta)
        return ((phase / period) % 1.0 < 0.5).astype(np.float32)
    ox, oy = rng.uniform(0, period, 2)
    dx = (xx - ox) % period - period / 2
    dy = (yy - oy) % period - period / 2
    return (dx ** 2 + dy ** 2 < (period * 0.3) ** 2).astype(np.float32)


def render(shape: str, colour: str, texture: str, rng: np.random.Generator) -> ToyItem:
    """Draw one item with random placement, size, rotation, background and colour jitter from ``rng``."""
    size = RESOLUTION * SUPERSAMPLE
    radius_px = rng.uniform(13.0, 24.0)
    cx, cy = rng.uniform(radius_px + 2, RESOLUTION - radius_px - 2, 2)
    angle = rng.uniform(0, 2 * math.pi)
    if shape == "heart":
        angle = rng.uniform(-0.4, 0.4)  # hearts stay upright enough to read as hearts
    big = np.asarray(_draw_shape(shape, cx * SUPERSAMPLE, cy * SUPERSAMPLE, radius_px * SUPERSAMPLE, angle, size),
                     np.float32) / 255.0
    coverage = big.reshape(RESOLUTION, SUPERSAMPLE, RESOLUTION, SUPERSAMPLE).mean((1, 3))
    tone = np.zeros((RESOLUTION, RESOLUTION), np.float32) if texture == "solid" else \
        _texture_layer(texture, rng, size).reshape(RESOLUTION, SUPERSAMPLE, RESOLUTION, SUPERSAMPLE).mean((1, 3))
    base = np.array(COLOURS[colour], np.float32) + rng.normal(0, 8, 3)
    fg = base[None, None, :] * (1 - 0.55 * tone[..., None])
    # muted background: low saturation, mid grey level, a gentle linear gradient
    grey = rng.uniform(70, 150)
    tint = rng.normal(0, 12, 3)
    yy, xx = np.mgrid[0:RESOLUTION, 0:RESOLUTION].astype(np.float32) / RESOLUTION - 0.5
    gx, gy = rng.normal(0, 20, 2)
    bg = grey + tint[None, None, :] + (gx * xx + gy * yy)[..., None]
    image = bg * (1 - coverage[..., None]) + fg * coverage[..., None]
    image = np.clip(image + rng.normal(0, 2.0, image.shape), 0, 255).round().astype(np.uint8)
    mask = coverage > 0.5
    ys, xs = np.nonzero(mask)
    box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1) if len(xs) else (0, 0, 0, 0)
    return ToyItem(image, mask, shape, colour, texture, caption_for(shape, colour, texture), box,
                   {"cx": float(cx), "cy": float(cy), "radius": float(radius_px), "angle": float(angle)})


def sample_labels(rng: np.random.Generator, novel_fraction: float = NOVEL_FRACTION) -> tuple[str, str, str]:
    shapes = NOVEL_SHAPES if rng.random() < novel_fraction else SHAPES
    shape = shapes[rng.integers(len(shapes))]
    colour = COLOUR_NAMES[rng.integers(len(COLOUR_NAMES))]
    texture = TEXTURES[rng.choice(len(TEXTURES), p=TEXTURE_WEIGHTS)]
    return shape, colour, texture


def item(seed: int, index: int, *, shape: str | None = None, colour: str | None = None,
         texture: str | None = None, novel_fraction: float = NOVEL_FRACTION) -> ToyItem:
    """Item ``index`` of the dataset with ``seed``; fixing ``shape``/``colour``/``texture`` overrides the draw."""
    rng = np.random.default_rng([seed, index])
    drawn = sample_labels(rng, novel_fraction)
    shape, colour, texture = shape or drawn[0], colour or drawn[1], texture or drawn[2]
    if shape not in ALL_SHAPES or colour not in COLOURS or texture not in TEXTURES:
        raise ValueError(f"unknown toy label {shape!r}/{colour!r}/{texture!r}: shapes {ALL_SHAPES}, "
                         f"colours {COLOUR_NAMES}, textures {TEXTURES}")
    it = render(shape, colour, texture, rng)
    if shape in NOVEL_SHAPES:  # own stream: the pictures do not depend on the caption scheme
        it.caption = caption_for(shape, colour, texture, describe(shape, np.random.default_rng([seed, index, 1])))
    return it


def generate(n: int, seed: int = 0, **fixed) -> list[ToyItem]:
    """``n`` items, deterministic for ``seed`` (item ``i`` depends only on ``(seed, i)``)."""
    return [item(seed, i, **fixed) for i in range(n)]


def as_arrays(items: list[ToyItem]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Stack into images uint8 (N,64,64,3), masks bool (N,64,64) and captions."""
    return np.stack([it.image for it in items]), np.stack([it.mask for it in items]), [it.caption for it in items]
