"""The optional extras of ``pyproject.toml``, imported on first use. The core commands (poison, purify, train-ti,
train-db, generate, ssm, immunize) never need them; a feature that does says which extra to install, in one line:

* ``sam`` — segment-anything + torchvision: ``cloak mask`` (every ``--sam-type``, tiny included);
* ``metrics`` — torchvision + torchmetrics + torch-fidelity: LPIPS with the vgg/alex/squeeze backbones (score, and
  impress's LPIPS term) and FID (every ``--fid-features``, tiny included: the Fréchet statistics are torchmetrics');
* ``plot`` — matplotlib: the ``score --table`` heatmap and the ``ssm`` figures (without it their tables, arrays and
  JSON are written and the PNG is skipped).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import MissingExtraError

PLOT_SKIPPED = ("matplotlib is not installed: PNG figures skipped, tables and data written "
                "(pip install 'cloaklab[plot]' to draw them)")


def require(modules: str | tuple[str, ...], extra: str, purpose: str, alternative: str = "") -> ModuleType:
    """Import ``modules`` (the first is returned) or raise one line:
    ``<purpose>: pip install 'cloaklab[<extra>]'[, or <alternative>] (<package> is not installed)``."""
    names = (modules,) if isinstance(modules, str) else modules
    loaded = []
    for name in names:
        try:
            loaded.append(importlib.import_module(name))
        except ImportError:
            other = f", or {alternative}" if alternative else ""
            raise MissingExtraError(f"{purpose}: pip install 'cloaklab[{extra}]'{other} ({name.split('.')[0]} is "
                                    "not installed)") from None
    return loaded[0]


def pyplot() -> ModuleType | None:
    """matplotlib's pyplot on the Agg backend, or None when the ``plot`` extra is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
