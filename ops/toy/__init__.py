"""The toy world: a procedural captioned shape dataset, a project-trained tiny SD-architecture model
(``--model toy``), and a classifier that plays DINOv2/CLIP for it (``cloak score --metrics toy-acc,toy-sim``).

Stdlib-only at import time (the CLI and ``model_info`` touch it without torch).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).parent


def weights_folder() -> Path:
    """The toy model's diffusers folder (``CLOAK_TOY_WEIGHTS`` overrides the bundled ``ops/toy/weights``)."""
    from ..errors import ModelNotFoundError

    folder = Path(os.environ.get("CLOAK_TOY_WEIGHTS", PACKAGE_DIR / "weights"))
    if not (folder / "model_index.json").exists():
        raise ModelNotFoundError(f"toy model weights not found in {folder}: run `make toy-model` (trains them, "
                                 "≤ 90 min on 2 CPU cores) or set CLOAK_TOY_WEIGHTS to a trained toy folder")
    return folder


def weights_revision() -> str | None:
    """A short content hash of the toy weights (for manifests); ``None`` when they are missing."""
    folder = Path(os.environ.get("CLOAK_TOY_WEIGHTS", PACKAGE_DIR / "weights"))
    digest = hashlib.sha256()
    files = sorted(folder.glob("*/*.safetensors"))
    if not files:
        return None
    for path in files:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]
