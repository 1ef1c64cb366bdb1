"""``cloak train-db``: DreamBooth (full UNet, + text encoder) or LoRA over a folder, with prior preservation, Safe-Zone
Training and DiffShortcut prompts — the settings, the whole run (inputs, manifest, resume checks, class images, data,
training) and its dry-run plan.

The trainable is :class:`ops.train.dreambooth_model.DreamBoothModel` and the loop :func:`ops.train.loop.train`
(library code); the defaults are :data:`ops.train.presets.DREAMBOOTH` (paper 001's released run) or, with ``lora``,
:data:`ops.train.presets.LORA` (paper 000 App. P). Writes ``OUTPUT/pipeline`` (a diffusers folder), or
``OUTPUT/unet`` (+ ``text_encoder``) with ``save_trained_only``, or ``OUTPUT/pytorch_lora_weights.safetensors`` with
``lora``; plus ``train_log.jsonl``, ``checkpoints/``, ``class_images/`` and ``cloak.json``. A folder holding
checkpoints is continued only with ``resume`` (``overwrite`` starts again).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from ..errors import UsageError
from ..train.presets import DREAMBOOTH as DB
from ..train.presets import LORA
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

COMMAND = "train-db"
MIXED_PRECISION = ("no", "bf16", "fp16")
DTYPE_TO_PRECISION = {"auto": None, "fp32": "no", "fp16": "fp16", "bf16": "bf16"}


@dataclass(frozen=True, kw_only=True)
class TrainDbSettings(SztSettings, ModelSettings):
    """The flags of ``cloak train-db`` in snake_case. ``None`` for ``class_prompt``, ``train_text_encoder``,
    ``prior_weight``, ``lr`` and ``batch_size`` means the mode's default (:data:`~ops.train.presets.DREAMBOOTH`, or
    :data:`~ops.train.presets.LORA` with ``lora``), resolved by :meth:`resolved`. ``dtype`` is the compute dtype:
    ``fp32`` = ``mixed_precision`` no, ``fp16``/``bf16`` = that autocast (fp32 master weights either way)."""

    command = "train_db"
    instance_prompt: str = DB["instance_prompt"]
    class_prompt: str | None = None
    neg_token: str | None = None
    lora: int | None = None  # rank; None = full fine-tuning
    train_text_encoder: bool | None = None
    prior_weight: float | None = None
    num_class_images: int = DB["num_class_images"]
    class_dir: Path | None = None  # default OUTPUT/class_images
    class_steps: int = DB["class_steps"]
    class_guidance: float = DB["class_guidance"]
    steps: int = DB["steps"]
    lr: float | None = None
    batch_size: int | None = None
    grad_accumulation: int = 1
    max_grad_norm: float = DB["max_grad_norm"]  # 0 = no clipping
    weight_decay: float = DB["weight_decay"]
    resolution: int | None = None  # the model's own
    use_8bit_adam: bool = False
    gradient_checkpointing: bool = False
    mixed_precision: str = "no"
    save_trained_only: bool = False
    checkpoint_every: int = 500
    save_every: int = 0
    resume: bool = False
    recursive: bool = False
    overwrite: bool = False
    max_pixels: int | None = None

    def check(self) -> None:
        super().check()
        if self.dtype not in DTYPE_TO_PRECISION:
            raise UsageError(f"--dtype {self.dtype!r}: choose auto, fp32, fp16 or bf16")
        if self.mixed_precision not in MIXED_PRECISION:
            raise UsageError(f"--mixed-precision {self.mixed_precision!r}: choose no, bf16 or fp16")
        wanted = DTYPE_TO_PRECISION[self.dtype]
        if wanted is not None and self.mixed_precision not in ("no", wanted):
            raise UsageError(f"--dtype {self.dtype} contradicts --mixed-precision {self.mixed_precision}; give one")

    def resolved(self) -> dict[str, Any]:
        """The mode-dependent settings with the mode's defaults filled in, and the autocast precision."""
        defaults = LORA if self.lora else DB
        weight = defaults["prior_weight"] if self.prior_weight is None else self.prior_weight
        return {"prior_weight": weight, "lr": self.lr or defaults["lr"],
                "batch_size": defaults["batch_size"] if self.batch_size is None else self.batch_size,
                "train_text_encoder": (defaults["train_text_encoder"] if self.train_text_encoder is None
                                       else self.train_text_encoder),
                "class_prompt": self.class_prompt or (DB["class_prompt"] if weight else None),
                "mixed_precision": DTYPE_TO_PRECISION[self.dtype] or self.mixed_precision}

    def trainer(self) -> Any:
        """The :class:`~ops.train.dreambooth_model.DreamBoothSettings` of this run (what trains and is saved)."""
        from ..train.dreambooth_model import DreamBoothSettings

        mode = self.resolved()
        return DreamBoothSettings(
            instance_prompt=self.instance_prompt, class_prompt=mode["class_prompt"], neg_token=self.neg_token,
            lora_rank=self.lora, train_text_encoder=mode["train_text_encoder"], prior_weight=mode["prior_weight"],
            num_class_images=self.num_class_images, class_steps=self.class_steps,
            class_guidance=self.class_guidance, gradient_checkpointing=self.gradient_checkpointing,
            mixed_precision=mode["mixed_precision"], save_trained_only=self.save_trained_only)

    def train_config(self) -> Any:
        """The loop's :class:`~ops.train.loop.TrainConfig` (checked: a bad ``t_param`` is a usage error)."""
        from ..train.loop import TrainConfig

        mode, szt = self.resolved(), self.szt()
        config = TrainConfig(steps=self.steps, batch_size=mode["batch_size"], lr=mode["lr"],
                             weight_decay=self.weight_decay, grad_accumulation=self.grad_accumulation,
                             max_grad_norm=self.max_grad_norm or None, seed=self.seed, t_sampler=szt["t_sampler"],
                             t_param=szt["t_param"], mask_mode=szt["mask_mode"],
                             checkpoint_every=self.checkpoint_every, snapshot_every=self.save_every,
                             optimizer="adamw8bit" if self.use_8bit_adam else "adamw")
        config.check()
        return config


Settings = TrainDbSettings


def _artefacts(settings: TrainDbSettings) -> list[str]:
    """The final artefacts a finished run writes."""
    from ..train.dreambooth_model import LORA_WEIGHTS, PIPELINE_DIR

    if settings.lora:
        return [LORA_WEIGHTS]
    if settings.save_trained_only:
        return ["unet", "text_encoder"] if settings.resolved()["train_text_encoder"] else ["unet"]
    return [PIPELINE_DIR]


def _class_folder(settings: TrainDbSettings, output: Path) -> Path:
    return Path(settings.class_dir) if settings.class_dir else output / "class_images"


# --------------------------------------------------------------------------------------------------------- plan
def plan(settings: TrainDbSettings, inputs: Sequence[str] | str | Path, output: Path | str) -> Plan:
    """What ``run`` would do, reading only image headers and the folder: the images, the artefacts, the class
    images still to generate, and whether checkpoints would be resumed, discarded or refused."""

    output = Path(output)
    settings.train_config()  # the run's usage errors, without a model
    job = gather_instances(settings, inputs, output)
    result = Plan("train_db", str(output), settings.as_dict(), model=job.model, notes=list(job.notes))
    result.inputs = [str(item.path) for item in job.items]
    result.rejected = unreadable(job.items, settings.max_pixels)
    result.run = [*_artefacts(settings), "train_log.jsonl", "checkpoints/"]
    if settings.save_every and settings.save_every < settings.steps:
        result.run.append(f"snapshots/ (every {settings.save_every} steps)")
    mode = settings.resolved()
    if mode["prior_weight"]:
        folder = _class_folder(settings, output)
        have = len(list(folder.glob("p00_i*.png"))) if folder.is_dir() else 0
        missing = max(0, settings.num_class_images - have)
        result.notes.append(f"class images in {folder}: {have} present, {missing} to generate with the base model")
        if missing:
            result.run.append(f"{folder}/ ({missing} class image(s))")
    result.notes += checkpoint_notes(output, resume=settings.resume, overwrite=settings.overwrite)
    return result


# ---------------------------------------------------------------------------------------------------------- run
def run(settings: TrainDbSettings, inputs: Sequence[str] | str | Path, output: Path | str, *,
        on_event: Event | None = None, pipe: Any = None) -> TrainSummary:
    """Fine-tune on the images in ``inputs`` into ``output`` (see the module doc). ``pipe`` reuses a loaded
    fp32 pipeline of ``settings.model`` (it is trained in place)."""
    from ..device import resolve_device
    from ..manifest import Manifest

    output = Path(output)
    on_event = on_event or no_event
    config = settings.train_config()
    job = gather_instances(settings, inputs, output)
    spec = settings.trainer()
    instance_prompt, class_prompt = spec.prompts()
    mode = settings.resolved()
    params = {"model": job.record, "instance_prompt": instance_prompt, "class_prompt": class_prompt,
              "lora_rank": settings.lora, "train_text_encoder": mode["train_text_encoder"],
              "prior_weight": mode["prior_weight"],
              "num_class_images": settings.num_class_images if mode["prior_weight"] else 0,
              "resolution": job.resolution, "mixed_precision": spec.mixed_precision,
              "jpeg": settings.szt()["jpeg"], "dilate": settings.szt()["dilate"],
              "masks": str(settings.masks) if settings.masks else None, **config.resume_key()}
    device = resolve_device(settings.device)
    manifest = Manifest(output, COMMAND, params, seed=settings.seed, model=job.record,
                        extra={"device": str(device), "resume": settings.resume})
    try:
        return _run(settings, job, spec, config, output, manifest, device, pipe, on_event)
    finally:
        manifest.close()  # merge this run's records into cloak.json, whatever the outcome


def _run(settings: TrainDbSettings, job: Instances, spec: Any, config: Any, output: Path, manifest: Any, device: Any,
         pipe: Any, on_event: Event) -> TrainSummary:
    from ..models import load_pipeline
    from ..train.dreambooth_model import LORA_WEIGHTS, PIPELINE_DIR
    from ..train.loop import refuse_foreign_outputs

    refuse_foreign_outputs(output, (LORA_WEIGHTS, "unet", "text_encoder", PIPELINE_DIR),
                           owned=manifest.data.get("training") is not None)
    manifest.start_run()
    precision = "fp32" if spec.mixed_precision == "no" else f"fp32 + {spec.mixed_precision} autocast"
    header(on_event, job.model, device, precision, job.resolution, job.notes)
    if pipe is None:
        pipe = load_pipeline(job.model, device, None, trust_pickle=settings.trust_pickle)
    summary = TrainSummary(output=output, notes=list(job.notes))
    szt = settings.szt()
    result = train_dreambooth(pipe, job.items, output, spec, config, model_record=job.record,
                              resolution=job.resolution, class_dir=settings.class_dir, jpeg=szt["jpeg"],
                              mask_dir=settings.masks, dilate=szt["dilate"], max_pixels=settings.max_pixels,
                              resume=settings.resume, overwrite=settings.overwrite, rejected=summary.rejected,
                              on_progress=step_events(on_event), on_event=_class_image_notes(on_event))
    for name, reason in summary.rejected:
        on_event("reject", name, {"reason": reason})
        manifest.record(name, status="rejected", error=reason)
    summary.done = list(result.files)
    summary.steps, summary.final_loss = result.steps_done, result.final_loss
    summary.resumed_from, summary.seconds = result.resumed_from, round(result.seconds, 2)
    manifest.update(training={"output": str(output), **summary.as_dict()})
    on_event("note", "", {"message": f"{result.steps_done} steps, final loss {result.final_loss:.4f}, wrote "
                                     f"{', '.join(result.files) or 'nothing new'}"})
    return attach_records(summary, output)


def _class_image_notes(on_event: Event) -> Event:
    """Class-image generation reports one note (its per-image events are not the run's files)."""

    def forward(kind: str, name: str, info: dict) -> None:
        if kind == "start" and info.get("total"):
            on_event("note", "", {"message": f"generating {info['total']} class image(s) with the base model"})

    return forward


# ---------------------------------------------------------------------------------------------- the training
RUN_SETTINGS = "train_db_settings.json"
_NOT_RESUME_RELEVANT = ("save_trained_only", "class_steps", "class_guidance", "gradient_checkpointing")


def check_run_settings(out_dir: Path, current: dict[str, Any], resuming: bool) -> None:
    """The DreamBooth settings a checkpoint was made with must match on ``--resume`` (the loop checks its own);
    they are stored next to the checkpoints (data-parallel: every process checks, rank 0 writes)."""
    import json

    from ..errors import CloakError
    from ..io import atomic_write_bytes
    from ..train import distributed
    from ..train.loop import CHECKPOINT_DIR

    path = out_dir / CHECKPOINT_DIR / RUN_SETTINGS
    current = json.loads(json.dumps({k: v for k, v in current.items() if k not in _NOT_RESUME_RELEVANT},
                                    default=str))
    if resuming and path.exists():
        stored = json.loads(path.read_text())
        changed = sorted(key for key in set(stored) | set(current) if stored.get(key) != current.get(key))
        if changed:
            raise CloakError(f"cannot resume {out_dir}: it was trained with other settings ({', '.join(changed)}); "
                             "use the same ones, or --overwrite to start again")
    distributed.barrier()  # data-parallel: every process has read the file before rank 0 rewrites it
    if not distributed.is_main():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, (json.dumps(current, indent=2) + "\n").encode())


def class_latents(pipe, spec: Any, out_dir: Path, class_dir: Path | None, *, model_record: dict[str, Any],
                  seed: int, resolution: int, on_event: Event | None = None) -> Any:
    """The VAE posterior ``(mean, std)`` of the class images (generated once by the base model, then read from
    ``class_dir``, default ``out_dir/class_images``), or ``None`` without prior preservation. Data-parallel: rank 0
    makes the missing ones while the others wait, then every process reads them."""
    from ..io import InputItem
    from ..train import distributed
    from ..train.data import load_instance_images
    from ..train.dreambooth_model import class_image_paths, ensure_class_images
    from ..train.loop import latent_cache

    if not spec.prior_weight:
        return None
    if not spec.class_prompt:
        raise UsageError("prior preservation needs --class-prompt (or --prior-weight 0)")
    if spec.num_class_images < 1:
        raise UsageError("--num-class-images must be >= 1 with prior preservation")
    folder = Path(class_dir) if class_dir else out_dir / "class_images"
    paths = None
    if distributed.is_main():
        paths = ensure_class_images(pipe, spec.class_prompt, folder, spec.num_class_images,
                                    model_record=model_record, seed=seed, steps=spec.class_steps,
                                    guidance=spec.class_guidance, resolution=resolution, on_event=on_event)
    distributed.barrier()
    if paths is None:  # another process of a data-parallel run: read what rank 0 made
        paths = class_image_paths(spec.class_prompt, folder, spec.num_class_images, seed)
    data = load_instance_images([InputItem(path, PurePosixPath(path.name)) for path in paths], resolution)
    return latent_cache(pipe.vae, data.images, pipe.vae.device, chunk=8)


def train_dreambooth(pipe, items: Sequence[Any], out_dir: Path, spec: Any, config: Any, *,
                     model_record: dict[str, Any], resolution: int | None = None, class_dir: Path | None = None,
                     jpeg: int | None = None, mask_dir: Path | None = None, dilate: int = 0,
                     max_pixels: int | None = None, resume: bool = False, overwrite: bool = False,
                     rejected: list[tuple[str, str]] | None = None,
                     on_progress: Callable[[int, int, dict[str, Any]], None] | None = None,
                     on_event: Event | None = None, stop_after: int | None = None) -> Any:
    """Train ``pipe`` on ``items`` into ``out_dir`` with the trainer settings ``spec``
    (:class:`~ops.train.dreambooth_model.DreamBoothSettings`) and the loop's ``config``: guard the folder, check a
    resumed run's settings, load the instance data (JPEG/masks as SZT asks), make the class images, and train.
    Returns the loop's :class:`~ops.train.loop.TrainResult` (``stop_after`` ends early, for tests)."""
    from ..models import native_resolution
    from ..train.data import load_instance_images
    from ..train.dreambooth_model import DreamBoothModel, autocast_context
    from ..train.loop import latest_checkpoint, prepare_run_folder, train

    out_dir = Path(out_dir)
    if getattr(pipe, "text_encoder_2", None) is not None:
        raise UsageError("train-db trains SD 1.x / 2.x pipelines (one text encoder); SDXL DreamBooth/LoRA is not "
                         "implemented — use `cloak train-ti` for SDXL")
    prepare_run_folder(out_dir, resume=resume, overwrite=overwrite)
    resolution = resolution or native_resolution(pipe)
    check_run_settings(out_dir, {**asdict(spec), "resolution": resolution, "jpeg": jpeg, "dilate": dilate,
                                 "masks": str(mask_dir) if mask_dir else None, "model": model_record},
                       resume and latest_checkpoint(out_dir) is not None)
    data = load_instance_images(items, resolution, jpeg_quality=jpeg, mask_dir=mask_dir, dilate=dilate,
                                max_pixels=max_pixels, rejected=rejected)
    prior = class_latents(pipe, spec, out_dir, class_dir, model_record=model_record, seed=config.seed,
                          resolution=resolution, on_event=on_event)
    trainable = DreamBoothModel(pipe, spec, batch_size=config.batch_size, class_latents=prior,
                                sample_latents=config.sample_latents, seed=config.seed)
    with autocast_context(spec.mixed_precision, pipe.unet.device):
        return train(pipe, trainable, data, [spec.prompts()[0]], config, out_dir, resume=resume,
                     on_progress=on_progress, stop_after=stop_after)
