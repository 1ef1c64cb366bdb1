"""``cloak mask``: one concept mask per image with Segment Anything — settings, the run over a folder (resume, bad
inputs, manifest, binary PNGs, optional previews) and its dry-run plan. The segmentation itself (SAM loading,
prompts, the automatic choice, dilation) lives in :mod:`ops.masks`. Stdlib-only at import."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any

from ..errors import UsageError
from ..masks import DEFAULT_SAM_TYPE, SAM_TYPES, SELECT_MODES, MaskPrompt
from .base import Event, Plan, RunSummary, Settings, as_input_list, attach_records, gather, no_event, plan_folder


@dataclass(frozen=True, kw_only=True)
class MaskSettings(Settings):
    """What ``cloak mask`` segments and how (the CLI's long flags in snake_case).

    ``box`` (x0, y0, x1, y1) and ``point`` ((x, y), …) are image pixels, the same for every image; they may be given
    as the command line spells them (``"40,30,480,500"``, ``["20,30"]``) or as numbers. No prompt = automatic mode
    (``select``, ``points_per_side``). ``dilate`` is N pixels at a 512 training resolution
    (:func:`ops.masks.scaled_dilation`). SAM runs in float32 (no ``--dtype``) one image at a time (no
    ``--batch-size``)."""

    command = "mask"
    box: tuple[float, float, float, float] | None = None
    point: tuple[tuple[float, float], ...] = ()
    center: bool = False
    select: str = MaskPrompt.select
    points_per_side: int = MaskPrompt.points_per_side
    dilate: int = 0
    sam_type: str = DEFAULT_SAM_TYPE
    sam_checkpoint: Path | None = None
    preview: bool = False
    recursive: bool = False
    overwrite: bool = False
    shard: str | None = None
    device: str = "auto"
    seed: int = 0
    max_pixels: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "box", None if self.box is None else _numbers(self.box, 4, "--box"))
        object.__setattr__(self, "point", _points(self.point))
        super().__post_init__()

    def check(self) -> None:
        if self.select not in SELECT_MODES:
            raise UsageError(f"--select {self.select!r}: choose one of {', '.join(SELECT_MODES)}")
        if self.sam_type not in SAM_TYPES:
            raise UsageError(f"--sam-type {self.sam_type!r}: choose one of {', '.join(SAM_TYPES)}")

    @property
    def prompt(self) -> MaskPrompt:
        return MaskPrompt(box=self.box, points=list(self.point), center=self.center, select=self.select,
                          points_per_side=self.points_per_side)


Settings = MaskSettings


def _numbers(value: Any, count: int, flag: str) -> tuple[float, ...]:
    """``"X,Y"`` (the command line) or a sequence of numbers (the API) → ``count`` finite floats."""
    try:
        parts = value.replace(" ", "").split(",") if isinstance(value, str) else list(value)
        numbers = tuple(float(part) for part in parts)
    except (TypeError, ValueError):
        numbers = ()
    if len(numbers) != count or not all(math.isfinite(number) for number in numbers):
        raise UsageError(f"{flag} {value!r}: expected {count} comma-separated numbers in image pixels")
    return numbers


def _points(value: Any) -> tuple[tuple[float, float], ...]:
    """``--point`` values: one ``"X,Y"`` or ``(x, y)``, or a sequence of them."""
    if value is None:
        return ()
    if isinstance(value, str) or (isinstance(value, Sequence) and value
                                  and all(isinstance(part, (int, float)) for part in value)):
        value = [value]
    return tuple(_numbers(point, 2, "--point") for point in value)  # type: ignore[misc]


def manifest_params(settings: MaskSettings) -> dict[str, Any]:
    """What ``cloak.json`` records as the run's parameters (their hash decides resume; the same keys as before
    issue 21, so earlier masks folders resume)."""
    return {"box": list(settings.box) if settings.box else None, "points": [list(p) for p in settings.point],
            "center": settings.center, "select": settings.select, "points_per_side": settings.points_per_side,
            "dilate": settings.dilate, "sam_type": settings.sam_type,
            "sam_checkpoint": str(settings.sam_checkpoint) if settings.sam_checkpoint else None,
            "preview": settings.preview}


# ------------------------------------------------------------------------------------------------------ plan
def plan(settings: MaskSettings, inputs: Sequence[str] | str | Path, output: Path | str) -> Plan:
    """What ``run`` would do, reading only image headers, the manifest and whether the checkpoint file exists."""
    output = Path(output)
    items, notes, _ = gather(as_input_list(inputs), output, recursive=settings.recursive, shard=settings.shard)
    model, problems = _model_line(settings)
    result = plan_folder("mask", settings, items, output, manifest_params(settings), overwrite=settings.overwrite,
                         model=model, notes=[*notes, *problems], max_pixels=settings.max_pixels)
    if settings.box is not None:
        _reject_box_outside(result, items, settings.box)
    if settings.preview:
        result.notes.append("each mask also writes OUTPUT/previews/<name>.png (the image with the mask in red)")
    return result


def _model_line(settings: MaskSettings) -> tuple[str, list[str]]:
    """The SAM model a run would load, and why it could not (without importing it)."""
    import importlib.util

    from ..errors import ModelNotFoundError
    from ..masks import find_sam_checkpoint

    missing = [name for name in ("segment_anything", "torchvision") if importlib.util.find_spec(name) is None]
    problems = [f"the run would stop: {missing[0]} is not installed (pip install 'cloaklab[sam]')"] if missing else []
    if settings.sam_type == "tiny":
        return "SAM tiny (random weights, built in code)", problems
    try:
        path = find_sam_checkpoint(settings.sam_type, _checkpoint(settings))
    except ModelNotFoundError as exc:
        return f"SAM {settings.sam_type}", [*problems, f"the run would stop: {exc}"]
    return f"SAM {settings.sam_type} from {path}", problems


def _reject_box_outside(result: Plan, items: Sequence[Any], box: Sequence[float]) -> None:
    """Move the images a ``--box`` does not fit (judged from their headers, EXIF rotation applied) to rejected."""
    from PIL import Image

    from ..masks import box_problem

    by_name = {item.output_rel.as_posix(): item for item in items}
    for name in list(result.run):
        with Image.open(by_name[name].path) as image:
            width, height = image.size
            if image.getexif().get(0x0112) in (5, 6, 7, 8):  # rotated by 90°: the run sees it transposed
                width, height = height, width
        problem = box_problem(box, width, height)
        if problem:
            result.run.remove(name)
            result.rejected.append((str(by_name[name].path), problem))


def _checkpoint(settings: MaskSettings) -> str | None:
    return str(settings.sam_checkpoint) if settings.sam_checkpoint else None


# ------------------------------------------------------------------------------------------------------- run
def run(settings: MaskSettings, inputs: Sequence[str] | str | Path, output: Path | str, *,
        on_event: Event | None = None, sam: Any = None) -> RunSummary:
    """Write ``OUTPUT/<same name>.png`` per input: a binary mask (0/255, 8-bit grey) of the image's size, with the
    area fraction, SAM score and mode in ``cloak.json`` (and ``OUTPUT/previews/<name>.png`` with ``preview``).

    ``sam`` reuses a model from :func:`ops.masks.load_sam`; otherwise SAM loads on the first image to segment (a
    rerun that skips every file loads nothing). A missing extra or checkpoint stops the run before OUTPUT is made.
    """
    from ..device import resolve_device
    from ..io import DEFAULT_MAX_PIXELS, shard_label
    from ..manifest import Manifest
    from ..masks import find_sam_checkpoint, require_sam
    from ..runner import process_folder

    output = Path(output)
    on_event = on_event or no_event
    items, notes, shard_spec = gather(as_input_list(inputs), output, recursive=settings.recursive,
                                      shard=settings.shard, on_event=on_event)
    require_sam()
    if sam is None and settings.sam_type != "tiny":
        find_sam_checkpoint(settings.sam_type, _checkpoint(settings))
    device = resolve_device(settings.device)
    on_event("header", "", {"model": f"SAM {settings.sam_type}", "device": device})
    manifest = Manifest(output, "mask", manifest_params(settings), seed=settings.seed,
                        model={"name": f"sam-{settings.sam_type}"},
                        extra={"device": str(device), "shard": shard_label(shard_spec)})
    segmenter = Segmenter(settings, output, manifest, device, sam)
    summary = process_folder(items, output, manifest, segmenter, seed=settings.seed, overwrite=settings.overwrite,
                             max_pixels=settings.max_pixels or DEFAULT_MAX_PIXELS, on_event=on_event,
                             accept=partial(_check_box, settings.box) if settings.box is not None else None)
    summary.output, summary.notes = output, list(notes)
    return attach_records(summary, output)


def _check_box(box: Sequence[float], image: Any) -> None:
    """Reject (only) an image that ``--box`` does not fit, before SAM sees it; the other images are segmented."""
    from ..errors import RejectedInput
    from ..masks import box_problem

    problem = box_problem(box, *image.size)
    if problem:
        raise RejectedInput(problem)


class Segmenter:
    """The folder runner's ``process(jobs)``: SAM → binary mask → dilation (→ preview), one image at a time."""

    def __init__(self, settings: MaskSettings, output: Path, manifest: Any, device: Any, sam: Any = None):
        self.settings, self.output, self.manifest, self.device = settings, output, manifest, device
        self.prompt = settings.prompt
        self.sam = sam

    def __call__(self, jobs: list[Any]) -> list[Any]:
        return [self.mask(job) for job in jobs]

    def model(self) -> Any:
        from ..masks import load_sam

        if self.sam is None:
            self.sam = load_sam(self.settings.sam_type, _checkpoint(self.settings), self.device)
        return self.sam

    def mask(self, job: Any) -> Any:
        """One image → a :class:`~ops.runner.ProcessedImage` written as an 8-bit grey PNG (0 or 255)."""
        import numpy as np
        import torch

        from ..io import LoadedImage
        from ..masks import dilate_mask, scaled_dilation, segment
        from ..runner import ProcessedImage

        rgb = np.rint(job.image.rgb.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        sam = self.model()
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(job.seed)  # every draw from (seed, file name); the caller's RNG is left alone
            binary, stats = segment(sam, rgb, self.prompt)
        radius = scaled_dilation(self.settings.dilate, job.image.size)
        binary = dilate_mask(binary, radius)
        stats.update(area_fraction=round(float(binary.mean()), 6), dilate_px=radius)
        if not binary.any():
            stats["warning"] = "empty mask"
        if self.settings.preview:
            problem = self.write_preview(job, rgb, binary)
            if problem:
                stats["warning"] = f"preview not written: {problem}"
        plane = torch.from_numpy(binary.astype(np.float32))[None].expand(3, -1, -1)
        return ProcessedImage(plane.clone(), stats, like=LoadedImage(plane, None, None, True, 8, "L"))

    def write_preview(self, job: Any, rgb: Any, binary: Any) -> str | None:
        """``OUTPUT/previews/<name>.png``, the image with the mask in red; never through a symlink inside OUTPUT
        nor over a preview cloak did not write. Returns why it was not written (None when it was)."""
        import io

        from PIL import Image

        from ..errors import RejectedInput
        from ..io import atomic_write_bytes, output_path
        from ..masks import overlay

        buffer = io.BytesIO()
        Image.fromarray(overlay(rgb, binary)).save(buffer, format="PNG")
        try:
            target = output_path(self.output, PurePosixPath("previews") / job.item.output_rel)
            if target.exists() and not self.manifest.owns(job.item.output_rel.as_posix()):
                raise RejectedInput(f"{target} exists and was not written by cloak")
            atomic_write_bytes(target, buffer.getvalue())
        except RejectedInput as exc:
            return str(exc)
        return None
