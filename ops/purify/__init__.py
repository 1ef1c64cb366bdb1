"""Purifiers (``cloak purify --method NAME``): one small module each, registered here by name.

This registry imports nothing heavy, so the CLI can list methods without loading torch. Each method module exposes
``purify(images, *, generator, **params) -> images`` on float ``(B, 3, H, W)`` batches in [0, 1] (model-based
methods also take ``models``, built once per run by their ``load_models``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class PurifierSpec:
    name: str
    module: str
    summary: str
    defaults: dict[str, Any] = field(default_factory=dict)
    needs_model: bool = False
    min_size: int = 1

    def load(self):
        return importlib.import_module(f"{__name__}.{self.module}")

    def resolve(self, given: dict[str, Any]) -> dict[str, Any]:
        """Merge user-given parameters (``None`` = not given) over the defaults; reject ones that do not apply."""
        from ..errors import UsageError

        params = dict(self.defaults)
        for key, value in given.items():
            if value is None:
                continue
            if key not in self.defaults:
                flag = "--" + key.replace("_", "-")
                applies = sorted(self.defaults) or ["none"]
                raise UsageError(f"{flag} does not apply to --method {self.name} (its parameters: "
                                 f"{', '.join('--' + k.replace('_', '-') for k in applies)})")
            params[key] = value
        return params


PURIFIERS: dict[str, PurifierSpec] = {}


def register(spec: PurifierSpec) -> PurifierSpec:
    PURIFIERS[spec.name] = spec
    return spec


def get_purifier(name: str) -> PurifierSpec:
    from ..errors import UsageError

    if name not in PURIFIERS:
        raise UsageError(f"unknown purifier {name!r}; choose one of: {', '.join(PURIFIERS)}")
    return PURIFIERS[name]


register(PurifierSpec("jpeg", "jpeg", "JPEG encode → decode (Pillow, 4:2:0); saved losslessly so later steps see "
                      "exactly what JPEG did. Default quality 75 (DiffShortcut/MetaCloak eval; SZT uses 25).",
                      {"quality": 75}))
register(PurifierSpec("webp", "webp", "WebP encode → decode (Pillow), quality 75 (InMark, paper 004).",
                      {"quality": 75}))
register(PurifierSpec("gaussian", "gaussian", "Gaussian blur, kernel 5 (DiffShortcut); sigma from the kernel "
                      "size as OpenCV does unless --sigma is given.", {"kernel": 5, "sigma": None}))
register(PurifierSpec("tvm", "tvm", "Total-variance minimization (Guo et al. 2018) as in DiffShortcut App. C.1: "
                      "resize to 64², drop 2% of pixels, min ‖(1−X)⊙(Z−x)‖₂ + λ·TV(Z), λ 0.01, upsample back "
                      "(bicubic; the paper used two SR steps).",
                      {"resolution": 64, "drop": 0.02, "tv_weight": 0.01, "iters": 200}))
register(PurifierSpec("adverse-cleaner", "adverse_cleaner", "AdverseCleaner: 64 × bilateral filter (d 5, σc 8, "
                      "σs 8) then 4 × guided filter with the input as guide (r 4, eps 16).",
                      {"bilateral_iters": 64, "guided_iters": 4, "radius": 4, "eps": 16.0}))
