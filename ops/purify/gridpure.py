"""GrIDPure (as cited by paper 001 [15]; paper 001 App. C.1, Alg. 2): iterative small-step DiffPure on overlapping
grid windows.

Per iteration: split x_i into ``window``² windows with ``stride`` (256 / 128 on a 512² image: a 3 × 3 grid; the last
window of a row/column is shifted to end at the border, so any size is covered) plus one extra window stitched from
the four ``window/2``² corner patches (corners are otherwise covered by a single window); purify every window with
DiffPure at ``t`` = 10 (all steps, DDPM η = 1); merge by averaging overlapping pixels; blend
``x_{i+1} = (1 − γ) x̃_i + γ x_i`` with γ = 0.1. ``iters`` = 10 (paper 001; the official README uses 20). Images
smaller than the window use a window of their shorter side (stride scaled alike). Windows of all images in a batch
run through the pixel model together; each image's windows draw noise from that image's generator.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .diffpure_pixel import load_models  # noqa: F401  (same network: the pixel model)
from .sdedit import pixel_sdedit


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Start offsets along one axis: 0, s, 2s, … plus ``size − window`` so the far border is covered."""
    starts = list(range(0, size - window + 1, stride))
    if starts[-1] != size - window:
        starts.append(size - window)
    return starts


def grid_windows(height: int, width: int, window: int, stride: int) -> list[tuple[int, int]]:
    """``(top, left)`` of every ``window``² window of an ``height × width`` image."""
    lefts = window_starts(width, window, stride)
    return [(top, left) for top in window_starts(height, window, stride) for left in lefts]


def split(image: torch.Tensor, window: int, stride: int, corners: bool = True) -> torch.Tensor:
    """Windows of one image ``(3, H, W)`` → ``(N, 3, window, window)`` (grid windows, then the stitched corners)."""
    boxes = grid_windows(*image.shape[-2:], window, stride)
    crops = [image[:, top:top + window, left:left + window] for top, left in boxes]
    if corners:
        half = window // 2
        rows = [torch.cat([image[:, :half, :half], image[:, :half, -half:]], 2),
                torch.cat([image[:, -half:, :half], image[:, -half:, -half:]], 2)]
        crops.append(torch.nn.functional.pad(torch.cat(rows, 1), (0, window - 2 * half, 0, window - 2 * half)))
    return torch.stack(crops)


def merge(windows: torch.Tensor, height: int, width: int, window: int, stride: int,
          corners: bool = True) -> torch.Tensor:
    """Inverse of :func:`split`: put every window back and average where they overlap → ``(3, H, W)``."""
    total = torch.zeros(windows.shape[1], height, width, dtype=torch.float32, device=windows.device)
    count = torch.zeros(1, height, width, dtype=torch.float32, device=windows.device)
    boxes = grid_windows(height, width, window, stride)
    for crop, (top, left) in zip(windows, boxes):
        total[:, top:top + window, left:left + window] += crop.float()
        count[:, top:top + window, left:left + window] += 1
    if corners:
        half, crop = window // 2, windows[len(boxes)].float()
        top, bottom = slice(0, half), slice(height - half, height)
        left, right = slice(0, half), slice(width - half, width)
        for (rows, cols), (src_r, src_c) in (((top, left), (0, 0)), ((top, right), (0, half)),
                                             ((bottom, left), (half, 0)), ((bottom, right), (half, half))):
            total[:, rows, cols] += crop[:, src_r:src_r + half, src_c:src_c + half]
            count[:, rows, cols] += 1
    return (total / count).to(windows.dtype)


def grid_purify(images: torch.Tensor, denoise: Callable[[torch.Tensor, list[int]], torch.Tensor], *, window: int,
                stride: int, gamma: float, iters: int) -> torch.Tensor:
    """Alg. 2 on ``(B, 3, H, W)`` in [0, 1]; ``denoise(windows, owner)`` purifies windows (``owner[j]``: image)."""
    height, width = images.shape[-2:]
    side = min(window, height, width)
    step = max(1, round(stride * side / window))
    x = images.float()
    for _ in range(iters):
        pieces = [split(image, side, step) for image in x]
        owner = [i for i, piece in enumerate(pieces) for _ in range(len(piece))]
        purified = denoise(torch.cat(pieces), owner).float().split([len(p) for p in pieces])
        merged = torch.stack([merge(p, height, width, side, step) for p in purified])
        x = (1 - gamma) * merged + gamma * x
    return x.clamp(0, 1)


def purify(images: torch.Tensor, *, models, generators: Sequence[torch.Generator], window: int = 256, stride: int = 128,
           t: int = 10, steps: int = 1000, gamma: float = 0.1, iters: int = 10, eta: float = 1.0,
           **_: Any) -> torch.Tensor:
    """GrIDPure on ``(B, 3, H, W)`` images in [0, 1]; returns the same shape and range."""

    def denoise(windows: torch.Tensor, owner: list[int]) -> torch.Tensor:
        return pixel_sdedit(models.pixel, windows, t_start=t, schedule_steps=steps, eta=eta,
                            generators=[generators[i] for i in owner])

    return grid_purify(images, denoise, window=window, stride=stride, gamma=gamma, iters=iters)
