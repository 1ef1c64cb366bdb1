"""``cloak train-ti``: Textual Inversion over a folder with every Safe-Zone Training component of paper 000 — the
settings, the whole run (inputs, manifest, skip/resume, data, training, records) and its dry-run plan.

The trainer is :class:`ops.train.textual_inversion.TextualInversion` and the loop :func:`ops.train.loop.train`
(library code); the defaults are :data:`ops.train.presets.TEXTUAL_INVERSION` (paper 000 §5.1.2 on the diffusers TI
example). Writes ``OUTPUT/learned_embeds.safetensors``, ``snapshots/``, ``train_log.jsonl``, ``checkpoints/`` and
``cloak.json``; a finished run with the same settings and images is skipped (``overwrite`` retrains).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..train.presets import TEXTUAL_INVERSION as TI
from .base import Event, ModelSettings, Plan, attach_records, header, no_event
from .training import (
    Instances,
    SztSettings,
    TrainSummary,
    checkpoint_notes,
    gather_instances,
    step_events,
    unreadable,
)

COMMAND = "train-ti"
LOG_FILES = ("train_log.jsonl", "checkpoints/")


@dataclass(frozen=True, kw_only=True)
class TrainTiSettings(SztSettings, ModelSettings):
    """The flags of ``cloak train-ti`` in snake_case; defaults from :data:`ops.train.presets.TEXTUAL_INVERSION`
    and, for the SZT options, from the preset (:class:`.training.SztSettings`)."""

    command = "train_ti"
    masks_imply_lm = True  # (--mask-mode's help: "default lm when --masks is given")
    token: str = TI["token"]
    init_token: str = TI["init_token"]
    num_vectors: int = TI["num_vectors"]
    templates: str = TI["templates"]  # object | style | a file of templates
    jpeg_scale: int | None = None
    steps: int = TI["steps"]
    lr: float = TI["lr"]
    warmup_steps: int = TI["warmup_steps"]
    weight_decay: float = TI["weight_decay"]
    flip_p: float = TI["flip_p"]
    grad_accumulation: int = TI["grad_accumulation"]
    batch_size: int = TI["batch_size"]
    resolution: int | None = None  # the model's own
    mean_latents: bool = False
    log_grad_by_t: bool = False
    checkpoint_every: int = TI["checkpoint_every"]
    snapshot_every: int = TI["snapshot_every"]
    resume: bool = False
    recursive: bool = False
    overwrite: bool = False
    max_pixels: int | None = None


Settings = TrainTiSettings


@dataclass
class _Job(Instances):
    """What the run and its plan both resolve before any model loads: the instances and the TI specifics."""

    templates: tuple[str, ...]
    szt: dict[str, Any]
    params: dict[str, Any]  # the manifest's parameters: their hash decides whether a finished run is skipped


def _resolve(settings: TrainTiSettings, inputs: Any, output: Path) -> _Job:
    from ..train.data import TEMPLATE_SETS, load_templates

    found = gather_instances(settings, inputs, output)
    templates = load_templates(settings.templates)
    szt = settings.szt()
    params = {"token": settings.token, "init_token": settings.init_token, "num_vectors": settings.num_vectors,
              "templates": settings.templates if settings.templates in TEMPLATE_SETS  # a file's lines enter the hash
              else {"file": str(settings.templates), "lines": list(templates)},
              "preset": settings.preset, **szt, "jpeg_scale": settings.jpeg_scale if szt["jpeg"] else None,
              "flip_p": settings.flip_p, "weight_decay": settings.weight_decay, "steps": settings.steps,
              "lr": settings.lr, "warmup_steps": settings.warmup_steps,
              "grad_accumulation": settings.grad_accumulation, "batch_size": settings.batch_size,
              "resolution": found.resolution, "mean_latents": settings.mean_latents,
              "masks": str(settings.masks) if settings.masks else None, "model": found.record,
              "inputs": [item.rel.as_posix() for item in found.items]}
    return _Job(**vars(found), templates=templates, szt=szt, params=params)


def _finished(settings: TrainTiSettings, record: dict[str, Any], digest: str, output: Path) -> bool:
    """A finished run of the same settings and images (nothing to do unless ``overwrite`` or ``resume``)."""
    from ..train.textual_inversion import EMBEDS_NAME

    return (not settings.overwrite and not settings.resume and record.get("status") == "done"
            and record.get("params_hash") == digest and (output / EMBEDS_NAME).exists())


def _train_config(settings: TrainTiSettings, szt: dict[str, Any]) -> Any:
    from ..train.loop import TrainConfig

    config = TrainConfig(steps=settings.steps, batch_size=settings.batch_size, lr=settings.lr,
                         warmup_steps=settings.warmup_steps, grad_accumulation=settings.grad_accumulation,
                         seed=settings.seed, t_sampler=szt["t_sampler"], t_param=szt["t_param"],
                         mask_mode=szt["mask_mode"], sample_latents=not settings.mean_latents,
                         checkpoint_every=settings.checkpoint_every, snapshot_every=settings.snapshot_every,
                         log_grad_by_t=settings.log_grad_by_t, weight_decay=settings.weight_decay,
                         flip_p=settings.flip_p)
    config.check()  # a bad --t-param for its sampler: exit 2 before the folder is touched
    return config


# --------------------------------------------------------------------------------------------------------- plan
def plan(settings: TrainTiSettings, inputs: Sequence[str] | str | Path, output: Path | str) -> Plan:
    """What ``run`` would do, reading only image headers and the manifest: the images, the files it would write,
    whether a finished run is skipped or a checkpoint resumed."""
    from ..manifest import params_hash, read_manifest
    from ..train.textual_inversion import EMBEDS_NAME, SNAPSHOT_DIR

    output = Path(output)
    job = _resolve(settings, inputs, output)
    result = Plan("train_ti", str(output), settings.as_dict(), model=job.model, notes=list(job.notes))
    result.inputs = [str(item.path) for item in job.items]
    result.rejected = unreadable(job.items, settings.max_pixels)
    record = ((read_manifest(output) or {}).get("files") or {}).get(EMBEDS_NAME, {})
    if _finished(settings, record, params_hash({"command": COMMAND, **job.params}), output):
        result.skipped.append(EMBEDS_NAME)
        result.notes.append(f"{output / EMBEDS_NAME} is already trained with these settings (overwrite retrains)")
        return result
    result.run = [EMBEDS_NAME, *LOG_FILES]
    if settings.snapshot_every and settings.snapshot_every < settings.steps:
        result.run.append(f"{SNAPSHOT_DIR}/ (every {settings.snapshot_every} steps)")
    result.notes += checkpoint_notes(output, resume=settings.resume, overwrite=settings.overwrite)
    return result


# ---------------------------------------------------------------------------------------------------------- run
def run(settings: TrainTiSettings, inputs: Sequence[str] | str | Path, output: Path | str, *,
        on_event: Event | None = None, pipe: Any = None) -> TrainSummary:
    """Learn ``settings.token`` from the images in ``inputs`` into ``output`` (see the module doc).

    ``pipe`` reuses a loaded pipeline of ``settings.model`` (its text encoder gains the new token)."""
    from ..device import resolve_device, resolve_dtype
    from ..manifest import Manifest

    output = Path(output)
    on_event = on_event or no_event
    job = _resolve(settings, inputs, output)
    config = _train_config(settings, job.szt)
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    manifest = Manifest(output, COMMAND, job.params, seed=settings.seed, model=job.record,
                        extra={"device": str(device), "dtype": str(dtype).replace("torch.", "")})
    try:
        return _run(settings, job, config, output, manifest, device, dtype, pipe, on_event)
    finally:
        manifest.close()  # merge this run's records into cloak.json, whatever the outcome


def _run(settings: TrainTiSettings, job: _Job, config: Any, output: Path, manifest: Any, device: Any, dtype: Any,
         pipe: Any, on_event: Event) -> TrainSummary:
    from ..train.textual_inversion import EMBEDS_NAME

    header(on_event, job.model, device, dtype, job.resolution, job.notes)
    summary = TrainSummary(output=output, notes=list(job.notes))
    if _finished(settings, manifest.files.get(EMBEDS_NAME, {}), manifest.hash, output):
        on_event("note", "", {"message": f"{output / EMBEDS_NAME} already trained with these settings "
                                         "(--overwrite retrains)"})
        summary.skipped.append(EMBEDS_NAME)
        return attach_records(summary, output)
    _claim_folder(settings, output, manifest)
    pipe = pipe if pipe is not None else _load_model(settings, job.model, device, dtype)
    data = _load_images(settings, job, manifest, summary, on_event)
    _train(settings, job, pipe, data, config, output, manifest, summary, on_event)
    return attach_records(summary, output)


def _claim_folder(settings: TrainTiSettings, output: Path, manifest: Any) -> None:
    """Refuse foreign files and stale checkpoints (unless resume/overwrite), then record the run's start."""
    from ..train.loop import prepare_run_folder, refuse_foreign_outputs
    from ..train.textual_inversion import EMBEDS_NAME, SNAPSHOT_DIR

    owned = bool(manifest.files.get(EMBEDS_NAME, {}).get("status"))
    refuse_foreign_outputs(output, (EMBEDS_NAME,), owned=owned)
    prepare_run_folder(output, resume=settings.resume, overwrite=settings.overwrite, extra=(SNAPSHOT_DIR,))
    manifest.start_run()


def _load_model(settings: TrainTiSettings, model: str, device: Any, dtype: Any) -> Any:
    import torch

    from ..models import load_pipeline

    pipe = load_pipeline(model, device, dtype, trust_pickle=settings.trust_pickle)
    for encoder in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
        if encoder is not None:
            encoder.to(dtype=torch.float32)  # the trained rows and their gradients stay in fp32
    return pipe


def _load_images(settings: TrainTiSettings, job: _Job, manifest: Any, summary: TrainSummary, on_event: Event
                 ) -> Any:
    """The training images (SZT's JPEG, masks and dilation applied); unreadable files are rejected and recorded."""
    from ..train.data import load_instance_images

    szt = job.szt
    data = load_instance_images(job.items, job.resolution, jpeg_quality=szt["jpeg"],
                                jpeg_scale=settings.jpeg_scale if szt["jpeg"] else None, mask_dir=settings.masks,
                                dilate=szt["dilate"], max_pixels=settings.max_pixels, rejected=summary.rejected)
    for name, reason in summary.rejected:
        on_event("reject", name, {"reason": reason})
        manifest.record(name, status="rejected", error=reason)
    return data


def _train(settings: TrainTiSettings, job: _Job, pipe: Any, data: Any, config: Any, output: Path, manifest: Any,
           summary: TrainSummary, on_event: Event) -> None:
    from ..train.data import fill_templates
    from ..train.loop import train
    from ..train.textual_inversion import EMBEDS_NAME, TextualInversion

    szt, size = job.szt, job.resolution
    trainable = TextualInversion(pipe, settings.token, settings.init_token, settings.num_vectors, size)
    rho = "" if szt["t_param"] is None else f" rho {szt['t_param']}"
    jpeg = f"{szt['jpeg']}{f' at {settings.jpeg_scale}px' if settings.jpeg_scale else ''}" if szt["jpeg"] else "off"
    on_event("note", "", {"message": f"{len(data)} image(s) at {size}px, {settings.steps} steps, t-sampler "
                                     f"{szt['t_sampler']}{rho}, mask {szt['mask_mode']}, jpeg {jpeg}, dilate "
                                     f"{szt['dilate']}"})
    progress = step_events(on_event, lambda record: f"loss {record['loss']:.4f} t {record['t'][0]}")
    result = train(pipe, trainable, data, fill_templates(job.templates, settings.token), config, output,
                   resume=settings.resume, on_progress=progress)
    if result.resumed_from is not None:
        on_event("note", "", {"message": f"resumed from step {result.resumed_from}"})
    manifest.record(EMBEDS_NAME, status="done", steps=result.steps_done, final_loss=result.final_loss,
                    resumed_from=result.resumed_from, seconds=round(result.seconds, 2), images=data.names,
                    mask_area=data.mask_area)
    summary.done.append(EMBEDS_NAME)
    summary.steps, summary.final_loss = result.steps_done, result.final_loss
    summary.resumed_from, summary.seconds = result.resumed_from, round(result.seconds, 2)
    on_event("note", "", {"message": f"{result.steps_done} steps, final loss {result.final_loss:.4f} → "
                                     f"{output / EMBEDS_NAME}"})
