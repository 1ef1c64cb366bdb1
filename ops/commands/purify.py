"""``cloak purify``: one purifier over a folder — settings, the run (resume, bad inputs, manifest, atomic PNGs) and
its dry-run plan. Methods live in :mod:`ops.purify` (one module each); this module owns the folder."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .base import (
    Event,
    FolderSettings,
    ModelSettings,
    Plan,
    RunSummary,
    as_input_list,
    attach_records,
    gather,
    no_event,
    plan_folder,
)


@dataclass(frozen=True, kw_only=True)
class PurifySettings(FolderSettings, ModelSettings):
    """``method`` names a purifier of :data:`ops.purify.PURIFIERS`; ``params`` its parameters (omitted ones take the
    method's published defaults, stated in its registry entry)."""

    command = "purify"
    method: str = "jpeg"
    params: Mapping[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        self.resolved()  # unknown or out-of-range method parameters: a UsageError naming the flag

    def resolved(self) -> dict[str, Any]:
        """The method's parameters: the given ones over its defaults."""
        from ..purify import get_purifier

        return get_purifier(self.method).resolve(dict(self.params))


Settings = PurifySettings


def _manifest_params(settings: PurifySettings) -> tuple[dict[str, Any], dict[str, Any] | None]:
    from ..purify import get_purifier

    spec = get_purifier(settings.method)
    record = None
    if spec.needs_model:
        from ..models import default_model, model_info

        record = model_info(settings.model or default_model()).as_dict()
    return {"method": spec.name, **settings.resolved(), **({"model": record} if record else {})}, record


def plan(settings: PurifySettings, inputs: Sequence[str] | str | Path, output: Path | str) -> Plan:
    """What ``run`` would do, reading only headers and the manifest."""
    from ..purify import get_purifier

    output = Path(output)
    items, notes, _ = gather(as_input_list(inputs), output, recursive=settings.recursive, shard=settings.shard)
    spec = get_purifier(settings.method)
    params, record = _manifest_params(settings)
    return plan_folder("purify", settings, items, output, params, overwrite=settings.overwrite,
                       model=record["name"] if record else None, notes=notes, min_size=spec.min_size,
                       max_pixels=settings.max_pixels)


def run(settings: PurifySettings, inputs: Sequence[str] | str | Path, output: Path | str, *,
        on_event: Event | None = None, models: Any = None) -> RunSummary:
    """Purify every input into ``OUTPUT/<same name>.png`` (same size, mode, alpha and ICC profile).

    ``models`` reuses networks already loaded by the method's ``load_models`` (the Python API's image helpers)."""
    from ..device import resolve_device, resolve_dtype
    from ..io import shard_label
    from ..manifest import Manifest

    output = Path(output)
    on_event = on_event or no_event
    items, notes, shard_spec = gather(as_input_list(inputs), output, recursive=settings.recursive,
                                      shard=settings.shard, on_event=on_event)
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    params, record = _manifest_params(settings)
    manifest = Manifest(output, "purify", params, seed=settings.seed, model=record,
                        extra={"device": str(device), "dtype": str(dtype).replace("torch.", ""),
                               "batch_size": settings.batch_size, "shard": shard_label(shard_spec)})
    summary = purify_folder(items, output, settings.method, settings.resolved(), manifest=manifest,
                            seed=settings.seed, device=device, batch_size=settings.batch_size,
                            overwrite=settings.overwrite, max_pixels=settings.max_pixels, models=models,
                            model=settings.model, dtype=dtype, trust_pickle=settings.trust_pickle, on_event=on_event)
    summary.output, summary.notes = output, list(notes)
    return attach_records(summary, output)


def purify_folder(items: Sequence[Any], out_dir: Path, method: str, params: dict[str, Any], *, manifest: Any,
                  seed: int = 0, device: Any = "cpu", batch_size: int = 1, overwrite: bool = False,
                  max_pixels: int | None = None, models: Any = None, model: str | None = None, dtype: Any = None,
                  trust_pickle: bool = False, on_event: Event | None = None) -> RunSummary:
    """Purify ``items`` into ``out_dir`` with ``method`` (parameters already resolved against its defaults).

    Model-based methods get their networks from ``module.load_models(device=, dtype=, model=, trust_pickle=,
    **params)`` — once per run, lazily (a rerun that skips every file loads nothing) — or from ``models``.
    ``module.purify`` returns images, or ``(images, [per-image stats])`` recorded next to PSNR/SSIM.
    """
    import torch

    from ..metrics.basic import psnr, ssim
    from ..purify import get_purifier
    from ..runner import ImageJob, ProcessedImage, process_folder, same_size_groups

    spec = get_purifier(method)
    module = spec.load()
    loaded: dict[str, Any] = {"models": models}

    def networks() -> dict[str, Any]:
        if loaded["models"] is None and hasattr(module, "load_models"):
            loaded["models"] = module.load_models(device=device, dtype=dtype, model=model,
                                                  trust_pickle=trust_pickle, **params)
        return {"models": loaded["models"]} if loaded["models"] is not None else {}

    def process(jobs: list[ImageJob]) -> list[ProcessedImage]:
        results: dict[int, ProcessedImage] = {}
        extra = networks()
        for group in same_size_groups(jobs):
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
            for job, image, more in zip(group, purified.float().cpu(), method_stats):
                source = job.image.rgb
                results[id(job)] = ProcessedImage(image, {"psnr": psnr(image, source), "ssim": ssim(image, source),
                                                          **more})
            del purified
        return [results[id(job)] for job in jobs]

    kwargs = {"max_pixels": max_pixels} if max_pixels else {}
    return process_folder(items, out_dir, manifest, process, seed=seed, batch_size=batch_size, overwrite=overwrite,
                          min_size=spec.min_size, on_event=on_event or no_event, **kwargs)
