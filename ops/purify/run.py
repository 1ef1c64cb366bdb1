"""Run one purifier over a folder through the shared runner (resume, bad inputs, manifest, atomic PNGs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from ..io import InputItem
from ..manifest import Manifest
from ..metrics.basic import psnr, ssim
from ..runner import ImageJob, ProcessedImage, RunSummary, process_folder
from . import get_purifier


def purify_folder(items: Sequence[InputItem], out_dir: Path, method: str, params: dict[str, Any], *,
                  manifest: Manifest, seed: int = 0, device: torch.device | str = "cpu", batch_size: int = 1,
                  overwrite: bool = False, max_pixels: int | None = None, models: Any = None,
                  model: str | None = None, dtype: torch.dtype | None = None, trust_pickle: bool = False,
                  on_event=None) -> RunSummary:
    """Purify every item into ``out_dir`` with ``method`` (parameters already resolved against its defaults).

    Model-based methods get their networks from ``module.load_models(device=, dtype=, model=, trust_pickle=,
    **params)`` — once per run, lazily (a rerun that skips every file loads nothing) — or from ``models``.
    ``module.purify`` returns images, or ``(images, [per-image stats])`` recorded next to PSNR/SSIM.
    """
    spec = get_purifier(method)
    module = spec.load()
    loaded: dict[str, Any] = {"models": models}

    def networks() -> dict[str, Any]:
        if loaded["models"] is None and hasattr(module, "load_models"):
            loaded["models"] = module.load_models(device=device, dtype=dtype, model=model,
                                                  trust_pickle=trust_pickle, **params)
        return {"models": loaded["models"]} if loaded["models"] is not None else {}

    def process(jobs: list[ImageJob]) -> list[ProcessedImage]:
        results = []
        extra = networks()
        for group in _same_size_groups(jobs):
            # One image: a view, not a copy (large photos are processed one at a time).
            images = (group[0].image.rgb[None] if len(group) == 1
                      else torch.stack([job.image.rgb for job in group])).to(device)
            generators = [torch.Generator().manual_seed(job.seed) for job in group]
            with torch.no_grad():
                purified = module.purify(images, generators=generators, **params, **extra)
            method_stats = [{}] * len(group)
            if isinstance(purified, tuple):
                purified, method_stats = purified
            del images  # the decoded input stays on the job; do not hold a second reference past this point
            for job, output, more in zip(group, purified.float().cpu(), method_stats):
                source = job.image.rgb
                stats = {"psnr": psnr(output, source), "ssim": ssim(output, source), **more}
                results.append((job, ProcessedImage(output, stats)))
            del purified
        order = {id(job): index for index, job in enumerate(jobs)}
        return [result for _, result in sorted(results, key=lambda pair: order[id(pair[0])])]

    kwargs = {"max_pixels": max_pixels} if max_pixels else {}
    return process_folder(items, out_dir, manifest, process, seed=seed, batch_size=batch_size, overwrite=overwrite,
                          min_size=spec.min_size, on_event=on_event or (lambda *a: None), **kwargs)


def _same_size_groups(jobs: list[ImageJob]) -> list[list[ImageJob]]:
    """Batch only images of one size together (each image keeps its own generator, so batching changes nothing)."""
    groups: dict[tuple[int, int], list[ImageJob]] = {}
    for job in jobs:
        groups.setdefault(job.image.size, []).append(job)
    return list(groups.values())
