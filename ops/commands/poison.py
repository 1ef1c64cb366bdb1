"""``cloak poison``: one attack over a folder — settings, the run and its dry-run plan.

For every photo (oriented, as :func:`ops.io.read_image` decodes it), one file of the run:

1. the working resolution (:func:`ops.attacks.native.working_size`): short side ``resolution`` (the model's own,
   512 for SD 1.x), aspect kept, multiples of 8;
2. single-image attacks on a photo larger than that optimize ``δ`` in the photo's own pixels through a mimic's
   random resize (``native_size``; :mod:`ops.attacks.resample`), in batches of same-sized photos; otherwise — and
   for ``lf-*``, ``da`` and the set-level attacks (the whole folder at once) — the attack runs at the working size
   and ``δ`` is mapped back to the native size (:func:`ops.attacks.native.to_native`); grayscale photos get a gray
   ``δ`` (they are stored as the channel mean);
3. ``δ`` is zeroed outside ``--mask`` and projected on the stored integers (:func:`ops.attacks.native.project_stored`)
   so the PNG holds ``|q(x') − q(x)| ≤ ⌊ε⌋`` exactly;
4. the PNG is written in the input's mode with its alpha and ICC profile, re-read and checked against the budget;
   loss start/end, L∞ (/255), L2 ([0,1] units), PSNR and SSIM go to ``cloak.json``; with ``preview`` also
   ``OUTPUT/previews/<name>.png`` (original | cloaked | difference amplified so ±ε spans black to white).

Each file draws its randomness from ``ops.io.item_seed(seed, its relative name)``, so shards, resumed runs and
:func:`ops.images.poison_image` (with ``name=``) give the same pixels. The attacks themselves live in
:mod:`ops.attacks` (one module each, registered with their published defaults); this module owns the folder.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from ..errors import UsageError
from .base import (
    Event,
    FolderSettings,
    ModelSettings,
    Plan,
    RunSummary,
    as_input_list,
    attach_records,
    gather,
    header,
    model_problems,
    no_event,
    plan_folder,
)

TARGET_NAMES = ("pattern", "gray", "zero")  # --target keywords; anything else must be an image file
PARAM_TRUE, PARAM_FALSE = ("1", "true", "yes"), ("0", "false", "no")


# ------------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True, kw_only=True)
class PoisonSettings(FolderSettings, ModelSettings):
    """Settings of ``cloak poison`` (the CLI's long flags in snake_case).

    ``attack`` names an attack of :data:`ops.attacks.ATTACKS` (or ``lf-<attack>``); ``None`` is the artist preset
    (:data:`ops.attacks.ARTIST_PRESET`: adm+ with EoT over JPEG). ``params`` holds the attack's own parameters —
    ``eps``, ``steps``, ``t_range``, ``target``, ``rounds`` … — over the defaults its registry entry states;
    ``param`` the CLI's ``--param KEY=VALUE`` strings (typed like the default). A parameter the attack does not
    have is an error naming the ones it has. ``resolution=None`` is the model's own size; ``batch_size=None`` is 1
    for single-image attacks and the whole set for set-level ones.
    """

    command = "poison"
    attack: str | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    param: tuple[str, ...] = ()
    mask: Path | None = None
    robust: str | None = None
    eot_samples: int = 1
    jpeg_quality: int | None = None
    resolution: int | None = None
    native_size: bool = True
    native_crops: float = 0.0
    preview: bool = False
    clean_dir: Path | None = None
    eval_draws: int = 4
    checkpointing: bool = False
    batch_size: int | None = None

    def check(self) -> None:
        spec = self.spec()
        params = self.resolved()  # unknown or out-of-range attack parameters: a UsageError naming the flag
        if spec.needs_target and params.get("target") not in TARGET_NAMES and \
                not Path(str(params.get("target"))).is_file():
            raise UsageError(f"--target {params.get('target')!r} is neither pattern, gray, zero nor an image file")
        if self.clean_dir is not None and not spec.set_level:
            raise UsageError(f"--clean-dir applies to set-level attacks only, not --attack {spec.name}")
        self.transforms()

    @property
    def preset(self) -> str | None:
        """``"artist"`` when no attack was named."""
        return "artist" if self.attack is None else None

    def spec(self) -> Any:
        """The attack's registry entry (:class:`ops.attacks.AttackSpec`)."""
        from ..attacks import ARTIST_PRESET, get_attack

        return get_attack(self.attack or ARTIST_PRESET["attack"])

    def resolved(self) -> dict[str, Any]:
        """The attack's parameters: ``params`` and ``param`` over the defaults of its registry entry."""
        spec = self.spec()
        given = dict(self.params)
        unknown = sorted(set(given) - set(spec.defaults) - _all_attack_parameters())
        if unknown:
            raise UsageError(f"poison: unknown setting(s) {', '.join(unknown)} (valid: "
                             f"{', '.join(sorted(set(type(self).names()) - {'params'}))}; parameters of --attack "
                             f"{spec.name}: {', '.join(sorted(spec.defaults))})")
        extra = parse_param_pairs(self.param, spec.defaults)
        overlap = sorted(set(extra) & {key for key, value in given.items() if value is not None})
        if overlap:
            raise UsageError(f"--param {overlap[0]} repeats a flag; give it once")
        given.update(extra)
        if given.get("t_range") is not None:
            given["t_range"] = parse_t_range(given["t_range"])
        params = spec.resolve(given)
        for key, value in params.items():  # eps=8 from Python is the CLI's --eps 8 (8.0): same manifest hash
            if isinstance(spec.defaults.get(key), float) and isinstance(value, int) and not isinstance(value, bool):
                params[key] = float(value)
        if params.get("t_range") is not None:
            params["t_range"] = list(params["t_range"])
        return params

    def transforms(self) -> list[str]:
        """``--robust`` as a list (the preset's ``jpeg`` when no attack and no ``--robust`` were given)."""
        from ..attacks import ARTIST_PRESET
        from ..attacks.robust import parse_robust

        robust = ARTIST_PRESET["robust"] if self.robust is None and self.preset else self.robust
        if isinstance(robust, (list, tuple)):
            robust = ",".join(robust) or "none"
        return parse_robust(robust)


Settings = PoisonSettings


def parse_t_range(value: Any) -> list[int]:
    """``"LO,HI"`` (or ``"LO:HI"``, or a pair) → ``[LO, HI]``."""
    if isinstance(value, (list, tuple)):
        if len(value) == 2:
            return [int(value[0]), int(value[1])]
        value = ",".join(str(part) for part in value)
    try:
        low, high = (int(part) for part in str(value).replace(":", ",").split(","))
    except ValueError:
        raise UsageError(f"--t-range {value!r}: give two integers LO,HI (e.g. 0,1000)") from None
    return [low, high]


def parse_param_pairs(pairs: Sequence[str], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """``--param key=value`` for attack parameters without a flag, typed like the default (a key the attack does
    not have passes through untyped; :meth:`MethodSpec.resolve` then names the valid ones)."""
    out: dict[str, Any] = {}
    for pair in pairs or ():
        if "=" not in pair:
            raise UsageError(f"--param {pair!r}: write KEY=VALUE (e.g. --param rounds=10)")
        key, text = (part.strip() for part in pair.split("=", 1))
        key = key.replace("-", "_")
        default = defaults.get(key)
        try:
            if isinstance(default, bool):
                if text.lower() not in PARAM_TRUE + PARAM_FALSE:
                    raise ValueError(text)
                value: Any = text.lower() in PARAM_TRUE
            elif isinstance(default, int):
                value = int(text)
            elif isinstance(default, float):
                value = float(text)
            else:
                value = None if text.lower() == "none" else text
        except ValueError:
            raise UsageError(f"--param {key}={text!r}: expected a {type(default).__name__}") from None
        out[key] = value
    return out


@functools.lru_cache(maxsize=1)
def _all_attack_parameters() -> frozenset[str]:
    """Every parameter name some attack has (a key outside it is a misspelt setting, not a misplaced parameter)."""
    from ..attacks import ATTACKS, attack_names, get_attack

    return frozenset(key for name in attack_names() for key in get_attack(name).defaults) | frozenset(
        key for spec in ATTACKS.values() for key in spec.defaults)


# ------------------------------------------------------------------------------------------ what a run records
@dataclass
class Resolved:
    """A run's settings made concrete: the model, device, dtype, working resolution and manifest parameters."""

    model: str
    device: Any
    dtype: Any
    resolution: int
    params: dict[str, Any]  # the attack's parameters
    manifest_params: dict[str, Any]  # what cloak.json records (their hash decides resume)
    model_record: dict[str, Any]


def resolve(settings: PoisonSettings) -> Resolved:
    """Model name, device, dtype, working resolution and the manifest's parameters (no model is loaded)."""
    from ..device import resolve_device, resolve_dtype
    from ..models import default_model, model_info, native_resolution

    model = settings.model or default_model()
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    resolution = native_resolution(model) if settings.resolution is None else settings.resolution
    params, transforms, record = settings.resolved(), settings.transforms(), model_info(model).as_dict()
    manifest = {"attack": settings.spec().name, "preset": settings.preset, **params, "resolution": resolution,
                "native_size": settings.native_size, "native_crops": settings.native_crops, "robust": transforms,
                "eot_samples": settings.eot_samples if transforms else None, "jpeg_quality": settings.jpeg_quality,
                "mask": str(settings.mask) if settings.mask else None,
                "clean_dir": str(settings.clean_dir) if settings.clean_dir else None,
                "dtype": str(dtype).replace("torch.", ""), "model": record}
    return Resolved(model, device, dtype, resolution, params, manifest, record)


# --------------------------------------------------------------------------------------------------- dry run
def plan(settings: PoisonSettings, inputs: Sequence[str] | str | Path, output: Path | str) -> Plan:
    """What ``run`` would do, reading only headers, masks' presence and the manifest."""
    output = Path(output)
    items, notes, _ = gather(as_input_list(inputs), output, recursive=settings.recursive, shard=settings.shard)
    load_masks(settings.mask, items)  # a missing per-file mask is the run's usage error too
    run = resolve(settings)
    return plan_folder("poison", settings, items, output, run.manifest_params, overwrite=settings.overwrite,
                       model=run.model, notes=[*notes, *model_problems(run.model)], min_size=8,
                       max_pixels=settings.max_pixels)


# ------------------------------------------------------------------------------------------------------ run
def run(settings: PoisonSettings, inputs: Sequence[str] | str | Path, output: Path | str, *,
        on_event: Event | None = None, pipe: Any = None) -> RunSummary:
    """Poison every input into ``OUTPUT/<same name>.png`` (same size, mode, orientation, alpha and ICC profile).

    ``pipe``: the pipeline of ``settings.model``, already loaded (the manifest records ``settings.model`` and the
    working size defaults to its size); otherwise the model loads when the first file needs work (a resumed run
    with nothing left to do loads nothing)."""
    from ..io import shard_label
    from ..manifest import Manifest
    from ..models import check_available, default_model

    output = Path(output)
    on_event = on_event or no_event
    items, notes, shard_spec = gather(as_input_list(inputs), output, recursive=settings.recursive,
                                      shard=settings.shard)
    if pipe is None:
        check_available(settings.model or default_model())  # a missing model: one line, no output folder left
    resolved = resolve(settings)
    manifest = Manifest(output, "poison", resolved.manifest_params, seed=settings.seed, model=resolved.model_record,
                        extra={"device": str(resolved.device), "batch_size": settings.batch_size,
                               "shard": shard_label(shard_spec), "preview": settings.preview,
                               "checkpointing": settings.checkpointing})
    header(on_event, resolved.model, resolved.device, resolved.dtype, resolved.resolution or "native", notes)
    if settings.preset:
        from ..attacks import ARTIST_PRESET

        preset = ", ".join(f"{key} {value}" for key, value in ARTIST_PRESET.items())
        on_event("info", "", {"message": f"cloak: note: no --attack given: artist preset ({preset})"})
    load = functools.partial(_load_pipeline, resolved.model, resolved.device, resolved.dtype,
                             settings.trust_pickle, on_event)
    summary = poison_folder(items, output, settings.spec().name, resolved.params, pipe=pipe, load_pipe=load,
                            manifest=manifest, seed=settings.seed, batch_size=settings.batch_size,
                            overwrite=settings.overwrite, max_pixels=settings.max_pixels,
                            resolution=resolved.resolution, robust_transforms=settings.transforms(),
                            eot_samples=settings.eot_samples, jpeg_quality=settings.jpeg_quality,
                            mask=str(settings.mask) if settings.mask else None,
                            clean_dir=str(settings.clean_dir) if settings.clean_dir else None,
                            preview=settings.preview, checkpointing=settings.checkpointing,
                            eval_draws=settings.eval_draws, native=settings.native_size,
                            native_crops=settings.native_crops, on_event=on_event,
                            progress=functools.partial(_progress_line, on_event))
    summary.output, summary.notes = output, list(notes)
    return attach_records(summary, output)


def _load_pipeline(model: str, device: Any, dtype: Any, trust_pickle: bool, on_event: Event) -> Any:
    from ..models import load_pipeline

    on_event("info", "", {"message": f"cloak: loading model {model}"})
    return load_pipeline(model, device=device, dtype=dtype, trust_pickle=trust_pickle)


def _progress_line(on_event: Event, text: str) -> None:
    """A set-level attack's progress text (rounds, surrogate steps) as a progress line."""
    on_event("info", "", {"message": f"poison: {text}"})


# --------------------------------------------------------------------------------------------------- inputs
def load_masks(mask: str | Path | None, items: Sequence[Any]) -> dict[str, Path] | None:
    """``--mask``: one mask file for every input, or a folder with ``<name>.png`` per input (``cloak mask``
    output). Returns rel → mask path; a missing mask is a usage error naming the file."""
    from ..io import safe_join

    if not mask:
        return None
    path = Path(mask)
    if path.is_file():
        return {item.rel.as_posix(): path for item in items}
    if not path.is_dir():
        raise UsageError(f"--mask {mask}: no such file or folder")
    found = {}
    for item in items:
        candidate = safe_join(path, item.output_rel)
        if not candidate.is_file():
            raise UsageError(f"--mask {mask}: no mask {item.output_rel} for input {item.path} (run cloak mask first, "
                             "or pass one mask file for all inputs)")
        found[item.rel.as_posix()] = candidate
    return found


def load_clean_set(clean_dir: str | None, resolution: int) -> list[Any] | None:
    """``--clean-dir``: set A of the set-level attacks, each image at its working resolution."""
    from ..attacks.native import resize, working_size
    from ..errors import RejectedInput
    from ..io import collect_inputs, read_image

    if not clean_dir:
        return None
    items, _ = collect_inputs([clean_dir])
    images = []
    for item in items:
        try:
            rgb = read_image(item.path).rgb
        except RejectedInput as exc:
            raise UsageError(f"--clean-dir: {item.path}: {exc}") from None
        images.append(resize(rgb[None], working_size(rgb.shape[1], rgb.shape[2], resolution))[0].clamp(0, 1))
    if not images:
        raise UsageError(f"--clean-dir {clean_dir}: no images found")
    return images


# ------------------------------------------------------------------------------------------ the attack's run
@dataclass
class AttackRun:
    """What every batch of one poison run shares: the attack, its parameters as the module takes them, the model
    (built on first use from ``pipe`` or ``load_pipe()``), EoT options and the working-size rules."""

    spec: Any
    params: dict[str, Any]  # passed to the attack function (prompt removed; t_range only for set-level attacks)
    target: str | None
    eps: float
    prompt: str
    t_range: tuple[int, int] | None
    resolution: int
    native: bool = True
    native_crops: float = 0.0
    eval_draws: int = 4
    options: dict[str, Any] = field(default_factory=dict)  # eot, eot_samples
    checkpointing: bool = False
    pipe: Any = None
    load_pipe: Callable[[], Any] | None = None
    attack_models: Any = None

    @classmethod
    def create(cls, attack: str, params: Mapping[str, Any], *, resolution: int, robust_transforms: Sequence[str] = (),
               eot_samples: int = 1, jpeg_quality: int | None = None, **options: Any) -> AttackRun:
        """From resolved attack parameters: ``prompt`` and ``t_range`` configure the model (``t_range`` also goes
        to set-level attacks, which train with it), ``target`` becomes the target image per batch."""
        from ..attacks import get_attack
        from ..attacks.robust import make_eot

        spec = get_attack(attack)
        params = dict(params)
        t_range = tuple(params["t_range"]) if params.get("t_range") else None
        prompt = params.pop("prompt", None) or params.get("instance_prompt") or "a photo"
        if "t_range" in params:
            params["t_range"] = t_range
            if not spec.set_level:
                params.pop("t_range")
        target = params.pop("target", None) if not spec.set_level else params.get("target")
        eot = make_eot(robust_transforms, jpeg_quality)
        return cls(spec=spec, params=params, target=target, eps=float(params["eps"]), prompt=prompt,
                   t_range=t_range, resolution=resolution,
                   options={"eot": eot, "eot_samples": eot_samples} if eot is not None else {}, **options)

    def models(self) -> Any:
        """The :class:`ops.attacks.engine.AttackModels`, built once (loading the pipeline if none was given)."""
        from ..attacks.engine import AttackModels

        if self.attack_models is None:
            pipe = self.pipe if self.pipe is not None else self.load_pipe()  # type: ignore[misc]
            self.attack_models = pipe if isinstance(pipe, AttackModels) else AttackModels(
                pipe, prompt=self.prompt, t_range=self.t_range, checkpointing=self.checkpointing)
        return self.attack_models

    def working_size(self, shape: Sequence[int]) -> tuple[int, int]:
        from ..attacks.native import working_size

        return working_size(shape[0], shape[1], self.resolution)

    def at_native(self, shape: Sequence[int]) -> bool:
        """Whether a photo of ``(H, W)`` is optimized in its own pixels."""
        from ..attacks.native import native_applies

        return self.native and native_applies(self.spec, shape, self.working_size(shape))


def prepare(run: AttackRun, rgb: Any, mask_native: Any, at_native: bool) -> tuple[Any, Any]:
    """``(image the attack runs on, mask at that image's size)`` for a native ``(3, H, W)`` photo."""
    from ..attacks.native import resize, working_mask

    if at_native:
        return rgb.float(), mask_native
    size = run.working_size(rgb.shape[1:])
    work = resize(rgb[None], size)[0].clamp(0, 1)
    return work, (working_mask(mask_native, size) if mask_native is not None else None)


def job_mask(masks: Mapping[str, Path] | None, job: Any) -> Any:
    """The native ``(1, H, W)`` mask of ``job`` (``None`` without ``--mask``)."""
    from ..attacks.native import native_mask

    if not masks:
        return None
    return native_mask(masks[job.item.rel.as_posix()], tuple(job.image.rgb.shape[1:]))


def attack_images(run: AttackRun, jobs: Sequence[Any], masks: Sequence[Any]) -> list[Any]:
    """A single-image attack on ``jobs`` (each with ``.image``, ``.seed``) and their native masks (or ``None``s),
    in batches of same-sized photos; returns one :class:`ops.runner.ProcessedImage` per job, at its native size."""
    from ..runner import same_size_groups

    results: dict[int, Any] = {}
    mask_of = {id(job): mask for job, mask in zip(jobs, masks)}
    for group in same_size_groups(jobs):  # same native size ⇒ same working size and the same native rule
        for job, processed in zip(group, attack_group(run, group, [mask_of[id(job)] for job in group])):
            results[id(job)] = processed
    return [results[id(job)] for job in jobs]


def attack_group(run: AttackRun, jobs: Sequence[Any], masks_native: Sequence[Any]) -> list[Any]:
    """One batch of same-sized photos through the attack."""
    import torch

    from ..attacks.resample import NativeView

    models = run.models()
    device = models.device
    shape = tuple(jobs[0].image.rgb.shape[1:])
    on_native = run.at_native(shape)
    prepared = [prepare(run, job.image.rgb, mask, on_native) for job, mask in zip(jobs, masks_native)]
    images = torch.stack([work for work, _ in prepared]).to(device)
    generators = [torch.Generator().manual_seed(job.seed) for job in jobs]
    size = run.working_size(shape) if on_native else tuple(images.shape[-2:])
    extra: dict[str, Any] = {**run.options, "eval_draws": run.eval_draws}
    if any(mask is not None for mask in masks_native):
        extra["mask"] = torch.stack([mask for _, mask in prepared]).to(device)
    if run.spec.needs_target:
        from ..attacks.ea import make_target

        extra["targets"] = make_target(run.target, *size)[None].expand(len(jobs), -1, -1, -1)
    gray = torch.tensor([job.image.gray for job in jobs], device=device).view(-1, 1, 1, 1)
    if bool(gray.any()):  # grayscale photos are stored as the channel mean: optimize a gray δ
        extra["delta_transform"] = functools.partial(gray_delta, gray=gray)
    # the view's own stream (for encodes given no generators), seeded from each image's seed
    models.view = NativeView(size, crop_probability=run.native_crops, generators=[
        torch.Generator().manual_seed((job.seed * 1000003 + 7) % 2**63) for job in jobs]) if on_native else None
    try:
        result = run.spec.load().attack(images, models=models, generators=generators, **run.spec.fixed,
                                        **run.params, **extra)
    finally:
        models.view = None
    return [finish(run, job, result.images[index], work, mask, result, index)
            for index, (job, (work, _), mask) in enumerate(zip(jobs, prepared, masks_native))]


def gray_delta(delta: Any, gray: Any) -> Any:
    """``δ`` of the grayscale images in a batch (``gray`` ``(B, 1, 1, 1)`` bool) replaced by its channel mean (the
    engine's ``delta_transform``)."""
    import torch

    return torch.where(gray, delta.mean(1, keepdim=True).expand_as(delta), delta)


def attack_set(run: AttackRun, jobs: Sequence[Any], masks_native: Sequence[Any], *, clean_dir: str | None,
               batch_size: int | None, progress: Callable[[str], None] | None) -> list[Any]:
    """A set-level attack on the whole folder (``jobs`` in order) at the working resolution."""
    import torch

    models = run.models()
    prepared = [prepare(run, job.image.rgb, mask, False) for job, mask in zip(jobs, masks_native)]
    generators = [torch.Generator().manual_seed(job.seed) for job in jobs]
    extra = dict(run.options)
    if any(mask is not None for mask in masks_native):
        extra["masks"] = [mask for _, mask in prepared]
    results = run.spec.load().attack_set([work for work, _ in prepared], models=models, generators=generators,
                                         clean_images=load_clean_set(clean_dir, run.resolution), progress=progress,
                                         batch_size=batch_size, **run.spec.fixed, **run.params, **extra)
    return [finish(run, job, result.images[0], work, mask, result, 0)
            for job, (work, _), mask, result in zip(jobs, prepared, masks_native, results)]


def finish(run: AttackRun, job: Any, adversarial: Any, work: Any, mask_native: Any, result: Any,
           index: int) -> Any:
    """Map the attack's output back to the native photo, project the budget on the stored integers, and collect
    the file's stats (loss start/end, working size, where it was optimized, the attack's scalar stats)."""
    from ..attacks.native import project_stored, to_native
    from ..runner import ProcessedImage

    rgb = to_native(adversarial.float().cpu(), work.cpu(), job.image.rgb, mask_native)
    rgb = project_stored(rgb, job.image, run.eps)
    start, end = float(result.loss_start[index]), float(result.loss_end[index])
    shape = tuple(job.image.rgb.shape[1:])
    size = run.working_size(shape)
    stats = {"loss_start": None if math.isnan(start) else start, "loss_end": None if math.isnan(end) else end,
             "working_size": [int(size[1]), int(size[0])],
             "optimized_at": "native" if tuple(work.shape[-2:]) == shape and tuple(size) != shape else "working"}
    stats.update({key: value for key, value in result.stats.items() if isinstance(value, (int, float, str))})
    return ProcessedImage(rgb, stats)


# ------------------------------------------------------------------------------------------ per-file checks
def verify_stored(job: Any, stored: Any, *, eps: float, out_dir: Path, preview: bool) -> dict[str, Any]:
    """Re-read the written PNG, check the budget and the alpha on its bytes, write the preview, return L∞/L2/PSNR/
    SSIM (raises :class:`CloakError` to fail the file)."""
    import numpy as np

    from ..errors import CloakError, RejectedInput
    from ..io import output_path, quantize, read_back
    from ..metrics.basic import psnr, ssim

    written = read_back(job.output)
    original = quantize(job.image.rgb, job.image)
    if written.shape != original.shape:
        raise CloakError(f"{job.output}: stored shape {written.shape} differs from the input's {original.shape}")
    difference = written.astype(np.int64) - original.astype(np.int64)
    if job.image.alpha is not None and np.any(difference[..., -1]):
        raise CloakError(f"{job.output}: alpha channel changed")
    colour = difference[..., :-1] if job.image.alpha is not None else difference
    linf = float(np.abs(colour).max(initial=0)) * 255 / job.image.max_value
    if linf > eps + 1e-9:
        raise CloakError(f"{job.output}: stored L∞ {linf:.3f}/255 exceeds ε {eps}/255")
    scale = job.image.max_value
    a = original[..., : colour.shape[2]].astype(np.float64) / scale
    b = written[..., : colour.shape[2]].astype(np.float64) / scale
    notes = {}
    if preview:  # no write through a symlink inside OUTPUT, nor over a preview cloak did not write
        try:
            target = output_path(out_dir, PurePosixPath("previews") / job.item.output_rel)
            if target.exists() and not job.owned:
                raise RejectedInput(f"{target} exists and was not written by cloak")
            write_preview(target, original, written, eps, scale)
        except RejectedInput as exc:
            notes["warning"] = f"preview not written: {exc}"
    return {**notes, "linf": round(linf, 4), "l2": round(float(np.sqrt(((b - a) ** 2).sum())), 6),
            "psnr": round(psnr(b, a), 4), "ssim": round(ssim(b, a), 6)}


def contact_sheet(original: Any, cloaked: Any, eps: float, max_value: int) -> Any:
    """``original | cloaked | amplified difference`` as uint8 RGB ``(H, 3W + 16, 3)``; ±ε spans black→white."""
    import numpy as np

    a = original[..., :3].astype(np.float64) / max_value
    b = cloaked[..., :3].astype(np.float64) / max_value
    if a.shape[2] == 1:
        a, b = np.repeat(a, 3, 2), np.repeat(b, 3, 2)
    difference = np.clip(0.5 + (b - a) * (0.5 * 255 / max(eps, 1e-6)), 0, 1)
    gap = np.ones((a.shape[0], 8, 3))
    return np.rint(np.concatenate([a, gap, b, gap, difference], axis=1) * 255).astype(np.uint8)


def write_preview(path: Path, original: Any, cloaked: Any, eps: float, max_value: int) -> None:
    import io

    from PIL import Image

    from ..io import atomic_write_bytes

    sheet = Image.fromarray(contact_sheet(original, cloaked, eps, max_value))
    if sheet.height > 512:
        sheet = sheet.resize((round(sheet.width * 512 / sheet.height), 512), Image.LANCZOS)
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


# ------------------------------------------------------------------------------------------------- the folder
def process_single(run: AttackRun, masks: Mapping[str, Path] | None, on_event: Event, jobs: list[Any]) -> list[Any]:
    """The runner's ``process`` for single-image attacks: one batch, with its inner steps reported."""
    from ..attacks import engine

    name = ", ".join(job.item.rel.as_posix() for job in jobs[:2]) + (" …" if len(jobs) > 2 else "")
    with engine.step_hook(functools.partial(_report_step, on_event, name)):
        return attack_images(run, jobs, [job_mask(masks, job) for job in jobs])


def process_set(run: AttackRun, masks: Mapping[str, Path] | None, on_event: Event, clean_dir: str | None,
                batch_size: int | None, progress: Callable[[str], None] | None, jobs: list[Any]) -> list[Any]:
    """The runner's ``process`` for set-level attacks: the whole folder in one call."""
    from ..attacks import engine

    with engine.step_hook(functools.partial(_report_step, on_event, "")):
        return attack_set(run, jobs, [job_mask(masks, job) for job in jobs], clean_dir=clean_dir,
                          batch_size=batch_size, progress=progress)


def _report_step(on_event: Event, name: str, step: int, total: int) -> None:
    on_event("step", name, {"step": step, "total": total})


def _accept_aspect(image: Any) -> None:
    from ..validate import check_aspect

    check_aspect(*image.size)


def poison_folder(items: Sequence[Any], out_dir: Path, attack: str, params: dict[str, Any], *,
                  pipe: Any = None, load_pipe: Callable[[], Any] | None = None, manifest: Any,
                  seed: int = 0, batch_size: int | None = None, overwrite: bool = False,
                  max_pixels: int | None = None, resolution: int = 512, robust_transforms: Sequence[str] = (),
                  eot_samples: int = 1, jpeg_quality: int | None = None, mask: str | None = None,
                  clean_dir: str | None = None, preview: bool = False, checkpointing: bool = False,
                  eval_draws: int = 4, native: bool = True, native_crops: float = 0.0,
                  on_event: Event | None = None, progress: Callable[[str], None] | None = None) -> RunSummary:
    """Poison every item with ``attack`` (``params`` already resolved against its spec) into ``out_dir``.

    ``pipe`` is the loaded diffusers pipeline (or an :class:`ops.attacks.engine.AttackModels`), or ``load_pipe()``
    loads it when the first image needs work (a resumed run with nothing left to do loads no model);
    ``eval_draws`` fixed (t, ε) draws measure loss_start/loss_end (0: not measured, recorded as null). ``native``:
    optimize single-image attacks at the photo's own size through the mimic's resize (see the module docstring);
    ``False`` is the working-size-and-upsample path; ``native_crops``: the share of the view's draws that are
    random crops (``NativeView.crop_probability``). ``batch_size``: images per batch for single-image attacks
    (``None``: 1), the PGD minibatch of set-level attacks (``None``: all same-sized images at once, as
    Anti-DreamBooth).
    """
    from ..runner import process_folder

    on_event = on_event or no_event
    run = AttackRun.create(attack, params, resolution=resolution, robust_transforms=robust_transforms,
                           eot_samples=eot_samples, jpeg_quality=jpeg_quality, native=native,
                           native_crops=native_crops, eval_draws=eval_draws, checkpointing=checkpointing, pipe=pipe,
                           load_pipe=load_pipe)
    masks = load_masks(mask, items)
    if run.spec.set_level:
        process = functools.partial(process_set, run, masks, on_event, clean_dir, batch_size, progress)
    else:
        process = functools.partial(process_single, run, masks, on_event)
    verify = functools.partial(verify_stored, eps=run.eps, out_dir=out_dir, preview=preview)
    kwargs = {"max_pixels": max_pixels} if max_pixels else {}
    return process_folder(items, out_dir, manifest, process, seed=seed,
                          batch_size=max(1, len(items)) if run.spec.set_level else (batch_size or 1),
                          overwrite=overwrite, min_size=8, verify=verify, on_event=on_event,
                          accept=_accept_aspect if resolution > 0 else None, **kwargs)

