"""The working images and figures of ``cloak ssm`` (library code of :mod:`ops.commands.ssm`): the square working
crop of an image or mask, the twin file of an input in another folder, and the PNG figures (Fig. 3 grid, the band,
histogram, spectrum and training-log plots). matplotlib (extra ``plot``) is imported inside each figure function;
each returns False when it is missing.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any


# ------------------------------------------------------------------------------------------ working images
def to_square(image: Any, size: int, mode: str = "bicubic") -> Any:
    """``(C, H, W)`` → short side ``size`` then centre crop ``size²`` (the working resolution)."""
    import torch.nn.functional as F

    from .validate import check_aspect

    height, width = image.shape[-2:]
    check_aspect(width, height)
    scale = size / min(height, width)
    shape = (max(size, round(height * scale)), max(size, round(width * scale)))
    kwargs = {"antialias": True, "align_corners": False} if mode in ("bicubic", "bilinear") else {}
    resized = F.interpolate(image[None].float(), size=shape, mode=mode, **kwargs)[0]
    top, left = (shape[0] - size) // 2, (shape[1] - size) // 2
    return resized[:, top:top + size, left:left + size].clamp(0, 1)


def find_twin(folder: Path, rel: PurePosixPath) -> Path | None:
    """The file under ``folder`` with the same relative path up to the extension (a mask or a clean image)."""
    from .io import safe_join

    parent = safe_join(folder, rel.parent.as_posix()) if rel.parent.as_posix() != "." else folder
    if not parent.is_dir():
        return None
    matches = sorted(p for p in parent.iterdir() if p.is_file() and p.stem == rel.stem and not p.name.startswith("."))
    return matches[0] if matches else None


def square_mask(path: Path, size: int) -> Any:
    """A mask file → ``(1, 1, size, size)`` in [0, 1] (the same resize and crop as the image)."""
    import numpy as np
    import torch
    from PIL import Image

    with Image.open(path) as image:
        array = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    return to_square(torch.from_numpy(array)[None], size, "bilinear")[None]


# ------------------------------------------------------------------------------------------------- figures
def _save_figure(plt: Any, figure: Any, path: Path) -> None:
    import io

    from .io import atomic_write_bytes

    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())


def ssm_grid(image: Any, maps: Any, tokens: Sequence[str], timesteps: Sequence[int], path: Path) -> bool:
    """Paper 000 Fig. 3 layout: the input, then one column per timestep; one row per token (shared colour scale).
    False (nothing written) without matplotlib."""
    import torch.nn.functional as F

    from .extras import pyplot

    plt = pyplot()
    if plt is None:
        return False
    rows, cols = len(tokens), len(timesteps) + 1
    figure, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.6 * rows), squeeze=False)
    top = float(maps.max()) or 1.0
    size = image.shape[-2:]
    for r, token in enumerate(tokens):
        axes[r][0].imshow(image.permute(1, 2, 0).numpy())
        axes[r][0].set_ylabel(token, fontsize=8)
        for c, t in enumerate(timesteps, start=1):
            shown = F.interpolate(maps[c - 1, r][None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
            axes[r][c].imshow(shown.numpy(), cmap="inferno", vmin=0, vmax=top)
            if r == 0:
                axes[r][c].set_title(f"t={t}", fontsize=8)
        if r == 0:
            axes[r][0].set_title("input", fontsize=8)
    for axis in axes.flat:
        axis.set_xticks([])
        axis.set_yticks([])
    _save_figure(plt, figure, path)
    return True


def band_plot(series: dict[str, dict], timesteps: Sequence[int], ylabel: str, path: Path, title: str) -> bool:
    """Median line with 50 % and 95 % bands per series (Fig. 4–6)."""
    from .extras import pyplot

    plt = pyplot()
    if plt is None:
        return False
    figure, axis = plt.subplots(figsize=(6, 3.6))
    colors = {"images": "tab:red", "clean": "tab:green", "inside": "tab:blue", "outside": "tab:orange"}
    for index, (name, stats) in enumerate(series.items()):
        color = colors.get(name.split(" ")[-1], f"C{index}")
        axis.plot(timesteps, stats["median"], color=color, label=name)
        axis.fill_between(timesteps, stats["q25"], stats["q75"], color=color, alpha=0.35)
        axis.fill_between(timesteps, stats["q025"], stats["q975"], color=color, alpha=0.12)
    axis.set_xlabel("timestep t")
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.legend(fontsize=8)
    _save_figure(plt, figure, path)
    return True


def histogram_plot(histogram: dict, quality: int, path: Path) -> bool:
    """Perturbation histograms before and after JPEG (Fig. 7/12)."""
    import numpy as np

    from .extras import pyplot

    plt = pyplot()
    if plt is None:
        return False
    figure, axis = plt.subplots(figsize=(6, 3.6))
    edges = np.array(histogram["edges"])
    centers = (edges[1:] + edges[:-1]) / 2
    width = edges[1] - edges[0]
    axis.bar(centers, histogram["poisoned"]["counts"], width=width, color="tab:red", alpha=0.6, label="poisoned")
    axis.bar(centers, histogram["jpeg"]["counts"], width=width, color="tab:green", alpha=0.6,
             label=f"after JPEG q{quality}")
    axis.set_xlabel("pixel perturbation (0-255 scale)")
    axis.set_ylabel("count")
    axis.legend(fontsize=8)
    _save_figure(plt, figure, path)
    return True


def spectrum_plot(curves: dict[str, list[float]], path: Path) -> bool:
    """Radial power spectra on a log scale, JPEG variants dashed (Fig. 13)."""
    from .extras import pyplot

    plt = pyplot()
    if plt is None:
        return False
    figure, axis = plt.subplots(figsize=(6, 3.6))
    for index, (label, curve) in enumerate(curves.items()):
        axis.semilogy(range(len(curve)), curve, color=f"C{index}", linestyle="--" if "JPEG" in label else "-",
                      label=label)
    axis.set_xlabel("radial frequency (latent cells⁻¹ index)")
    axis.set_ylabel("power")
    axis.legend(fontsize=8)
    _save_figure(plt, figure, path)
    return True


def train_log_plot(series: dict[str, dict[str, list[float]]], path: Path) -> bool:
    """Inside (solid) and outside (dashed) loss relative to the first logged value, per log (Fig. 6)."""
    from .extras import pyplot

    plt = pyplot()
    if plt is None:
        return False
    figure, axis = plt.subplots(figsize=(6, 3.6))
    for index, (label, data) in enumerate(series.items()):
        axis.plot(data["step"], data["inside_relative"], color=f"C{index}", label=f"{label} inside")
        axis.plot(data["step"], data["outside_relative"], color=f"C{index}", linestyle="--",
                  label=f"{label} outside")
    axis.set_xlabel("training step")
    axis.set_ylabel("loss / first logged loss")
    axis.set_title("loss inside vs outside the concept mask during training")
    axis.legend(fontsize=7)
    _save_figure(plt, figure, path)
    return True
