"""The toy world's novel concepts: each is one object the model can draw but has no word for.

A concept is an unnamed shape (in the model's training data only ever an ``"object"``, described by shared words
such as ``"a red round pointed object"``, see :mod:`.dataset`) in one fixed colour, as a personal object has one
look: heart/red, moon/yellow, arrow/blue, hourglass/green. Its 5 training images (and ground-truth masks, for the
loss-mask defences) come from a dataset seed of its own, never seen in training.

    python -m cloaklab.ops.toy.concepts OUT [--n 5]     # OUT/images/<concept>/*.png, OUT/masks/<concept>/*.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

from . import dataset

CONCEPTS = {"heart": "red", "moon": "yellow", "arrow": "blue", "hourglass": "green"}
CONCEPT_SEED = 100


def concept_items(shape: str, n: int = 5, seed: int = CONCEPT_SEED) -> list[dataset.ToyItem]:
    """The ``n`` training images of concept ``shape`` (solid texture, its fixed colour)."""
    if shape not in CONCEPTS:
        raise ValueError(f"unknown toy concept {shape!r}; choose from {', '.join(CONCEPTS)}")
    return [dataset.item(seed + dataset.ALL_SHAPES.index(shape), i, shape=shape, colour=CONCEPTS[shape],
                         texture="solid") for i in range(n)]


def write_concepts(out: Path, names: list[str] | None = None, n: int = 5) -> list[str]:
    """Write ``out/images/<concept>/NN.png`` and ``out/masks/<concept>/NN.png`` (0/255); returns the concepts."""
    import numpy as np
    from PIL import Image

    names = names or list(CONCEPTS)
    for name in names:
        images, masks = out / "images" / name, out / "masks" / name
        images.mkdir(parents=True, exist_ok=True)
        masks.mkdir(parents=True, exist_ok=True)
        for i, it in enumerate(concept_items(name, n)):
            Image.fromarray(it.image).save(images / f"{i:02d}.png")
            Image.fromarray((it.mask * 255).astype(np.uint8)).save(masks / f"{i:02d}.png")
    return names


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the toy world's novel-concept images and masks.")
    parser.add_argument("out")
    parser.add_argument("--concepts", default=",".join(CONCEPTS))
    parser.add_argument("--n", type=int, default=5)
    args = parser.parse_args(argv)
    write_concepts(Path(args.out), [c for c in args.concepts.split(",") if c], args.n)


if __name__ == "__main__":
    main()
