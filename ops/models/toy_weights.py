"""Where the ``toy`` model's weights are (the diffusers folder ``ops/toy/weights``, or ``CLOAK_TOY_WEIGHTS``) and
their content hash for manifests. Stdlib only: model loading, ``model_info`` and the CLI read it without torch.

It lives with the model loaders (not in :mod:`ops.toy`, which trains and evaluates the toy world on top of them)
so that loading a model never imports the layers above it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

BUNDLED_FOLDER = Path(__file__).resolve().parents[1] / "toy" / "weights"  # shipped with the package


def toy_weights_dir() -> Path:
    """The toy weights folder in use, present or not (``CLOAK_TOY_WEIGHTS`` overrides the bundled one)."""
    return Path(os.environ.get("CLOAK_TOY_WEIGHTS", BUNDLED_FOLDER))


def weights_folder() -> Path:
    """The toy model's diffusers folder; one line saying how to make it when it is missing."""
    from ..errors import ModelNotFoundError

    folder = toy_weights_dir()
    if not (folder / "model_index.json").exists():
        raise ModelNotFoundError(f"toy model weights not found in {folder}: run `make toy-model` (trains them, "
                                 "≤ 90 min on 2 CPU cores) or set CLOAK_TOY_WEIGHTS to a trained toy folder")
    return folder


def weights_revision() -> str | None:
    """A short content hash of the toy weights (for manifests); ``None`` when they are missing."""
    digest = hashlib.sha256()
    files = sorted(toy_weights_dir().glob("*/*.safetensors"))
    if not files:
        return None
    for path in files:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]
