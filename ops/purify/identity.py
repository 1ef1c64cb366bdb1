"""No purification (``cloak purify -m none``): every image comes back unchanged.

The "no defence" column of a poison × defence grid as a real step, so its folder has a manifest like every other
column; it also isolates the folder contract (decode → write back faithfully, 16-bit and alpha included).
"""

from __future__ import annotations

import torch


def purify(images: torch.Tensor, *, generators: list[torch.Generator] | None = None) -> torch.Tensor:
    """``(B, 3, H, W)`` in [0, 1] → the same values (a copy)."""
    return images.clone()
