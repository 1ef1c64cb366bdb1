"""``cloak ssm``: semantic sensitivity maps (paper 000 Eq. 6) or one ``--profile`` analysis (Fig. 4–7, 12, 13) —
settings, the run and its dry-run plan. The math lives in :mod:`ops.ssm`, the working crops and figures in
:mod:`ops.ssm_figures`.

One command, three runs:
  * **maps** (default): per image ``OUT/<name>.npy`` ``(T, N, h, w)``, ``OUT/<name>.png`` (the Fig. 3 grid) and a
    ``cloak.json`` record (per-map means; ``R`` of Eq. 16 with ``masks``) — resumable, shardable, bad files rejected;
  * **profile**: one analysis over all images → ``OUT/profile-<name>.json`` and ``OUT/profile-<name>.png``;
  * **training logs**: ``profile="mask-loss"`` with ``train_log.jsonl`` inputs plots the logged inside/outside losses
    (Fig. 6; no model).

matplotlib is the optional extra ``plot``: without it arrays and JSON are written, the PNGs skipped, and a note says
so. Stdlib-only at import (the CLI lists :data:`PROFILES`); torch loads inside ``run``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CloakError, RejectedInput, UsageError
from ..ssm_figures import (
    band_plot,
    find_twin,
    histogram_plot,
    spectrum_plot,
    square_mask,
    ssm_grid,
    to_square,
    train_log_plot,
)
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
    header_problem,
    model_problems,
    no_event,
    plan_folder,
)

PROFILES = ("loss", "grad", "mask-loss", "jpeg-hist", "spectrum")  # --profile
MAP_TIMESTEPS = (100, 200, 300, 400, 500, 600, 700, 800, 1000)  # paper 000 Fig. 3 (1000 = the last index, 999)
DEFAULT_SCHEDULE = 1000  # training timesteps of every SD scheduler, when the model's config is not on disk


@dataclass(frozen=True, kw_only=True)
class SsmSettings(FolderSettings, ModelSettings):
    """Settings of ``cloak ssm`` (the CLI's long flags in snake_case).

    ``token``: the tokens or words of ``prompt`` to map (default: every token); one unknown to the tokenizer is
    added, initialised from ``init_word``, unless ``embedding`` (a TI ``learned_embeds.safetensors``) provides the
    first one. ``timesteps``: ``"100,200"`` or integers (1000 = the last index); default :data:`MAP_TIMESTEPS` for
    maps, 21 equally spaced for profiles (:func:`ops.ssm.profile_timesteps`). ``samples``: draws of (replacement,
    noise) averaged per map / profile point. ``batch_size``: timesteps per UNet call for maps (results do not
    depend on it). ``resolution``: working size (default: the model's own)."""

    command = "ssm"
    prompt: str = "a photo of a <R*>"
    token: tuple[str, ...] = ()
    embedding: Path | None = None
    init_word: str = "object"
    timesteps: tuple[int, ...] | None = None
    samples: int = 8
    masks: Path | None = None
    profile: str | None = None
    clean: Path | None = None
    quality: int = 25  # SZT's JPEG quality, for jpeg-hist and spectrum
    resolution: int | None = None
    batch_size: int = 4

    def __post_init__(self) -> None:
        token = (self.token,) if isinstance(self.token, str) else tuple(self.token or ())
        object.__setattr__(self, "token", tuple(str(word) for word in token))
        object.__setattr__(self, "timesteps", _integers(self.timesteps))
        super().__post_init__()

    def check(self) -> None:
        if self.profile is not None and self.profile not in PROFILES:
            raise UsageError(f"--profile {self.profile!r}: choose one of {', '.join(PROFILES)}")
        if self.embedding is not None and not self.token:
            raise UsageError("--embedding needs --token (the token it is stored under, e.g. '<R*>')")
        if self.profile == "grad" and not self.token:
            raise UsageError("--profile grad needs --token (the TI token whose embedding gradient is measured)")
        if self.profile == "jpeg-hist" and self.clean is None:
            raise UsageError("--profile jpeg-hist compares against clean images: pass --clean FOLDER")


Settings = SsmSettings


def _integers(value: Any) -> tuple[int, ...] | None:
    """``--timesteps``: ``"100,200,500"`` (the command line) or integers (the API) → a tuple of integers >= 0."""
    if value is None:
        return None
    text = value if isinstance(value, str) else ",".join(str(part) for part in value)
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise UsageError(f"--timesteps {text!r}: expected integers like 100,200,500") from None
    if not values or min(values) < 0:
        raise UsageError(f"--timesteps {text!r}: expected integers >= 0 like 100,200,500")
    return values


def schedule_timesteps(settings: SsmSettings, num_timesteps: int) -> list[int]:
    """The timesteps a run uses on a ``num_timesteps`` schedule: the given ones (``num_timesteps`` means the last
    index), else :data:`MAP_TIMESTEPS` for maps and 21 equally spaced (paper 000 Fig. 4) for profiles."""
    if settings.timesteps is None and settings.profile:
        from ..ssm import profile_timesteps

        return profile_timesteps(num_timesteps)
    values = settings.timesteps or MAP_TIMESTEPS
    if max(values) > num_timesteps:
        raise UsageError(f"--timesteps {','.join(map(str, values))}: values must be in 0..{num_timesteps}")
    return [min(value, num_timesteps - 1) for value in values]


def is_train_log_run(settings: SsmSettings, inputs: Sequence[str]) -> bool:
    """``--profile mask-loss`` on ``train_log.jsonl`` files: Fig. 6 from training logs."""
    return settings.profile == "mask-loss" and bool(inputs) and all(name.endswith(".jsonl") for name in inputs)


def map_params(settings: SsmSettings, model: str, timesteps: Sequence[int], size: int) -> dict[str, Any]:
    """The maps run's ``cloak.json`` parameters (their hash decides resume; the keys of earlier versions)."""
    return {"prompt": settings.prompt, "tokens": list(settings.token), "timesteps": list(timesteps),
            "samples": settings.samples, "resolution": size, "init_word": settings.init_word,
            "embedding": _text(settings.embedding), "masks": _text(settings.masks), "model": model}


def profile_params(settings: SsmSettings, model: str, timesteps: Sequence[int], size: int) -> dict[str, Any]:
    return {"profile": settings.profile, "prompt": settings.prompt, "tokens": list(settings.token),
            "timesteps": list(timesteps), "samples": settings.samples, "resolution": size,
            "quality": settings.quality, "clean": _text(settings.clean), "masks": _text(settings.masks),
            "embedding": _text(settings.embedding), "model": model}


def _text(path: Path | None) -> str | None:
    return str(path) if path is not None else None


# ------------------------------------------------------------------------------------------------------ plan
def plan(settings: SsmSettings, inputs: Sequence[str] | str | Path, output: Path | str) -> Plan:
    """What ``run`` would do: inputs, outputs, skips and rejections from headers, configs and the manifest only."""
    from ..models import default_model, native_resolution

    output = Path(output)
    given = as_input_list(inputs)
    if is_train_log_run(settings, given):
        for path in given:
            read_train_log(Path(path))  # a missing or malformed log stops the run: say so now
        return Plan("ssm", str(output), settings.as_dict(), inputs=given,
                    run=["profile-mask-loss.json", "profile-mask-loss.png"],
                    notes=[f"Fig. 6 from {len(given)} training log(s); no model loads"])
    items, notes, _ = gather(given, output, recursive=settings.recursive, shard=settings.shard)
    model = settings.model or default_model()
    notes = [*notes, *model_problems(model)]
    size = settings.resolution or native_resolution(model)
    if settings.profile:
        return _plan_profile(settings, items, output, model, size, notes)
    steps = schedule_timesteps(settings, _schedule_length(model))
    result = plan_folder("ssm", settings, items, output, map_params(settings, model, steps, size),
                         overwrite=settings.overwrite, model=model, notes=notes, max_pixels=settings.max_pixels)
    result.notes.append(f"maps at {size} px, timesteps {steps}; each map also writes OUTPUT/<name>.npy")
    return result


def _plan_profile(settings: SsmSettings, items: Sequence[Any], output: Path, model: str, size: int,
                  notes: list[str]) -> Plan:
    _check_profile_inputs(settings)
    result = Plan("ssm", str(output), settings.as_dict(), model=model, notes=notes)
    for item in items:
        result.inputs.append(str(item.path))
        reason = header_problem(item.path, max_pixels=settings.max_pixels)
        if reason:
            result.rejected.append((str(item.path), reason))
    result.run = [f"profile-{settings.profile}.json", f"profile-{settings.profile}.png"]
    steps = (schedule_timesteps(settings, _schedule_length(model)) if settings.timesteps is not None
             else "21 equally spaced from 0 to the last")
    result.notes.append(f"one {settings.profile} profile over the readable images at {size} px, timesteps {steps}")
    return result


def _schedule_length(model: str) -> int:
    """``num_train_timesteps`` from the scheduler config on disk (no model loads), else :data:`DEFAULT_SCHEDULE`."""
    from ..models import config_file

    found = config_file(model, "scheduler/scheduler_config.json")
    try:
        return int(json.loads(found.read_text()).get("num_train_timesteps", DEFAULT_SCHEDULE)) if found \
            else DEFAULT_SCHEDULE
    except (OSError, ValueError, TypeError, AttributeError):
        return DEFAULT_SCHEDULE


def _check_profile_inputs(settings: SsmSettings) -> None:
    if settings.profile == "mask-loss" and settings.masks is None:
        raise UsageError("--profile mask-loss needs --masks FOLDER (masks named like the images), or "
                         "train_log.jsonl files as inputs")


# ------------------------------------------------------------------------------------------------------- run
def run(settings: SsmSettings, inputs: Sequence[str] | str | Path, output: Path | str, *,
        on_event: Event | None = None, pipe: Any = None) -> RunSummary:
    """Maps of every input, or the ``profile`` analysis (see the module docstring), into ``output``.

    ``pipe`` reuses a pipeline already loaded from ``settings.model`` (the tokens of ``settings.token`` and the
    ``embedding`` are added to it)."""
    from ..io import shard_label

    output = Path(output)
    on_event = on_event or no_event
    given = as_input_list(inputs)
    if is_train_log_run(settings, given):
        return run_train_logs(settings, given, output, on_event)
    items, notes, shard_spec = gather(given, output, recursive=settings.recursive, shard=settings.shard,
                                      on_event=on_event)
    if settings.profile:
        _check_profile_inputs(settings)
    model = load_model(settings, pipe)
    header(on_event, model.name, model.device, model.dtype, model.size)
    extra = {"device": str(model.device), "shard": shard_label(shard_spec)}
    summary = (run_profile if settings.profile else run_maps)(settings, model, items, output, extra, on_event)
    summary.output, summary.notes = output, [*notes, *summary.notes]
    return summary


@dataclass
class LoadedModel:
    """The pipeline of a run, with its name, device, dtype, working size and schedule length."""

    pipe: Any
    name: str
    device: Any
    dtype: Any
    size: int
    num_timesteps: int


def load_model(settings: SsmSettings, pipe: Any = None) -> LoadedModel:
    """Load ``settings.model`` (or take ``pipe``), add the TI embedding and the new tokens."""
    from .. import diffusion, ssm
    from ..device import resolve_device, resolve_dtype
    from ..models import check_available, default_model, load_pipeline, native_resolution

    name = settings.model or default_model()
    if pipe is None:
        device = resolve_device(settings.device)
        dtype = resolve_dtype(settings.dtype, device)
        check_available(name)
        pipe = load_pipeline(name, device, dtype, trust_pickle=settings.trust_pickle)
    else:
        device, dtype = pipe.unet.device, pipe.unet.dtype
    if settings.embedding is not None:
        ssm.load_embedding(pipe, settings.embedding, settings.token[0])
    for word in settings.token:
        ssm.ensure_token(pipe, word, settings.init_word)
    size = int(settings.resolution or native_resolution(pipe))
    return LoadedModel(pipe, name, device, dtype, size, diffusion.num_train_timesteps(pipe.scheduler))


# ------------------------------------------------------------------------------------------------------ maps
def run_maps(settings: SsmSettings, model: LoadedModel, items: Sequence[Any], output: Path, extra: dict[str, Any],
             on_event: Event) -> RunSummary:
    """SSM maps of every image (resume, rejections, records); see :class:`Mapper`."""
    from ..manifest import Manifest
    from ..models import model_info

    steps = schedule_timesteps(settings, model.num_timesteps)
    manifest = Manifest(output, "ssm", map_params(settings, model.name, steps, model.size), seed=settings.seed,
                        model=model_info(model.name).as_dict(), extra=extra)
    manifest.start_run()
    summary = Mapper(settings, model, steps, output, manifest, on_event).run(items)
    manifest.close()
    return attach_records(summary, output)


class Mapper:
    """The maps run's per-file loop: skip what is done, reject what cannot be read or written, compute the maps of
    the rest, write ``<name>.npy`` and ``<name>.png`` and record them."""

    def __init__(self, settings: SsmSettings, model: LoadedModel, steps: list[int], output: Path, manifest: Any,
                 on_event: Event):
        from .. import ssm

        self.settings, self.model, self.steps = settings, model, steps
        self.output, self.manifest, self.on_event = output, manifest, on_event
        pipe = model.pipe
        self.ids = ssm.prompt_ids(pipe, settings.prompt)
        groups = ([(word, ssm.token_positions(pipe, self.ids, word)) for word in settings.token] if settings.token
                  else ssm.prompt_words(pipe, self.ids))
        self.labels, self.positions = [group[0] for group in groups], [group[1] for group in groups]
        self.summary = RunSummary()
        self.png_skipped = False

    def run(self, items: Sequence[Any]) -> RunSummary:
        from ..extras import PLOT_SKIPPED

        self.on_event("start", "ssm", {"total": len(items)})
        for item in items:
            self.map_one(item)
        if self.png_skipped:
            self.summary.notes.append(PLOT_SKIPPED)
            self.on_event("note", "", {"message": PLOT_SKIPPED})
        return self.summary

    def map_one(self, item: Any) -> None:
        from ..io import file_sha256

        rel = item.output_rel.as_posix()
        if item.clash_with is not None:
            self.reject(item, f"its output name {rel} is already taken by {item.clash_with}; rename one of them")
            return
        try:
            digest = file_sha256(item.path)
            png, npy = self.targets(item)
        except OSError as exc:
            self.reject(item, f"cannot read file ({exc.strerror or exc})")
            return
        except RejectedInput as exc:
            self.reject(item, str(exc))
            return
        if not self.settings.overwrite and self.manifest.is_done(rel, digest, npy):
            self.summary.skipped.append(rel)
            self.on_event("skip", rel, {})
            return
        started = time.perf_counter()
        try:
            image = self.working_image(item)
        except RejectedInput as exc:
            self.reject(item, str(exc))
            return
        maps = self.maps_of(item, image)
        stats = self.stats(item, maps)
        self.write(item, digest, image, maps, stats, png, npy, time.perf_counter() - started)

    def targets(self, item: Any) -> tuple[Path, Path]:
        """``OUT/<name>.png`` and ``.npy``: never through a symlink inside OUTPUT, never over a file cloak did not
        write."""
        from ..io import output_path

        png = output_path(self.output, item.output_rel)
        npy = output_path(self.output, item.output_rel.with_suffix(".npy"))
        if (png.exists() or npy.exists()) and not self.manifest.owns(item.output_rel.as_posix()):
            raise RejectedInput(f"{png} or {npy.name} exists and was not written by cloak; move it away")
        return png, npy

    def working_image(self, item: Any) -> Any:
        from ..io import DEFAULT_MAX_PIXELS, read_image

        return to_square(read_image(item.path, self.settings.max_pixels or DEFAULT_MAX_PIXELS).rgb, self.model.size)

    def maps_of(self, item: Any, image: Any) -> Any:
        """``(T, N, h, w)`` maps of one image, every draw from ``(seed, its relative name)``."""
        import torch

        from .. import diffusion, ssm
        from ..io import item_seed

        pipe = self.model.pipe
        generator = torch.Generator().manual_seed(item_seed(self.settings.seed, item.rel))
        with torch.no_grad():
            latents = diffusion.encode_images(pipe.vae, image[None].to(pipe.unet.device, pipe.vae.dtype)).float()
        return ssm.semantic_sensitivity(pipe, latents, self.ids, self.positions, self.steps, self.settings.samples,
                                        generator, batch_timesteps=self.settings.batch_size)

    def stats(self, item: Any, maps: Any) -> dict[str, Any]:
        """The record's stats: tokens, positions, timesteps, per-map means and, with a mask of the same name, R."""
        from .. import diffusion, ssm

        stats: dict[str, Any] = {"tokens": self.labels, "positions": self.positions, "timesteps": list(self.steps),
                                 "mean": maps.mean((-2, -1)).tolist()}
        masks = self.settings.masks
        mask_file = find_twin(masks, item.rel) if masks else None
        if masks and mask_file is None:
            self.on_event("warn", item.output_rel.as_posix(),
                          {"message": f"no mask named {item.rel.stem}.* in {masks}: R not computed"})
        if mask_file is not None:
            latent_mask = diffusion.latent_mask(square_mask(mask_file, self.model.size), tuple(maps.shape[-2:]))[0, 0]
            ratio = ssm.sensitivity_ratio(maps, latent_mask)
            stats["R"] = [[None if math.isnan(value) else value for value in row] for row in ratio.tolist()]
            stats["mask"] = str(mask_file)
        return stats

    def write(self, item: Any, digest: str, image: Any, maps: Any, stats: dict[str, Any], png: Path, npy: Path,
              seconds: float) -> None:
        import io

        import numpy as np

        from ..io import atomic_write_bytes

        rel = item.output_rel.as_posix()
        buffer = io.BytesIO()
        np.save(buffer, maps.numpy())
        self.manifest.record(rel, source=str(item.path), output=None, status="writing", owned=True)
        atomic_write_bytes(npy, buffer.getvalue())
        drawn = ssm_grid(image, maps, self.labels, self.steps, png)
        self.png_skipped |= not drawn
        seconds = round(seconds, 3)
        self.manifest.record(rel, source=str(item.path), source_sha256=digest,
                             output=rel if drawn else item.output_rel.with_suffix(".npy").as_posix(), status="done",
                             owned=True, seconds=seconds, stats=stats)
        self.summary.done.append(rel)
        self.on_event("done", rel, {"seconds": seconds})

    def reject(self, item: Any, reason: str) -> None:
        rel = item.output_rel.as_posix()
        self.summary.rejected.append((str(item.path), reason))
        if item.clash_with is not None:
            self.manifest.clash(str(item.path), output=None, status="rejected", error=reason)
        else:
            self.manifest.record(rel, source=str(item.path), status="rejected", error=reason)
        self.on_event("reject", str(item.path), {"reason": reason})


# -------------------------------------------------------------------------------------------------- profiles
@dataclass
class ProfileInputs:
    """What every profile works on: the readable images at their own size (``native``: ``images`` and, with
    ``clean``, their clean twins) and at the working resolution (``square``), the timesteps and the run's one
    generator."""

    settings: SsmSettings
    pipe: Any
    loaded: list[tuple[Any, Any]]
    native: dict[str, list[Any]]
    square: dict[str, list[Any]]
    timesteps: list[int]
    generator: Any
    size: int


def run_profile(settings: SsmSettings, model: LoadedModel, items: Sequence[Any], output: Path,
                extra: dict[str, Any], on_event: Event) -> RunSummary:
    """One ``profile`` analysis over the readable images → ``OUT/profile-<name>.json`` and ``.png``."""
    import torch

    from ..extras import PLOT_SKIPPED
    from ..io import atomic_write_bytes
    from ..manifest import Manifest
    from ..models import model_info

    name = settings.profile
    loaded, rejected = load_images(items, settings.max_pixels)
    if not loaded:
        raise CloakError("no readable images to profile")
    timesteps = schedule_timesteps(settings, model.num_timesteps)
    manifest = Manifest(output, "ssm", profile_params(settings, model.name, timesteps, model.size),
                        seed=settings.seed, model=model_info(model.name).as_dict(), extra=extra)
    manifest.start_run()
    native = {"images": [image for _, image in loaded]}
    if settings.clean is not None:
        native["clean"] = clean_twins(loaded, settings.clean, settings.max_pixels)
    # the model sees the working resolution; histograms and JPEG see the images' own pixels
    square = {key: [to_square(image, model.size) for image in group] for key, group in native.items()}
    inputs = ProfileInputs(settings, model.pipe, loaded, native, square, timesteps,
                           torch.Generator().manual_seed(settings.seed), model.size)
    data: dict[str, Any] = {"profile": name, "images": [item.rel.as_posix() for item, _ in loaded],
                            "rejected": [(item.rel.as_posix(), reason) for item, reason in rejected],
                            "timesteps": timesteps, "samples": settings.samples, "prompt": settings.prompt}
    png, json_path = output / f"profile-{name}.png", output / f"profile-{name}.json"
    found, drawn = PROFILE_RUNS[name](inputs, png)
    data.update(found)
    atomic_write_bytes(json_path, json.dumps(data, indent=2).encode() + b"\n")
    written = [json_path.name] + ([png.name] if drawn else [])
    manifest.update(**{f"profile_{name}": {"outputs": [str(output / file) for file in written],
                                           "images": data["images"], "rejected": data["rejected"]}})
    manifest.close()
    summary = RunSummary(done=written, rejected=[(str(item.path), reason) for item, reason in rejected])
    for item, reason in rejected:
        on_event("reject", str(item.path), {"reason": reason})
    if not drawn:
        summary.notes.append(PLOT_SKIPPED)
        on_event("note", "", {"message": PLOT_SKIPPED})
    on_event("note", "", {"message": f"profile {name} over {len(loaded)} image(s) → {output / written[-1]}"})
    return summary


def load_images(items: Sequence[Any], max_pixels: int | None) -> tuple[list[tuple[Any, Any]], list[tuple[Any, str]]]:
    """Decoded images at their own size (pixel statistics and JPEG must see the real pixels), and the rejected."""
    from ..io import DEFAULT_MAX_PIXELS, read_image

    loaded, rejected = [], []
    for item in items:
        try:
            loaded.append((item, read_image(item.path, max_pixels or DEFAULT_MAX_PIXELS).rgb))
        except RejectedInput as exc:
            rejected.append((item, str(exc)))
    return loaded, rejected


def clean_twins(loaded: Sequence[tuple[Any, Any]], clean: Path, max_pixels: int | None) -> list[Any]:
    """The clean image named like each loaded one (a missing or unreadable twin is a usage error)."""
    from ..io import DEFAULT_MAX_PIXELS, read_image

    twins = []
    for item, _ in loaded:
        path = find_twin(clean, item.rel)
        if path is None:
            raise UsageError(f"--clean {clean}: no clean image named {item.rel.stem}.* for {item.rel}")
        try:
            twins.append(read_image(path, max_pixels or DEFAULT_MAX_PIXELS).rgb)
        except RejectedInput as exc:
            raise UsageError(f"--clean {path}: {exc}") from None
    return twins


def loss_profile(inputs: ProfileInputs, png: Path) -> tuple[dict[str, Any], bool]:
    """Fig. 4 (``loss``): denoising loss per timestep; Fig. 6 (``mask-loss``): inside vs outside the mask."""
    from .. import diffusion, ssm

    settings, pipe = inputs.settings, inputs.pipe
    context = diffusion.encode_prompts(pipe, [settings.prompt]).float()
    mask = profile_masks(inputs) if settings.profile == "mask-loss" else None
    series = {}
    for name, group in inputs.square.items():
        latents = latents_of(pipe, group)
        latent_mask = (diffusion.latent_mask(mask, tuple(latents.shape[-2:])).to(latents.device)
                       if mask is not None else None)
        values = ssm.loss_profile(pipe, latents, context, inputs.timesteps, settings.samples, inputs.generator,
                                  latent_mask)
        for key in ("inside", "outside") if mask is not None else ("loss",):
            series[name if key == "loss" else f"{name} {key}"] = ssm.summarize(values[key])
    title = ("loss per timestep (median, 50% and 95% bands)" if mask is None
             else "loss inside vs outside the mask")
    return {"series": series}, band_plot(series, inputs.timesteps, "denoising loss", png, title)


def profile_masks(inputs: ProfileInputs) -> Any:
    """The masks named like the images, ``(B, 1, size, size)`` at the working resolution."""
    import torch

    masks = inputs.settings.masks
    found = []
    for item, _ in inputs.loaded:
        path = find_twin(masks, item.rel)
        if path is None:
            raise UsageError(f"--masks {masks}: no mask named {item.rel.stem}.* for {item.rel}")
        found.append(square_mask(path, inputs.size))
    return torch.cat(found)


def gradient_profile(inputs: ProfileInputs, png: Path) -> tuple[dict[str, Any], bool]:
    """Fig. 5: ‖∂L/∂e‖₂ of the first ``token``'s input embedding per timestep."""
    from .. import ssm

    settings, pipe = inputs.settings, inputs.pipe
    token = settings.token[0]
    ids = ssm.prompt_ids(pipe, settings.prompt)
    positions = ssm.token_positions(pipe, ids, token)
    series = {name: ssm.summarize(ssm.gradient_profile(pipe, latents_of(pipe, group), ids, positions,
                                                       inputs.timesteps, settings.samples, inputs.generator))
              for name, group in inputs.square.items()}
    drawn = band_plot(series, inputs.timesteps, "‖∂L/∂e‖₂", png, f"embedding-gradient magnitude of {token}")
    return {"series": series, "token": token}, drawn


def jpeg_histogram(inputs: ProfileInputs, png: Path) -> tuple[dict[str, Any], bool]:
    """Fig. 7/12: perturbation histograms before and after JPEG at the images' own size."""
    from .. import ssm

    quality = inputs.settings.quality
    histogram = ssm.perturbation_histogram(inputs.native["clean"], inputs.native["images"], quality)
    return {"histogram": histogram}, histogram_plot(histogram, quality, png)


def spectrum_profile(inputs: ProfileInputs, png: Path) -> tuple[dict[str, Any], bool]:
    """Fig. 13: radially averaged latent power spectra with and without JPEG (JPEG first, then the resize)."""
    from .. import ssm
    from ..purify.jpeg import compress

    quality, size = inputs.settings.quality, inputs.size
    curves = {}
    for name, group in inputs.native.items():
        jpeg = [to_square(compress(image[None], quality)[0], size) for image in group]
        for label, variant in ((name, inputs.square[name]), (f"{name} + JPEG q{quality}", jpeg)):
            curves[label] = ssm.radial_power_spectrum(latents_of(inputs.pipe, variant).cpu()).tolist()
    return {"spectra": curves}, spectrum_plot(curves, png)


PROFILE_RUNS = {"loss": loss_profile, "mask-loss": loss_profile, "grad": gradient_profile,
                "jpeg-hist": jpeg_histogram, "spectrum": spectrum_profile}


def latents_of(pipe: Any, images: Sequence[Any]) -> Any:
    """VAE posterior-mean latents of same-size images, 8 at a time."""
    import torch

    from .. import diffusion

    with torch.no_grad():
        batch = torch.stack(list(images)).to(pipe.unet.device, pipe.vae.dtype)
        return torch.cat([diffusion.encode_images(pipe.vae, chunk).float() for chunk in batch.split(8)])


# ------------------------------------------------------------------------------------------- training logs
def run_train_logs(settings: SsmSettings, given: Sequence[str], output: Path, on_event: Event) -> RunSummary:
    """Fig. 6 from training logs: ``loss_inside`` / ``loss_outside`` of ``train_log.jsonl`` files (``cloak
    train-ti --masks``) against the step, each also divided by its first value (the paper compares the proportions
    by which the two losses fall). Each log is labelled by its folder name."""
    from ..extras import PLOT_SKIPPED
    from ..io import atomic_write_bytes, check_output_location
    from ..manifest import Manifest

    paths = [Path(name) for name in given]
    check_output_location(given, output)
    series = {path.resolve().parent.name: read_train_log(path) for path in paths}
    manifest = Manifest(output, "ssm", {"profile": "mask-loss", "source": "train-logs"}, seed=settings.seed)
    manifest.start_run()
    png, json_path = output / "profile-mask-loss.png", output / "profile-mask-loss.json"
    drawn = train_log_plot(series, png)
    data = {"profile": "mask-loss", "source": "train-logs", "logs": [str(path) for path in paths], "series": series}
    atomic_write_bytes(json_path, json.dumps(data, indent=2).encode() + b"\n")
    written = [json_path.name] + ([png.name] if drawn else [])
    manifest.update(profile_mask_loss={"outputs": [str(output / file) for file in written], "logs": data["logs"]})
    manifest.close()
    summary = RunSummary(done=written, output=output)
    if not drawn:
        summary.notes.append(PLOT_SKIPPED)
        on_event("note", "", {"message": PLOT_SKIPPED})
    on_event("note", "", {"message": f"profile mask-loss from {len(paths)} training log(s) → {output / written[-1]}"})
    return summary


def read_train_log(path: Path) -> dict[str, list[float]]:
    """One ``train_log.jsonl``: steps, inside/outside losses and both relative to their first value."""
    if not path.is_file():
        raise UsageError(f"training log not found: {path}")
    steps, inside, outside = [], [], []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise UsageError(f"{path}:{number}: not a JSON line") from None
        if "loss_inside" in record and "loss_outside" in record:
            steps.append(int(record["step"]))
            inside.append(float(record["loss_inside"]))
            outside.append(float(record["loss_outside"]))
    if not steps:
        raise UsageError(f"{path}: no loss_inside/loss_outside fields (train with --masks to log them)")
    return {"step": steps, "inside": inside, "outside": outside,
            "inside_relative": [v / inside[0] if inside[0] else float("nan") for v in inside],
            "outside_relative": [v / outside[0] if outside[0] else float("nan") for v in outside]}
