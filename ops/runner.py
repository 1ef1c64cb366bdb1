"""The folder loop every image-to-image command shares: resume, decode, batch, process, write, record.

A method supplies ``process(jobs) -> [ProcessedImage]``; the runner owns everything else, so ``purify`` and
``poison`` behave identically for skips, bad files, partial runs and the manifest.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .commands.base import Event, RunSummary, no_event
from .errors import CloakError, RejectedInput
from .grouping import group_indices_by
from .io import (
    DEFAULT_MAX_PIXELS,
    InputItem,
    LoadedImage,
    file_sha256,
    item_seed,
    iter_chunks,
    output_path,
    read_image,
    write_image,
)
from .manifest import Manifest


@dataclass
class ImageJob:
    """One decoded input on its way through a method; ``seed`` is per file (see :func:`ops.io.item_seed`)."""

    item: InputItem
    image: LoadedImage
    seed: int
    output: Path
    source_sha256: str
    owned: bool = False  # the manifest listed this output as cloak's before this run (side files may be replaced)


@dataclass
class ProcessedImage:
    rgb: Any  # torch.Tensor (3, H, W) in [0, 1], at the input's size
    stats: dict[str, Any] = field(default_factory=dict)
    like: LoadedImage | None = None  # write in this image's format instead of the input's (e.g. binary masks)


def process_folder(
    items: Sequence[InputItem],
    out_dir: Path,
    manifest: Manifest,
    process: Callable[[list[ImageJob]], list[ProcessedImage]],
    *,
    seed: int = 0,
    batch_size: int = 1,
    overwrite: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_size: int = 1,
    verify: Callable[[ImageJob, np.ndarray], dict[str, Any]] | None = None,
    on_event: Event = no_event,
    accept: Callable[[LoadedImage], None] | None = None,
) -> RunSummary:
    """Run ``process`` over ``items`` and write ``OUT/<rel>.png`` for each, recording everything in ``manifest``.

    ``verify(job, stored)`` sees the integer array actually written and returns extra stats (or raises
    :class:`CloakError` to fail that file). Images smaller than ``min_size`` on either side are rejected, and so are
    those ``accept(image)`` refuses (it raises :class:`RejectedInput`).
    """
    summary = RunSummary()
    manifest.start_run()
    on_event("start", "", {"total": len(items)})
    claimed: dict[str, str] = {}
    pending: list[ImageJob] = []

    def reject(item: InputItem, reason: str) -> None:
        summary.rejected.append((str(item.path), reason))
        manifest.record(item.output_rel.as_posix(), source=str(item.path), output=None, status="rejected",
                        error=reason)
        on_event("reject", str(item.path), {"reason": reason})

    for item in items:
        out_rel = item.output_rel.as_posix()
        taken_by = item.clash_with or claimed.get(out_rel)
        if taken_by is not None:  # decided over the whole sorted input set (io.mark_clashes), so shards agree
            reason = f"its output name {out_rel} is already taken by {taken_by}; rename one of them"
            summary.rejected.append((str(item.path), reason))
            manifest.clash(str(item.path), output=None, status="rejected", error=reason)
            on_event("reject", str(item.path), {"reason": reason})
            continue
        claimed[out_rel] = str(item.path)
        try:
            output = output_path(out_dir, item.output_rel)
        except RejectedInput as exc:
            reject(item, str(exc))
            continue
        if output.exists() and not manifest.owns(out_rel):
            reject(item, f"{output} exists and was not written by cloak (its manifest has no record of it); "
                         "move it away to let cloak write there")
            continue
        try:
            digest = file_sha256(item.path)
        except OSError as exc:
            reject(item, f"cannot read file ({exc.strerror or exc})")
            continue
        if not overwrite and manifest.is_done(out_rel, digest, output):
            summary.skipped.append(out_rel)
            on_event("skip", out_rel, {})
            continue
        try:
            image = read_image(item.path, max_pixels)
            width, height = image.size
            if min(width, height) < min_size:
                raise RejectedInput(f"image is {width}x{height}; this method needs at least {min_size} px per side")
            if accept is not None:
                accept(image)  # e.g. the working-size aspect limit (raises RejectedInput)
        except RejectedInput as exc:
            reject(item, str(exc))
            continue
        for note in image.warnings:
            on_event("warn", str(item.path), {"message": note})
        pending.append(ImageJob(item, image, item_seed(seed, item.rel), output, digest, manifest.owns(out_rel)))

    for batch in iter_chunks(pending, batch_size):
        started = time.perf_counter()
        try:
            results = process(batch)
            if len(results) != len(batch):
                raise RuntimeError(f"method returned {len(results)} results for {len(batch)} images")
        except CloakError:
            raise
        except Exception as exc:  # a fault in the method: record it for these files, go on with the others
            for job in batch:
                _fail(summary, manifest, job, f"{type(exc).__name__}: {exc}", on_event)
            continue
        seconds = (time.perf_counter() - started) / len(batch)
        for job, result in zip(batch, results):
            try:
                out_rel = job.item.output_rel.as_posix()
                # claim the name first, so a run killed between the write and its record still owns the file
                manifest.record(out_rel, source=str(job.item.path), output=None, status="writing", owned=True)
                stored = write_image(job.output, result.rgb, result.like or job.image)
                stats = dict(result.stats)
                if verify is not None:
                    stats.update(verify(job, stored))
            except Exception as exc:
                job.output.unlink(missing_ok=True)
                _fail(summary, manifest, job, f"{type(exc).__name__}: {exc}", on_event)
                continue
            out_rel = job.item.output_rel.as_posix()
            manifest.record(out_rel, source=str(job.item.path), source_sha256=job.source_sha256, output=out_rel,
                            status="done", owned=True, error=None, seconds=round(seconds, 4), size=list(job.image.size),
                            seed=job.seed, stats=stats, warnings=job.image.warnings)
            summary.done.append(out_rel)
            on_event("done", out_rel, {"seconds": seconds, "stats": stats})
    manifest.update(last_summary={k: len(v) for k, v in summary.as_dict().items() if isinstance(v, list)})
    manifest.close()
    return summary


def _fail(summary: RunSummary, manifest: Manifest, job: ImageJob, reason: str, on_event: Event) -> None:
    out_rel = job.item.output_rel.as_posix()
    summary.failed.append((str(job.item.path), reason))
    manifest.record(out_rel, source=str(job.item.path), source_sha256=job.source_sha256, output=None,
                    status="error", error=reason)
    on_event("error", str(job.item.path), {"reason": reason})


def same_size_groups(jobs: Sequence[Any]) -> list[list[Any]]:
    """Jobs (anything with ``.image.size``) grouped by image size, first-seen order: only same-size images share a
    batch tensor (each keeps its own generator, so grouping changes no result)."""
    groups = group_indices_by(jobs, lambda job: tuple(job.image.size))
    return [[jobs[i] for i in indices] for indices in groups.values()]
