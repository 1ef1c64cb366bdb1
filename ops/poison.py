"""The ``cloak poison`` folder run: working resolution, attack, map back to native, exact budget, stats, previews.

For every photo (oriented, as :func:`ops.io.read_image` decodes it):

1. the working resolution — short side ``resolution`` (512), aspect kept, both sides multiples of 8
   (``resolution=0``: the native size rounded to multiples of 8);
2. single-image attacks on a photo larger than that (both sides), by default (``native=True``): optimize ``δ`` in
   the photo's own pixels, the model seeing each photo through a random draw of a mimic's resize to the working
   size (:class:`ops.attacks.resample.NativeView`: PIL-exact bicubic / bilinear / Lanczos / box, whole photo or a
   random crop), in batches of same-sized photos; ``lf-*`` (a DCT low-pass defined on the working grid) and ``da``
   (an L2 budget defined at the working size) keep step 3's path;
3. otherwise (``native=False``, set-level attacks, photos not larger than the working size): resize to the working
   size — bicubic, antialiased when shrinking — run the attack there (single-image attacks in same-size batches;
   set-level attacks on the whole folder at once), map ``δ = x' − x`` back to the native size (bicubic) and add it
   to the native photo; grayscale photos get a gray perturbation (they are stored as the channel mean);
4. zero ``δ`` outside ``--mask`` and project in integer space: ``|q(x') − q(x)| ≤ ⌊ε⌋`` per stored sample (``ε`` in /255 units;
   16-bit images use ``ε·257``), so the PNG on disk holds the budget exactly — not ε+1 as Mist admits;
5. write the PNG in the input's mode with its alpha and ICC profile (:func:`ops.io.write_image`), re-read it and
   verify the budget on the bytes; record loss start/end, L∞ (/255), L2 ([0,1] units), PSNR, SSIM vs the input;
6. with ``preview``: ``OUTPUT/previews/<name>.png`` — original | cloaked | difference amplified so ±ε spans black
   to white.
"""

from __future__ import annotations

import math
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import attacks
from .attacks import engine, robust
from .attacks.resample import NativeView
from .errors import CloakError, RejectedInput, UsageError
from .io import InputItem, LoadedImage, atomic_write_bytes, collect_inputs, output_path, quantize, read_back, \
    read_image, safe_join
from .manifest import Manifest
from .metrics.basic import psnr, ssim
from .runner import ImageJob, ProcessedImage, RunSummary, process_folder
from .validate import check_aspect

MODEL_PARAMS = ("prompt",)  # configure AttackModels, not the attack function (t_range goes to both)
WORKING_SIZE_ONLY = ("da",)  # budgets/transforms defined on the working grid: never optimized at native size


def native_applies(spec: Any, native_shape: Sequence[int], work_shape: Sequence[int]) -> bool:
    """Whether a photo is optimized at its own size: single-image attack, not ``lf-*``/``da``, photo larger than the
    working size on both sides."""
    return (not spec.set_level and spec.base is None and spec.name not in WORKING_SIZE_ONLY
            and native_shape[0] > work_shape[0] and native_shape[1] > work_shape[1])


# ------------------------------------------------------------------------------------------- geometry
def working_size(height: int, width: int, resolution: int) -> tuple[int, int]:
    """``(h, w)`` with the short side ≈ ``resolution``, aspect kept, both multiples of 8 (≥ 8)."""
    scale = 1.0 if resolution <= 0 else resolution / min(height, width)
    return (max(8, int(height * scale / 8 + 0.5) * 8), max(8, int(width * scale / 8 + 0.5) * 8))


def resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic resize of ``(B, C, H, W)`` (antialiased when shrinking); identity when the size matches."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    shrinking = size[0] < images.shape[-2] or size[1] < images.shape[-1]
    return F.interpolate(images, size=size, mode="bicubic", align_corners=False, antialias=shrinking)


def to_native(adversarial: torch.Tensor, clean_working: torch.Tensor, clean_native: torch.Tensor,
              mask_native: torch.Tensor | None = None) -> torch.Tensor:
    """Map a working-resolution result back: native + resized perturbation, zeroed outside the mask, in [0, 1]."""
    delta = resize((adversarial - clean_working)[None].float(), tuple(clean_native.shape[-2:]))[0]
    if mask_native is not None:
        delta = delta * mask_native
    return (clean_native + delta).clamp(0, 1)


def project_stored(rgb: torch.Tensor, like: LoadedImage, eps: float) -> torch.Tensor:
    """``rgb`` ``(3, H, W)`` moved so that its quantization differs from the input's by at most ⌊ε⌋ levels.

    Works on the integer values :func:`ops.io.quantize` will store (8 or 16 bit), so the budget holds on the PNG.
    """
    scale = like.max_value
    levels = math.floor(eps * scale / 255 + 1e-9)
    clean = torch.from_numpy(np.rint(like.rgb.double().numpy() * scale))
    stored = torch.round(rgb.double().cpu().clamp(0, 1) * scale)
    stored = torch.minimum(torch.maximum(stored, clean - levels), clean + levels).clamp(0, scale)
    return (stored / scale).float()


# ---------------------------------------------------------------------------------------------- inputs
def load_masks(mask: str | None, items: Sequence[InputItem]) -> dict[str, Path] | None:
    """``--mask``: one mask file for every input, or a folder with ``<name>.png`` per input (``cloak mask``
    output). Returns rel → mask path; a missing mask is a usage error naming the file."""
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


def native_mask(path: Path, size: tuple[int, int]) -> torch.Tensor:
    """Binary ``(1, H, W)`` mask (white = perturb) at the photo's ``(H, W)`` (nearest if the sizes differ)."""
    from .masks import read_mask

    mask = torch.from_numpy(read_mask(path).astype(np.float32))[None, None]
    if tuple(mask.shape[-2:]) != tuple(size):
        mask = F.interpolate(mask, size=size, mode="nearest")
    return mask[0]


def working_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Working-resolution mask: a cell is free if any of its native pixels is (the native mask cuts the rest)."""
    return (F.interpolate(mask[None], size=size, mode="area")[0] > 0).float()


def load_clean_set(clean_dir: str | None, resolution: int) -> list[torch.Tensor] | None:
    """``--clean-dir``: set A of the set-level attacks, each image at its working resolution."""
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


# --------------------------------------------------------------------------------------------- preview
def contact_sheet(original: np.ndarray, cloaked: np.ndarray, eps: float, max_value: int) -> np.ndarray:
    """``original | cloaked | amplified difference`` as uint8 RGB ``(H, 3W + 16, 3)``; ±ε spans black→white."""
    a = original[..., :3].astype(np.float64) / max_value
    b = cloaked[..., :3].astype(np.float64) / max_value
    if a.shape[2] == 1:
        a, b = np.repeat(a, 3, 2), np.repeat(b, 3, 2)
    difference = np.clip(0.5 + (b - a) * (0.5 * 255 / max(eps, 1e-6)), 0, 1)
    gap = np.ones((a.shape[0], 8, 3))
    return np.rint(np.concatenate([a, gap, b, gap, difference], axis=1) * 255).astype(np.uint8)


def write_preview(path: Path, original: np.ndarray, cloaked: np.ndarray, eps: float, max_value: int) -> None:
    import io

    from PIL import Image

    sheet = Image.fromarray(contact_sheet(original, cloaked, eps, max_value))
    if sheet.height > 512:
        sheet = sheet.resize((round(sheet.width * 512 / sheet.height), 512), Image.LANCZOS)
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


# ------------------------------------------------------------------------------------------------- run
def poison_folder(items: Sequence[InputItem], out_dir: Path, attack: str, params: dict[str, Any], *,
                  pipe: Any = None, load_pipe: Callable[[], Any] | None = None, manifest: Manifest,
                  seed: int = 0, batch_size: int | None = None, overwrite: bool = False,
                  max_pixels: int | None = None, resolution: int = 512, robust_transforms: Sequence[str] = (),
                  eot_samples: int = 1, jpeg_quality: int | None = None, mask: str | None = None,
                  clean_dir: str | None = None, preview: bool = False, checkpointing: bool = False,
                  eval_draws: int = 4, native: bool = True, native_crops: float = 0.0,
                  on_event: Callable[[str, str, dict], None] | None = None,
                  progress: Callable[[str], None] | None = None) -> RunSummary:
    """Poison every item with ``attack`` (``params`` already resolved against its spec) into ``out_dir``.

    ``pipe`` is the loaded diffusers pipeline, or ``load_pipe()`` loads it when the first image needs work (a
    resumed run with nothing left to do loads no model); ``eval_draws`` fixed (t, ε) draws measure loss_start/loss_end
    (0: not measured, recorded as null). ``native``: optimize single-image attacks at the photo's own size through
    the mimic's resize (see the module docstring); ``False`` is the working-size-and-upsample path; ``native_crops``:
    the share of the view's draws that are random crops (``NativeView.crop_probability``).
    ``batch_size``: images per batch for single-image attacks (``None``: 1), the PGD minibatch of set-level attacks
    (``None``: all same-sized images at once, as Anti-DreamBooth).
    """
    spec = attacks.get_attack(attack)
    module = spec.load()
    params = dict(params)
    t_range = tuple(params["t_range"]) if params.get("t_range") else None
    prompt = params.pop("prompt", None) or params.get("instance_prompt") or "a photo"
    state: dict[str, engine.AttackModels] = {}

    def get_models() -> engine.AttackModels:
        if "models" not in state:
            loaded = pipe if pipe is not None else load_pipe()  # type: ignore[misc]
            state["models"] = engine.AttackModels(loaded, prompt=prompt, t_range=t_range,
                                                  checkpointing=checkpointing)
        return state["models"]

    if "t_range" in params:
        params["t_range"] = t_range
        if not spec.set_level:
            params.pop("t_range")
    eps = float(params["eps"])
    eot = robust.make_eot(robust_transforms, jpeg_quality)
    options: dict[str, Any] = {"eot": eot, "eot_samples": eot_samples} if eot is not None else {}
    masks = load_masks(mask, items)

    def prepare(job: ImageJob, at_native: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """``(image the attack runs on, native mask, mask at that image's size)``."""
        native_rgb = job.image.rgb
        m_native = native_mask(masks[job.item.rel.as_posix()], tuple(native_rgb.shape[1:])) if masks else None
        if at_native:
            return native_rgb.float(), m_native, m_native
        size = working_size(native_rgb.shape[1], native_rgb.shape[2], resolution)
        work = resize(native_rgb[None], size)[0].clamp(0, 1)
        m_work = working_mask(m_native, size) if m_native is not None else None
        return work, m_native, m_work

    def at_native(job: ImageJob) -> bool:
        shape = job.image.rgb.shape[1:]
        return native and native_applies(spec, shape, working_size(shape[0], shape[1], resolution))

    def finish(job: ImageJob, adversarial: torch.Tensor, work: torch.Tensor, m_native: torch.Tensor | None,
               result: engine.PGDResult, index: int) -> ProcessedImage:
        rgb = to_native(adversarial.float().cpu(), work.cpu(), job.image.rgb, m_native)
        rgb = project_stored(rgb, job.image, eps)
        start, end = float(result.loss_start[index]), float(result.loss_end[index])
        shape = job.image.rgb.shape[1:]
        size = working_size(shape[0], shape[1], resolution)
        stats = {"loss_start": None if math.isnan(start) else start, "loss_end": None if math.isnan(end) else end,
                 "working_size": [int(size[1]), int(size[0])],
                 "optimized_at": "native" if tuple(work.shape[-2:]) == tuple(shape) and tuple(size) != tuple(shape)
                 else "working"}
        stats.update({k: v for k, v in result.stats.items() if isinstance(v, (int, float, str))})
        return ProcessedImage(rgb, stats)

    report = on_event or (lambda *a: None)

    def step_callback(jobs: list[ImageJob]) -> Callable[[int, int], None]:
        name = ", ".join(job.item.rel.as_posix() for job in jobs[:2]) + (" …" if len(jobs) > 2 else "")
        return lambda step, total: report("step", name, {"step": step, "total": total})

    def process_single(jobs: list[ImageJob]) -> list[ProcessedImage]:
        with engine.step_hook(step_callback(jobs)):
            return _process_single(jobs)

    def _process_single(jobs: list[ImageJob]) -> list[ProcessedImage]:
        models = get_models()
        device = models.device
        natives = [at_native(job) for job in jobs]
        prepared = [prepare(job, flag) for job, flag in zip(jobs, natives)]
        groups: dict[tuple[bool, tuple[int, int]], list[int]] = {}
        for index, (work, _, _) in enumerate(prepared):
            groups.setdefault((natives[index], tuple(work.shape[-2:])), []).append(index)
        out: list[ProcessedImage | None] = [None] * len(jobs)
        for (on_native, shape), indices in groups.items():
            images = torch.stack([prepared[i][0] for i in indices]).to(device)
            generators = [torch.Generator().manual_seed(jobs[i].seed) for i in indices]
            size = working_size(shape[0], shape[1], resolution) if on_native else shape
            # the view's own stream (for encodes given no generators), seeded from each image's seed
            models.view = NativeView(size, crop_probability=native_crops, generators=[torch.Generator().manual_seed(
                (jobs[i].seed * 1000003 + 7) % 2**63) for i in indices]) if on_native else None
            extra = {**options, "eval_draws": eval_draws}
            if masks:
                extra["mask"] = torch.stack([prepared[i][2] for i in indices]).to(device)
            if spec.needs_target:
                from .attacks.ea import make_target

                extra["targets"] = make_target(params["target"], *size)[None].expand(len(indices), -1, -1, -1)
            gray = torch.tensor([jobs[i].image.gray for i in indices], device=device).view(-1, 1, 1, 1)
            if bool(gray.any()):  # grayscale photos are stored as the channel mean: optimize a gray δ
                extra["delta_transform"] = lambda delta, gray=gray: torch.where(gray, delta.mean(1, keepdim=True)
                                                                                .expand_as(delta), delta)
            call = {k: v for k, v in params.items() if k != "target"}
            try:
                result = module.attack(images, models=models, generators=generators, **spec.fixed, **call, **extra)
            finally:
                models.view = None
            for position, i in enumerate(indices):
                out[i] = finish(jobs[i], result.images[position], prepared[i][0], prepared[i][1], result, position)
        return out  # type: ignore[return-value]

    def process_set(jobs: list[ImageJob]) -> list[ProcessedImage]:
        with engine.step_hook(lambda step, total: report("step", "", {"step": step, "total": total})):
            return _process_set(jobs)

    def _process_set(jobs: list[ImageJob]) -> list[ProcessedImage]:
        models = get_models()
        prepared = [prepare(job) for job in jobs]
        generators = [torch.Generator().manual_seed(job.seed) for job in jobs]
        extra = dict(options)
        if masks:
            extra["masks"] = [p[2] for p in prepared]
        results = module.attack_set([p[0] for p in prepared], models=models, generators=generators,
                                    clean_images=load_clean_set(clean_dir, resolution), progress=progress,
                                    batch_size=batch_size, **spec.fixed, **params, **extra)  # None: whole set
        return [finish(job, r.images[0], p[0], p[1], r, 0) for job, p, r in zip(jobs, prepared, results)]

    def verify(job: ImageJob, stored: np.ndarray) -> dict[str, Any]:
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

    kwargs = {"max_pixels": max_pixels} if max_pixels else {}
    return process_folder(items, out_dir, manifest, process_set if spec.set_level else process_single, seed=seed,
                          batch_size=max(1, len(items)) if spec.set_level else (batch_size or 1),
                          overwrite=overwrite, min_size=8, verify=verify, on_event=on_event or (lambda *a: None),
                          accept=(lambda image: check_aspect(*image.size)) if resolution > 0 else None, **kwargs)
