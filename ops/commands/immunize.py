"""``cloak immunize``: IMMA model immunization (paper 003) — settings, the whole run and its dry-run plan.

The run groups the inputs into concepts (one, or one per INPUT with ``multi_concept``), immunizes them one after
the other (each stage starts from the previous one's attention weights, paper 003 A1.3), writes the immunized
attention tensors and a diffusers pipeline folder of the base model with those tensors swapped in, and optionally
checks the result by adapting the base and the immunized model alike. The method (alternating inner/outer steps,
checkpoints, the adaptation losses) is :mod:`ops.train.immunize`; its defaults are
:mod:`ops.train.immunize_config`'s, stated there once.

Files under OUTPUT: ``pipeline/``, ``immunized_attention.safetensors``, per stage ``train_log.jsonl`` and
``checkpoints/`` (in OUTPUT itself for one concept, with the stage's weights as ``stage.safetensors``; in
``stages/NN-NAME/`` for several), ``check/NAME/{base,immunized}/`` with ``check_steps``, and ``cloak.json``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..train.immunize_config import AGAINST, DEFAULT_CLASS_WORD, IMMUNIZED_NAME, ImmunizeConfig, default_token
from .base import (
    Event,
    ModelSettings,
    Plan,
    RunSummary,
    as_input_list,
    gather,
    header,
    header_problem,
    no_event,
    resolve_model,
)

_STAGE = ImmunizeConfig()  # the method's defaults (the per-method lr table stays behind lr=None)
PIPELINE_DIR = "pipeline"
CHECK_DIR = "check"


@dataclass(frozen=True, kw_only=True)
class ImmunizeSettings(ModelSettings):
    """``against`` (required): ti, db or lora. ``lr``, ``defence_lr`` and ``max_grad_norm`` left ``None`` take the
    per-method defaults of :data:`ops.train.immunize_config.DEFAULTS`; ``token`` ``None`` is ``<R*>`` for TI and
    ``sks`` otherwise; ``class_word`` is one word, or one per concept with ``multi_concept``."""

    command = "immunize"
    against: str | None = None
    multi_concept: bool = False
    steps: int = _STAGE.steps
    inner_steps: int = _STAGE.inner_steps
    outer_steps: int = _STAGE.outer_steps
    lr: float | None = _STAGE.lr
    defence_lr: float | None = _STAGE.defence_lr
    max_grad_norm: float | None = _STAGE.max_grad_norm
    clip: bool = _STAGE.clip
    weight_decay: float = _STAGE.weight_decay
    lora_rank: int = _STAGE.lora_rank
    cross_attention_only: bool = _STAGE.cross_attention_only
    token: str | None = None
    class_word: tuple[str, ...] = (DEFAULT_CLASS_WORD,)
    instance_prompt: str | None = None
    resolution: int | None = None
    mean_latents: bool = not _STAGE.sample_latents
    check_steps: int = 0
    checkpoint_every: int = _STAGE.checkpoint_every
    resume: bool = False
    recursive: bool = False
    overwrite: bool = False
    batch_size: int = _STAGE.batch_size
    max_pixels: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.class_word, str):  # the API may pass one word
            object.__setattr__(self, "class_word", (self.class_word,))
        super().__post_init__()

    def check(self) -> None:
        if self.against is None:
            raise UsageError(f"--against is required: one of {', '.join(AGAINST)}")
        if self.against not in AGAINST:
            raise UsageError(f"--against {self.against!r}: choose one of {', '.join(AGAINST)}")
        if not self.class_word:
            raise UsageError("--class-word: give at least one")
        self.stage_config().check()

    def stage_config(self) -> ImmunizeConfig:
        """The method's config of every stage, per-method defaults resolved."""
        return ImmunizeConfig(against=self.against, steps=self.steps, inner_steps=self.inner_steps,
                              outer_steps=self.outer_steps, lr=self.lr, defence_lr=self.defence_lr,
                              max_grad_norm=self.max_grad_norm, clip=self.clip, batch_size=self.batch_size,
                              weight_decay=self.weight_decay, lora_rank=self.lora_rank,
                              cross_attention_only=self.cross_attention_only, sample_latents=not self.mean_latents,
                              seed=self.seed, checkpoint_every=self.checkpoint_every).resolved()

    def attacker_token(self) -> str:
        return self.token or default_token(self.against)


Settings = ImmunizeSettings


@dataclass
class ImmunizeSummary(RunSummary):
    """A run summary plus what immunize made: the pipeline folder, the weights file, per-concept results and the
    ``check_steps`` comparison (``check``)."""

    pipeline: Path | None = None
    weights: Path | None = None
    concepts: list[dict[str, Any]] = field(default_factory=list)
    checks: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {**super().as_dict(), "pipeline": str(self.pipeline) if self.pipeline else None,
                "weights": str(self.weights) if self.weights else None, "concepts": self.concepts,
                "check": self.checks}


# ------------------------------------------------------------------------------------------------ layout
@dataclass
class Concept:
    """One concept: its images, its class word, its stage folder, weights file and manifest key."""

    index: int
    name: str
    items: list[Any]
    class_word: str
    folder: Path
    weights: Path
    key: str


def collect_concepts(settings: ImmunizeSettings, inputs: Sequence[str], output: Path, *, stdin: Any = None
                     ) -> tuple[list[Concept], list[str]]:
    """Group the inputs into concepts (each INPUT one concept with ``multi_concept``) and give each its stage
    folder; refuses an OUTPUT inside an input and a ``--class-word`` count that fits neither one nor every concept."""
    from ..io import check_output_location

    check_output_location(inputs, output)
    groups = [[raw] for raw in inputs] if settings.multi_concept else [list(inputs)]
    found, notes = [], []
    for group in groups:
        items, group_notes, _ = gather(group, output, recursive=settings.recursive, shard=None, stdin=stdin)
        notes += group_notes
        if not items:
            raise UsageError(f"no images in {' '.join(group)}")
        single = len(group) == 1 and group[0] != "-"
        found.append(((Path(group[0]).stem or "concept") if single else "concept", items))
    words = settings.class_word
    if len(words) not in (1, len(found)):
        raise UsageError(f"--class-word given {len(words)} times for {len(found)} concepts: give it once, or once "
                         "per concept")
    words = words * len(found) if len(words) == 1 else words
    several = len(found) > 1
    concepts = []
    for index, ((name, items), word) in enumerate(zip(found, words)):
        key = f"stages/{index + 1:02d}-{name}"
        folder = output / key if several else output
        weights = folder / (IMMUNIZED_NAME if several else "stage.safetensors")
        concepts.append(Concept(index, name, items, word, folder, weights, key))
    return concepts, notes


def manifest_params(settings: ImmunizeSettings, concepts: Sequence[Concept], resolution: int,
                    record: dict[str, Any]) -> dict[str, Any]:
    """The output-relevant parameters (their hash decides what a rerun skips)."""
    config = settings.stage_config()
    return {"against": settings.against, "steps": settings.steps, "inner_steps": settings.inner_steps,
            "outer_steps": settings.outer_steps, "lr": config.lr, "defence_lr": config.defence_lr,
            "max_grad_norm": config.max_grad_norm, "weight_decay": settings.weight_decay,
            "lora_rank": settings.lora_rank, "cross_attention_only": settings.cross_attention_only,
            "token": settings.attacker_token(), "class_words": [c.class_word for c in concepts],
            "instance_prompt": settings.instance_prompt, "resolution": resolution,
            "mean_latents": settings.mean_latents, "batch_size": settings.batch_size, "model": record,
            "concepts": [[c.name, [item.rel.as_posix() for item in c.items]] for c in concepts]}


def _finished(files: dict[str, Any], digest: str, output: Path) -> bool:
    """Whether an earlier run with the same parameters finished the pipeline and its weights."""
    done = files.get(PIPELINE_DIR, {})
    return (done.get("status") == "done" and done.get("params_hash") == digest and (output / IMMUNIZED_NAME).exists()
            and (output / PIPELINE_DIR / "model_index.json").exists())


def _stage_finished(files: dict[str, Any], digest: str, concept: Concept) -> bool:
    previous = files.get(concept.key, {})
    return previous.get("status") == "done" and previous.get("params_hash") == digest and concept.weights.exists()


def _foreign_output(files: dict[str, Any], output: Path) -> str | None:
    """Why the final outputs' names are taken by something cloak did not write (``None`` when they are not)."""
    pipeline, final = output / PIPELINE_DIR, output / IMMUNIZED_NAME
    owned = bool(files.get(PIPELINE_DIR, {}).get("status"))
    if pipeline.is_symlink() or (not owned and (pipeline.exists() or final.exists())):
        return (f"{pipeline} or {final} exists and was not written by cloak (its manifest has no record of it): "
                "move it away or choose another --output")
    return None


# ------------------------------------------------------------------------------------------------ dry run
def plan(settings: ImmunizeSettings, inputs: Sequence[str] | str | Path, output: Path | str) -> Plan:
    """What ``run`` would do, reading only image headers, model configs and the manifest."""
    from ..manifest import params_hash, read_manifest
    from ..train.loop import latest_checkpoint

    output = Path(output)
    concepts, notes = collect_concepts(settings, as_input_list(inputs), output)
    model, resolution, record = resolve_model(settings)
    result = Plan("immunize", str(output), settings.as_dict(), model=model, notes=list(notes))
    files = (read_manifest(output) or {}).get("files", {})
    digest = params_hash({"command": "immunize", **manifest_params(settings, concepts, resolution, record)})
    result.inputs = [str(item.path) for concept in concepts for item in concept.items]
    foreign = _foreign_output(files, output)
    if foreign:
        result.rejected.append((str(output), foreign))
        return result
    if not settings.overwrite and _finished(files, digest, output):
        result.skipped += [IMMUNIZED_NAME, PIPELINE_DIR]
        return result
    for concept in concepts:
        weights = concept.weights.relative_to(output).as_posix()
        if not settings.overwrite and _stage_finished(files, digest, concept):
            result.skipped.append(weights)
            continue
        for item in concept.items:  # what the stage's loader would reject, judging from the headers
            reason = header_problem(item.path, max_pixels=settings.max_pixels)
            if reason:
                result.rejected.append((str(item.path), reason))
        if not settings.resume and not settings.overwrite and latest_checkpoint(concept.folder) is not None:
            result.notes.append(f"{concept.folder} holds checkpoints of an earlier run: the run stops unless "
                                "--resume or --overwrite is given")
        result.run.append(weights)
    result.run += [IMMUNIZED_NAME, PIPELINE_DIR + "/"]
    result.notes.append(f"against {settings.against}, {len(concepts)} concept(s) at {resolution} px"
                        + (f", then a {settings.check_steps}-step check" if settings.check_steps else ""))
    return result


# ------------------------------------------------------------------------------------------------------ run
def run(settings: ImmunizeSettings, inputs: Sequence[str] | str | Path, output: Path | str, *,
        on_event: Event | None = None, pipe: Any = None) -> ImmunizeSummary:
    """Immunize the model against learning the concept(s) in ``inputs``; write OUTPUT as the module docstring says.

    ``pipe`` reuses a pipeline already loaded from ``settings.model`` (it is not modified)."""
    from ..device import resolve_device, resolve_dtype
    from ..manifest import Manifest

    output = Path(output)
    on_event = on_event or no_event
    concepts, notes = collect_concepts(settings, as_input_list(inputs), output)
    model_name, resolution, record = resolve_model(settings)
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    manifest = Manifest(output, "immunize", manifest_params(settings, concepts, resolution, record),
                        seed=settings.seed, model=record,
                        extra={"device": str(device), "dtype": str(dtype).replace("torch.", "")})
    try:
        return _run(settings, concepts, notes, model_name, resolution, record, device, dtype, manifest, output, pipe,
                    on_event)
    finally:
        manifest.close()  # merge this run's records into cloak.json, whatever the outcome


def _run(settings: ImmunizeSettings, concepts: Sequence[Concept], notes: list[str], model_name: str,
         resolution: int, record: dict[str, Any], device: Any, dtype: Any, manifest: Any, output: Path, pipe: Any,
         on_event: Event) -> ImmunizeSummary:
    from ..train import distributed

    header(on_event, model_name, device, dtype, resolution, notes)
    summary = ImmunizeSummary(output=output, notes=list(notes), pipeline=output / PIPELINE_DIR,
                              weights=output / IMMUNIZED_NAME)
    if not settings.overwrite and _finished(manifest.files, manifest.hash, output):
        on_event("note", "", {"message": f"{summary.pipeline} already immunized with these settings (--overwrite "
                                         "redoes it)"})
        summary.skipped += [IMMUNIZED_NAME, PIPELINE_DIR]
        return _with_records(summary, manifest, concepts)
    _prepare(settings, manifest, concepts, output)
    if pipe is None:
        from ..models import load_pipeline

        pipe = load_pipeline(model_name, device, dtype, trust_pickle=settings.trust_pickle)
    config = settings.stage_config()
    on_event("note", "", {"message": f"against {settings.against}, {len(concepts)} concept(s), "
                                     f"{settings.steps} steps each ({settings.inner_steps} inner : "
                                     f"{settings.outer_steps} outer), lr {config.lr:g}, defence lr "
                                     f"{config.defence_lr:g}"})
    state = run_stages(settings, pipe, concepts, manifest, resolution, summary, on_event)
    if not distributed.is_main():  # data-parallel: rank 0 alone writes the immunized pipeline and runs the check
        return _with_records(summary, manifest, concepts)
    base, changed = save_immunized(pipe, state, output, settings.against, str(record["name"]),
                                   [c.name for c in concepts])
    summary.done += [IMMUNIZED_NAME, PIPELINE_DIR]
    if settings.check_steps:
        summary.checks = check_adaptation(settings, pipe, base, state, concepts, output, resolution, on_event)
    manifest.record(PIPELINE_DIR, status="done", weights=IMMUNIZED_NAME, tensors=len(state), changed=changed,
                    check=summary.checks)
    on_event("note", "", {"message": f"{changed}/{len(state)} attention tensors changed → "
                                     f"{summary.pipeline} (use --model {summary.pipeline})"})
    return _with_records(summary, manifest, concepts)


def _prepare(settings: ImmunizeSettings, manifest: Any, concepts: Sequence[Concept], output: Path) -> None:
    """Refuse outputs cloak did not write and stale checkpoints (unless resuming), then record the run's start."""
    from ..train.loop import prepare_run_folder

    foreign = _foreign_output(manifest.files, output)
    if foreign:
        raise UsageError(foreign)
    for concept in concepts:
        prepare_run_folder(concept.folder, resume=settings.resume, overwrite=settings.overwrite)
    manifest.start_run()


def run_stages(settings: ImmunizeSettings, pipe: Any, concepts: Sequence[Concept], manifest: Any, resolution: int,
               summary: ImmunizeSummary, on_event: Event) -> dict[str, Any]:
    """Immunize the concepts one after the other, each from the previous stage's weights; a stage finished by an
    earlier run with the same parameters is loaded, not redone. Returns the last stage's attention tensors."""
    from ..train.immunize import load_attention_state

    state = None
    for concept in concepts:
        if not settings.overwrite and _stage_finished(manifest.files, manifest.hash, concept):
            state = load_attention_state(concept.weights)
            on_event("note", "", {"message": f"concept {concept.name} already done (skipped)"})
            summary.skipped.append(concept.weights.relative_to(summary.output).as_posix())
            summary.concepts.append({"concept": concept.name, "skipped": True})
            continue
        state = run_stage(settings, pipe, concept, state, manifest, resolution, summary, on_event)
    return state


def run_stage(settings: ImmunizeSettings, pipe: Any, concept: Concept, state: Any, manifest: Any, resolution: int,
              summary: ImmunizeSummary, on_event: Event) -> dict[str, Any]:
    """One IMMA stage on ``concept`` starting from ``state`` (``None``: the base model); saves and records it."""
    from ..train.data import load_instance_images
    from ..train.immunize import immunize, save_attention_state

    rejected: list[tuple[str, str]] = []
    data = load_instance_images(concept.items, resolution, max_pixels=settings.max_pixels, rejected=rejected)
    for name, reason in rejected:
        on_event("reject", name, {"reason": reason})
        manifest.record(name, status="rejected", error=reason)
    summary.rejected += rejected

    def progress(step: int, total: int, record: dict[str, Any]) -> None:
        on_event("step", concept.name, {"step": step, "total": total, "phase": record["phase"],
                                        "loss": record["loss"]})

    result = immunize(pipe, data, settings.stage_config(), concept.folder, token=settings.attacker_token(),
                      class_word=concept.class_word, instance_prompt=settings.instance_prompt, init_state=state,
                      resume=settings.resume, on_progress=progress)
    save_attention_state(result.state, concept.weights, {"against": settings.against, "concept": concept.name,
                                                         "model": str(manifest.model["name"])})
    weights = concept.weights.relative_to(summary.output).as_posix()
    manifest.record(concept.key, status="done", steps=result.steps_done, resumed_from=result.resumed_from,
                    inner_loss=result.inner_loss, outer_loss=result.outer_loss, seconds=round(result.seconds, 2),
                    images=data.names, weights=weights)
    resumed = f" (resumed from step {result.resumed_from})" if result.resumed_from is not None else ""
    on_event("note", "", {"message": f"concept {concept.name}: {result.steps_done} steps, last adaptation "
                                     f"loss {result.inner_loss:.4f}, last defence loss {result.outer_loss:.4f}"
                                     + resumed})
    summary.done.append(weights)
    summary.concepts.append({"concept": concept.name, "steps": result.steps_done, "inner_loss": result.inner_loss,
                             "outer_loss": result.outer_loss, "resumed_from": result.resumed_from})
    return result.state


def save_immunized(pipe: Any, state: dict[str, Any], output: Path, against: str, model: str,
                   concept_names: Sequence[str]) -> tuple[dict[str, Any], int]:
    """Write ``immunized_attention.safetensors`` and ``pipeline/`` (the base model with ``state`` swapped into its
    UNet; the folder is replaced atomically). Returns the base attention tensors and how many tensors changed."""
    import shutil
    import tempfile

    import torch

    from ..train.immunize import apply_attention_state, attention_state, save_attention_state

    base = attention_state(pipe.unet)
    changed = sum(not torch.equal(base[name], value) for name, value in state.items())
    save_attention_state(state, output / IMMUNIZED_NAME, {"against": against, "model": model,
                                                          "concepts": ",".join(concept_names)})
    apply_attention_state(pipe.unet, state)
    # a fresh name, so no file or folder of the user's (an OUTPUT/pipeline.tmp, a symlink there) is deleted or
    # written through; removed again if saving fails
    temporary = Path(tempfile.mkdtemp(prefix=f".{PIPELINE_DIR}.", suffix=".tmp", dir=output))
    try:
        pipe.save_pretrained(str(temporary), safe_serialization=True)
        shutil.rmtree(output / PIPELINE_DIR, ignore_errors=True)
        temporary.replace(output / PIPELINE_DIR)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    finally:
        apply_attention_state(pipe.unet, base)  # a pipeline passed in leaves as it came
    return base, changed


def check_adaptation(settings: ImmunizeSettings, pipe: Any, base: dict[str, Any], state: dict[str, Any],
                     concepts: Sequence[Concept], output: Path, resolution: int, on_event: Event
                     ) -> list[dict[str, Any]]:
    """Adapt the base and the immunized model alike for ``check_steps`` steps on each concept and return both
    adaptation losses (higher = learnt worse); logs in ``OUTPUT/check/NAME/{base,immunized}/``."""
    from ..train.data import load_instance_images
    from ..train.immunize import adapted_loss

    lr = settings.stage_config().lr
    checks = []
    for concept in concepts:
        data = load_instance_images(concept.items, resolution, max_pixels=settings.max_pixels, rejected=[])
        losses = {label: adapted_loss(pipe, weights, data, settings.against, output / CHECK_DIR / concept.name / label,
                                      steps=settings.check_steps, lr=lr, token=settings.attacker_token(),
                                      class_word=concept.class_word, instance_prompt=settings.instance_prompt,
                                      lora_rank=settings.lora_rank, seed=settings.seed)
                  for label, weights in (("base", base), ("immunized", state))}
        checks.append({"concept": concept.name, "steps": settings.check_steps, **losses})
        on_event("note", "", {"message": f"check {concept.name}: adaptation loss after "
                                         f"{settings.check_steps} {settings.against} steps: base {losses['base']:.4f}, "
                                         f"immunized {losses['immunized']:.4f}"})
    return checks


def _with_records(summary: ImmunizeSummary, manifest: Any, concepts: Sequence[Concept]) -> ImmunizeSummary:
    files = manifest.files
    summary.records = {key: files[key] for key in [c.key for c in concepts] + [PIPELINE_DIR] if key in files}
    return summary
