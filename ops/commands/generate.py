"""``cloak generate``: seeded images from a model (+ a TI embedding, a LoRA, trained parts) into a folder — the
settings, the run (the job list, ``--only``, shards, resume, the manifest, atomic PNGs) and its dry-run plan.

Seeds, prompt filling, pipeline loading and the sampler call are library code in :mod:`ops.generate` (also used by
``train-db`` for its class images through :func:`generate_folder`); this module owns the folder. Outputs are
``OUTPUT/p{J:02d}_i{K:03d}.png`` for image K of prompt J, each seeded from ``(seed, J, K)``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..generate import DEFAULT_ETA, DEFAULT_GUIDANCE, DEFAULT_SCHEDULER, DEFAULT_STEPS, SCHEDULERS, GenerationJob
from ..prompts import DEFAULT_PROMPT_SET
from .base import (
    Event,
    ModelSettings,
    Plan,
    RunSummary,
    as_input_list,
    attach_records,
    header,
    model_problems,
    no_event,
)


@dataclass(frozen=True, kw_only=True)
class GenerateSettings(ModelSettings):
    """``prompts`` is a named set (``objects24``, ``faces``; :data:`ops.prompts.PROMPT_SETS`) or a text file of
    templates; ``num_per_prompt`` ``None`` takes the set's count (:data:`ops.prompts.DEFAULT_NUM_PER_PROMPT`, 1 for a
    file); ``token`` ``None`` takes the embedding's token, else :data:`ops.prompts.DEFAULT_TOKEN`. Sampler defaults
    are :mod:`ops.generate`'s (DDIM η = 0, 50 steps, CFG 7.5)."""

    command = "generate"
    prompts: str = DEFAULT_PROMPT_SET
    token: str | None = None
    num_per_prompt: int | None = None
    embedding: Path | None = None
    lora: Path | None = None
    unet: Path | None = None
    text_encoder: Path | None = None
    lora_scale: float | None = None
    steps: int = DEFAULT_STEPS
    guidance: float = DEFAULT_GUIDANCE
    negative_prompt: str | None = None
    quality_negative: bool = False
    neg_token: str | None = None
    scheduler: str = DEFAULT_SCHEDULER
    eta: float = DEFAULT_ETA
    resolution: int | None = None
    only: tuple[str, ...] = ()
    overwrite: bool = False
    shard: str | None = None
    batch_size: int = 1

    def check(self) -> None:
        from ..errors import UsageError

        if self.scheduler not in SCHEDULERS:
            raise UsageError(f"--scheduler {self.scheduler!r}: choose one of {', '.join(SCHEDULERS)}")
        if self.neg_token and not self.quality_negative:
            raise UsageError("--neg-token only matters with --quality-negative: add it, or put the token in "
                             "--negative-prompt")
        self.templates()  # an unknown set or an unreadable file: a usage error now

    # -- what the settings resolve to (no torch)
    def templates(self) -> list[str]:
        from ..prompts import load_prompt_templates

        return load_prompt_templates(self.prompts)

    def count(self) -> int:
        """Images per prompt."""
        from ..prompts import DEFAULT_NUM_PER_PROMPT

        return self.num_per_prompt or DEFAULT_NUM_PER_PROMPT.get(self.prompts, 1)

    def model_name(self) -> str:
        from ..models import default_model

        return self.model or default_model()

    def resolved_token(self) -> str:
        """``--token``, else the token the embedding file was saved under, else ``sks``."""
        from ..generate import embedding_token
        from ..prompts import DEFAULT_TOKEN

        stored = embedding_token(self.embedding) if self.embedding and self.embedding.suffix == ".safetensors" \
            else None
        return self.token or stored or DEFAULT_TOKEN

    def negative(self) -> str | None:
        from ..prompts import quality_negative_prompt

        return quality_negative_prompt(self.neg_token, self.negative_prompt) if self.quality_negative \
            else self.negative_prompt


Settings = GenerateSettings


# ------------------------------------------------------------------------------------------------ the plan
@dataclass
class JobPlan:
    """The images of a run after ``--only`` and ``--shard``, and what the manifest records about them."""

    jobs: list[GenerationJob]
    token: str
    count: int
    resolution: int
    shard: tuple[int, int] | None


def plan_jobs_of(settings: GenerateSettings, inputs: Any = None) -> JobPlan:
    """Every image of the run (prompt-major), then ``--only``, then this shard's part — no model, no torch."""
    from ..errors import UsageError
    from ..generate import plan_jobs
    from ..io import parse_shard, select_shard
    from ..models import native_resolution

    if inputs is not None and as_input_list(inputs):
        raise UsageError("generate takes no INPUT (the prompts come from --prompts); give only -o OUTPUT")
    templates, count, token = settings.templates(), settings.count(), settings.resolved_token()
    jobs = plan_jobs(templates, token, count, settings.seed, settings.negative(),
                     without=settings.neg_token if settings.quality_negative else None)
    if settings.only:
        jobs = _only(jobs, settings.only, f"{len(templates)} prompts × {count}")
    shard = parse_shard(settings.shard)
    resolution = settings.resolution or native_resolution(settings.model_name())
    return JobPlan(select_shard(jobs, shard), token, count, resolution, shard)


def _only(jobs: list[GenerationJob], only: Sequence[str], shape: str) -> list[GenerationJob]:
    from ..errors import UsageError

    wanted = {name if name.endswith(".png") else f"{name}.png" for name in only}
    unknown = wanted - {job.name for job in jobs}
    if unknown:
        raise UsageError(f"--only: no such image in this plan ({shape}): {', '.join(sorted(unknown))}")
    return [job for job in jobs if job.name in wanted]


def sampler_settings(settings: GenerateSettings, resolution: int) -> dict[str, Any]:
    """The keyword arguments of :func:`ops.generate.sample` (also stored in every file record)."""
    return {"steps": settings.steps, "guidance": settings.guidance, "height": resolution, "width": resolution,
            "eta": settings.eta, "lora_scale": settings.lora_scale}


def manifest_params(settings: GenerateSettings, resolution: int, dtype: Any) -> dict[str, Any]:
    """What decides the pixels (their hash decides resume): the model, the trained artifacts' content, the sampler."""
    from ..generate import artifact_digest
    from ..models import model_info

    return {"model": model_info(settings.model_name()).as_dict(), "embedding": artifact_digest(settings.embedding),
            "lora": artifact_digest(settings.lora), "unet": artifact_digest(settings.unet),
            "text_encoder": artifact_digest(settings.text_encoder), "scheduler": settings.scheduler,
            "dtype": str(dtype), **sampler_settings(settings, resolution)}


def plan(settings: GenerateSettings, inputs: Any, output: Path | str) -> Plan:
    """What ``run`` would do, reading only the prompt file, the embedding's header and the manifest."""
    from ..device import resolve_device, resolve_dtype
    from ..manifest import owns_record, params_hash, read_manifest

    output = Path(output)
    jobs = plan_jobs_of(settings, inputs)
    dtype = resolve_dtype(settings.dtype, resolve_device(settings.device))
    digest = params_hash({"command": "generate", **manifest_params(settings, jobs.resolution, dtype)})
    result = Plan("generate", str(output), settings.as_dict(), model=settings.model_name(),
                  notes=[f"token {jobs.token!r}, {jobs.count} image(s) per prompt, {jobs.resolution} px",
                         *model_problems(settings.model_name())])
    files = (read_manifest(output) or {}).get("files", {})
    for job in jobs.jobs:
        result.inputs.append(f"{job.name}: {job.prompt} (seed {job.seed})")
        record = files.get(job.name)
        target = output / job.name
        if not settings.overwrite and _record_is_done(record, job, digest) and target.exists():
            result.skipped.append(job.name)
        elif target.exists() and not owns_record(record, job.name):
            result.rejected.append((job.name, f"{target} exists and was not written by cloak"))
        else:
            result.run.append(job.name)
    return result


# --------------------------------------------------------------------------------------------------- the run
def run(settings: GenerateSettings, inputs: Any, output: Path | str, *, on_event: Event | None = None,
        pipe: Any = None) -> RunSummary:
    """Generate every planned image into ``OUTPUT`` (resume skips finished ones); ``pipe`` reuses a pipeline already
    loaded with the same model, embedding, LoRA and scheduler."""
    from ..device import resolve_device, resolve_dtype
    from ..io import shard_label
    from ..manifest import Manifest
    from ..models import check_available

    output = Path(output)
    on_event = on_event or no_event
    jobs = plan_jobs_of(settings, inputs)
    model_name = settings.model_name()
    check_available(model_name)  # a missing model: one line, and no output folder left behind
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    pipe = pipe if pipe is not None else _load(settings, jobs.token, device, dtype)
    params = manifest_params(settings, jobs.resolution, dtype)
    manifest = Manifest(output, "generate", params, seed=settings.seed, model=params["model"],
                        extra={"device": str(device), "batch_size": settings.batch_size,
                               "shard": shard_label(jobs.shard), "prompts": settings.prompts,
                               "num_per_prompt": jobs.count, "token": jobs.token})
    header(on_event, model_name, device, dtype, jobs.resolution)
    summary = generate_folder(pipe, jobs.jobs, output, manifest, settings=sampler_settings(settings, jobs.resolution),
                              batch_size=settings.batch_size, overwrite=settings.overwrite, on_event=on_event)
    summary.output = output
    return attach_records(summary, output)


def _load(settings: GenerateSettings, token: str, device: Any, dtype: Any):
    from ..generate import load_generation_pipeline

    pipe, _ = load_generation_pipeline(settings.model_name(), device, dtype, embedding=settings.embedding,
                                       token=token, lora=settings.lora, scheduler=settings.scheduler,
                                       unet=settings.unet, text_encoder=settings.text_encoder,
                                       trust_pickle=settings.trust_pickle)
    return pipe


# ------------------------------------------------------------------------------------------ the folder loop
def generate_folder(pipe, jobs: Sequence[GenerationJob], out_dir: Path, manifest: Any, *, settings: dict[str, Any],
                    batch_size: int = 1, overwrite: bool = False, on_event: Event = no_event) -> RunSummary:
    """Generate ``jobs`` into ``out_dir`` (resume skips finished images), recording each in ``manifest``.

    ``settings`` are the sampler keyword arguments of :func:`ops.generate.sample` (steps, guidance, height, width,
    eta, lora_scale); they are also stored in every file record. A fault while sampling a batch is recorded for its
    images and the run goes on (exit 1 at the end); cloak's own errors stop it.
    """
    from ..io import iter_chunks

    summary = RunSummary()
    manifest.start_run()
    out_dir = Path(out_dir)
    todo = _pending(jobs, out_dir, manifest, overwrite, summary, on_event)
    on_event("start", "", {"total": len(todo)})
    for batch in iter_chunks(todo, batch_size):
        started = time.perf_counter()
        images = _sample_batch(pipe, batch, settings, manifest, summary, on_event)
        if images is not None:
            _write_batch(batch, images, out_dir, manifest, settings, (time.perf_counter() - started) / len(batch),
                         summary, on_event)
    manifest.update(last_summary={k: len(v) for k, v in summary.as_dict().items() if isinstance(v, list)})
    manifest.close()
    return summary


def _pending(jobs: Sequence[GenerationJob], out_dir: Path, manifest: Any, overwrite: bool, summary: RunSummary,
             on_event: Event) -> list[GenerationJob]:
    """The jobs to sample: finished ones are skipped, names taken by files cloak did not write are rejected."""
    from ..errors import RejectedInput
    from ..io import output_path

    todo = []
    for job in jobs:
        if not overwrite and _record_is_done(manifest.files.get(job.name), job, manifest.hash) \
                and (out_dir / job.name).exists():
            summary.skipped.append(job.name)
            on_event("skip", job.name, {})
            continue
        try:  # never through a symlink inside OUTPUT, never over a file cloak did not write
            target = output_path(out_dir, job.name)
            if target.exists() and not manifest.owns(job.name):
                raise RejectedInput(f"{target} exists and was not written by cloak; move it away")
        except RejectedInput as exc:
            summary.rejected.append((job.name, str(exc)))
            on_event("reject", job.name, {"reason": str(exc)})
            continue
        todo.append(job)
    return todo


def _sample_batch(pipe, batch: Sequence[GenerationJob], settings: dict[str, Any], manifest: Any,
                  summary: RunSummary, on_event: Event):
    """The batch's images ``(B, 3, H, W)``, or ``None`` after recording a sampling fault for each of its jobs."""
    from ..errors import CloakError
    from ..generate import sample

    name = batch[0].name + (" …" if len(batch) > 1 else "")
    try:
        return sample(pipe, batch, **settings,
                      on_step=lambda step, total: on_event("step", name, {"step": step, "total": total}))
    except CloakError:
        raise
    except Exception as exc:  # noqa: BLE001 - a fault in sampling: record it for these images, go on with the others
        for job in batch:
            reason = f"{type(exc).__name__}: {exc}"
            summary.failed.append((job.name, reason))
            manifest.record(job.name, output=None, status="error", error=reason, **_job_fields(job))
            on_event("error", job.name, {"reason": str(exc)})
        return None


def _write_batch(batch: Sequence[GenerationJob], images: Any, out_dir: Path, manifest: Any,
                 settings: dict[str, Any], seconds: float, summary: RunSummary, on_event: Event) -> None:
    """Quantize and write each image atomically, claiming its name in the manifest first."""
    import torch

    from ..io import LoadedImage, atomic_write_bytes, encode_png, quantize

    like = LoadedImage(torch.zeros(3, 1, 1), None, None, False, 8, "RGB")  # plain 8-bit RGB PNGs
    for job, image in zip(batch, images):
        manifest.record(job.name, output=None, status="writing", owned=True)
        atomic_write_bytes(out_dir / job.name, encode_png(quantize(image, like), like))
        manifest.record(job.name, output=job.name, status="done", owned=True, error=None, seconds=round(seconds, 4),
                        size=[int(image.shape[2]), int(image.shape[1])], settings=settings, **_job_fields(job))
        summary.done.append(job.name)
        on_event("done", job.name, {"seconds": seconds, "stats": {}})


def _record_is_done(record: dict | None, job: GenerationJob, digest: str) -> bool:
    return bool(record and record.get("status") == "done" and record.get("params_hash") == digest
                and record.get("prompt") == job.prompt and record.get("seed") == job.seed
                and record.get("negative_prompt") == job.negative_prompt)


def _job_fields(job: GenerationJob) -> dict[str, Any]:
    return {"prompt": job.prompt, "prompt_template": job.template, "token": job.token, "seed": job.seed,
            "prompt_index": job.prompt_index, "image_index": job.image_index,
            "negative_prompt": job.negative_prompt}

