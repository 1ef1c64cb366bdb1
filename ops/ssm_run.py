"""``cloak ssm`` runs: SSM maps for a folder (arrays, grids, JSON, R with masks) and the ``--profile`` analyses,
each writing a matplotlib PNG and its data as JSON. The math lives in :mod:`ops.ssm`.

matplotlib is the optional extra ``plot``: without it the arrays and JSON are written and the PNGs skipped
(``summary["png_skipped"]`` / ``data["png_skipped"]`` say so; the CLI prints one line)."""

from __future__ import annotations

import io
import json
import math
import time
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from . import diffusion, ssm
from .errors import CloakError, RejectedInput, UsageError
from .io import DEFAULT_MAX_PIXELS, InputItem, atomic_write_bytes, file_sha256, item_seed, output_path, read_image, \
    safe_join
from .manifest import Manifest
from .validate import check_aspect

PROFILES = ("loss", "grad", "mask-loss", "jpeg-hist", "spectrum")
Event = Callable[[str, str, dict], None]


def working_resolution(pipe, resolution: int | None) -> int:
    """``--resolution``, or the model's own size (:func:`ops.models.native_resolution`)."""
    from .models import native_resolution

    return int(resolution or native_resolution(pipe))


def to_square(image: torch.Tensor, size: int, mode: str = "bicubic") -> torch.Tensor:
    """``(C, H, W)`` → short side ``size`` then centre crop ``size²`` (the working resolution)."""
    height, width = image.shape[-2:]
    check_aspect(width, height)
    scale = size / min(height, width)
    shape = (max(size, round(height * scale)), max(size, round(width * scale)))
    kwargs = {"antialias": True, "align_corners": False} if mode in ("bicubic", "bilinear") else {}
    resized = F.interpolate(image[None].float(), size=shape, mode=mode, **kwargs)[0]
    top, left = (shape[0] - size) // 2, (shape[1] - size) // 2
    return resized[:, top:top + size, left:left + size].clamp(0, 1)


def find_twin(folder: Path, rel: PurePosixPath) -> Path | None:
    """The file under ``folder`` with the same relative path up to the extension (a mask or a clean image)."""
    parent = safe_join(folder, rel.parent.as_posix()) if rel.parent.as_posix() != "." else folder
    if not parent.is_dir():
        return None
    matches = sorted(p for p in parent.iterdir() if p.is_file() and p.stem == rel.stem and not p.name.startswith("."))
    return matches[0] if matches else None


def read_mask(path: Path, size: int) -> torch.Tensor:
    """A mask file → ``(1, 1, size, size)`` in [0, 1] (same resize/crop as the image)."""
    with Image.open(path) as image:
        array = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    return to_square(torch.from_numpy(array)[None], size, "bilinear")[None]


def _figure():
    """pyplot on Agg, or None without the ``plot`` extra (the caller then skips its PNG)."""
    from .extras import pyplot

    return pyplot()


def _save_figure(figure, path: Path) -> None:
    plt = _figure()
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())


def ssm_grid(image: torch.Tensor, maps: torch.Tensor, tokens: Sequence[str], timesteps: Sequence[int],
             path: Path) -> bool:
    """Paper 000 Fig. 3 layout: the input, then one column per timestep; one row per token (shared colour scale).
    False (nothing written) without matplotlib."""
    plt = _figure()
    if plt is None:
        return False
    rows, cols = len(tokens), len(timesteps) + 1
    figure, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.6 * rows), squeeze=False)
    top = float(maps.max()) or 1.0
    size = image.shape[-2:]
    for r, token in enumerate(tokens):
        axes[r][0].imshow(image.permute(1, 2, 0).numpy())
        axes[r][0].set_ylabel(token, fontsize=8)
        for c, t in enumerate(timesteps, start=1):
            shown = F.interpolate(maps[c - 1, r][None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
            axes[r][c].imshow(shown.numpy(), cmap="inferno", vmin=0, vmax=top)
            if r == 0:
                axes[r][c].set_title(f"t={t}", fontsize=8)
        if r == 0:
            axes[r][0].set_title("input", fontsize=8)
    for axis in axes.flat:
        axis.set_xticks([])
        axis.set_yticks([])
    _save_figure(figure, path)
    return True


def run_maps(pipe, items: Sequence[InputItem], output: Path, manifest: Manifest, *, prompt: str,
             tokens: Sequence[str], timesteps: Sequence[int], samples: int, seed: int, resolution: int,
             masks: Path | None = None, overwrite: bool = False, max_pixels: int | None = None,
             batch_timesteps: int = 4, on_event: Event = lambda *a: None) -> dict[str, Any]:
    """SSM maps of every image: ``OUT/<name>.npy`` ``(T, N, h, w)``, ``OUT/<name>.png`` grid, and a record with
    per-map means (and ``R`` per map when ``masks`` holds a mask of the same name). Returns a summary."""
    device = pipe.unet.device
    ids = ssm.prompt_ids(pipe, prompt)
    groups = ([(word, ssm.token_positions(pipe, ids, word)) for word in tokens] if tokens
              else ssm.prompt_words(pipe, ids))
    labels, positions = [g[0] for g in groups], [g[1] for g in groups]
    summary: dict[str, Any] = {"done": [], "skipped": [], "rejected": [], "records": {}, "png_skipped": False}
    on_event("start", "ssm", {"total": len(items)})
    for item in items:
        rel = item.output_rel.as_posix()
        digest = file_sha256(item.path)
        if not overwrite and manifest.is_done(rel, digest, output / item.output_rel.with_suffix(".npy")):
            summary["skipped"].append(rel)
            continue
        started = time.perf_counter()
        try:
            # never through a symlink inside OUTPUT, never over a file cloak did not write
            out_png, out_npy = output_path(output, rel), output_path(output, item.output_rel.with_suffix(".npy"))
            if (out_png.exists() or out_npy.exists()) and not manifest.owns(rel):
                raise RejectedInput(f"{out_png} or {out_npy.name} exists and was not written by cloak; move it away")
            image = to_square(read_image(item.path, max_pixels or DEFAULT_MAX_PIXELS).rgb, resolution)
        except RejectedInput as exc:
            summary["rejected"].append((rel, str(exc)))
            manifest.record(rel, source=str(item.path), status="rejected", error=str(exc))
            on_event("reject", rel, {"reason": str(exc)})
            continue
        generator = torch.Generator().manual_seed(item_seed(seed, item.rel))
        with torch.no_grad():
            latents = diffusion.encode_images(pipe.vae, image[None].to(device, pipe.vae.dtype)).float()
        maps = ssm.semantic_sensitivity(pipe, latents, ids, positions, timesteps, samples, generator,
                                        batch_timesteps=batch_timesteps)
        stats: dict[str, Any] = {"tokens": labels, "positions": positions, "timesteps": list(timesteps),
                                 "mean": maps.mean((-2, -1)).tolist()}
        mask_file = find_twin(masks, item.rel) if masks else None
        if masks and mask_file is None:
            on_event("warn", rel, {"message": f"no mask named {item.rel.stem}.* in {masks}: R not computed"})
        if mask_file is not None:
            latent_mask = diffusion.latent_mask(read_mask(mask_file, resolution), tuple(maps.shape[-2:]))[0, 0]
            ratio = ssm.sensitivity_ratio(maps, latent_mask)
            stats["R"] = [[None if math.isnan(v) else v for v in row] for row in ratio.tolist()]
            stats["mask"] = str(mask_file)
        buffer = io.BytesIO()
        np.save(buffer, maps.numpy())
        manifest.record(rel, source=str(item.path), output=None, status="writing", owned=True)
        atomic_write_bytes(out_npy, buffer.getvalue())
        drawn = ssm_grid(image, maps, labels, timesteps, out_png)
        summary["png_skipped"] |= not drawn
        seconds = round(time.perf_counter() - started, 3)
        manifest.record(rel, source=str(item.path), source_sha256=digest,
                        output=rel if drawn else item.output_rel.with_suffix(".npy").as_posix(), status="done", owned=True,
                        seconds=seconds, stats=stats)
        summary["done"].append(rel)
        summary["records"][rel] = stats
        on_event("done", rel, {"seconds": seconds})
    return summary


# --------------------------------------------------------------------------------------------- profiles
def _load_set(items: Sequence[InputItem], max_pixels: int | None,
              rejected: list) -> list[tuple[InputItem, torch.Tensor]]:
    """Decoded images at their own size (pixel statistics and JPEG must see the real pixels)."""
    loaded = []
    for item in items:
        try:
            loaded.append((item, read_image(item.path, max_pixels or DEFAULT_MAX_PIXELS).rgb))
        except RejectedInput as exc:
            rejected.append((item.rel.as_posix(), str(exc)))
    return loaded


def _twins(loaded, clean: Path | None, max_pixels, required: bool):
    if clean is None:
        if required:
            raise UsageError("this profile compares against clean images: pass --clean FOLDER")
        return None
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


def _latents(pipe, images: Sequence[torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        batch = torch.stack(list(images)).to(pipe.unet.device, pipe.vae.dtype)
        return torch.cat([diffusion.encode_images(pipe.vae, chunk).float() for chunk in batch.split(8)])


def _band_plot(series: dict[str, dict], timesteps: Sequence[int], ylabel: str, path: Path, title: str) -> bool:
    plt = _figure()
    if plt is None:
        return False
    figure, axis = plt.subplots(figsize=(6, 3.6))
    colors = {"images": "tab:red", "clean": "tab:green", "inside": "tab:blue", "outside": "tab:orange"}
    for index, (name, stats) in enumerate(series.items()):
        color = colors.get(name.split(" ")[-1], f"C{index}")
        axis.plot(timesteps, stats["median"], color=color, label=name)
        axis.fill_between(timesteps, stats["q25"], stats["q75"], color=color, alpha=0.35)
        axis.fill_between(timesteps, stats["q025"], stats["q975"], color=color, alpha=0.12)
    axis.set_xlabel("timestep t")
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.legend(fontsize=8)
    _save_figure(figure, path)
    return True


def _histogram_plot(histogram: dict, quality: int, path: Path) -> bool:
    plt = _figure()
    if plt is None:
        return False
    figure, axis = plt.subplots(figsize=(6, 3.6))
    edges = np.array(histogram["edges"])
    centers = (edges[1:] + edges[:-1]) / 2
    width = edges[1] - edges[0]
    axis.bar(centers, histogram["poisoned"]["counts"], width=width, color="tab:red", alpha=0.6, label="poisoned")
    axis.bar(centers, histogram["jpeg"]["counts"], width=width, color="tab:green", alpha=0.6,
             label=f"after JPEG q{quality}")
    axis.set_xlabel("pixel perturbation (0-255 scale)")
    axis.set_ylabel("count")
    axis.legend(fontsize=8)
    _save_figure(figure, path)
    return True


def _spectrum_plot(curves: dict[str, list[float]], path: Path) -> bool:
    plt = _figure()
    if plt is None:
        return False
    figure, axis = plt.subplots(figsize=(6, 3.6))
    for index, (label, curve) in enumerate(curves.items()):
        axis.semilogy(range(len(curve)), curve, color=f"C{index}", linestyle="--" if "JPEG" in label else "-",
                      label=label)
    axis.set_xlabel("radial frequency (latent cells⁻¹ index)")
    axis.set_ylabel("power")
    axis.legend(fontsize=8)
    _save_figure(figure, path)
    return True


def run_profile(pipe, profile: str, items: Sequence[InputItem], output: Path, *, prompt: str,
                token: str | None, clean: Path | None, masks: Path | None, samples: int, seed: int,
                resolution: int, quality: int, max_pixels: int | None = None,
                timesteps: Sequence[int] | None = None) -> dict[str, Any]:
    """One ``--profile`` analysis over a folder → ``OUT/profile-<name>.json`` and ``.png``; returns the data."""
    if profile not in PROFILES:
        raise UsageError(f"--profile {profile!r}: choose one of {', '.join(PROFILES)}")
    rejected: list = []
    loaded = _load_set(items, max_pixels, rejected)
    if not loaded:
        raise CloakError("no readable images to profile")
    generator = torch.Generator().manual_seed(seed)
    num_t = diffusion.num_train_timesteps(pipe.scheduler)
    timesteps = list(timesteps) if timesteps else ssm.profile_timesteps(num_t)
    data: dict[str, Any] = {"profile": profile, "images": [item.rel.as_posix() for item, _ in loaded],
                            "rejected": rejected, "timesteps": timesteps, "samples": samples, "prompt": prompt}
    native = [image for _, image in loaded]
    twins = _twins(loaded, clean, max_pixels, profile == "jpeg-hist")
    native_sets = {"images": native, **({"clean": twins} if twins is not None else {})}
    # the model sees the working resolution; histograms and JPEG see the images' own pixels
    sets = {name: [to_square(image, resolution) for image in group] for name, group in native_sets.items()}
    png = output / f"profile-{profile}.png"
    if profile in ("loss", "mask-loss"):
        context = diffusion.encode_prompts(pipe, [prompt]).float()
        mask = None
        if profile == "mask-loss":
            if masks is None:
                raise UsageError("--profile mask-loss needs --masks FOLDER (masks named like the images)")
            mask_list = []
            for item, _ in loaded:
                path = find_twin(masks, item.rel)
                if path is None:
                    raise UsageError(f"--masks {masks}: no mask named {item.rel.stem}.* for {item.rel}")
                mask_list.append(read_mask(path, resolution))
            mask = torch.cat(mask_list)
        series = {}
        for name, group in sets.items():
            latents = _latents(pipe, group)
            latent_mask = diffusion.latent_mask(mask, tuple(latents.shape[-2:])).to(latents.device) \
                if mask is not None else None
            values = ssm.loss_profile(pipe, latents, context, timesteps, samples, generator, latent_mask)
            keys = ("inside", "outside") if mask is not None else ("loss",)
            for key in keys:
                label = name if key == "loss" else f"{name} {key}"
                series[label] = ssm.summarize(values[key])
        data["series"] = series
        drawn = _band_plot(series, timesteps, "denoising loss", png,
                   "loss per timestep (median, 50% and 95% bands)" if profile == "loss"
                   else "loss inside vs outside the mask")
    elif profile == "grad":
        if not token:
            raise UsageError("--profile grad needs --token (the TI token whose embedding gradient is measured)")
        ids = ssm.prompt_ids(pipe, prompt)
        positions = ssm.token_positions(pipe, ids, token)
        series = {name: ssm.summarize(ssm.gradient_profile(pipe, _latents(pipe, group), ids, positions, timesteps,
                                                           samples, generator)) for name, group in sets.items()}
        data["series"], data["token"] = series, token
        drawn = _band_plot(series, timesteps, "‖∂L/∂e‖₂", png, f"embedding-gradient magnitude of {token}")
    elif profile == "jpeg-hist":
        histogram = ssm.perturbation_histogram(twins, native, quality)
        data["histogram"] = histogram
        drawn = _histogram_plot(histogram, quality, png)
    else:  # spectrum
        from .purify.jpeg import compress

        curves = {}
        for name, group in native_sets.items():
            plain = [to_square(image, resolution) for image in group]
            jpeg = [to_square(compress(image[None], quality)[0], resolution) for image in group]  # JPEG, then resize
            for label, variant in ((name, plain), (f"{name} + JPEG q{quality}", jpeg)):
                curves[label] = ssm.radial_power_spectrum(_latents(pipe, variant).cpu()).tolist()
        data["spectra"] = curves
        drawn = _spectrum_plot(curves, png)
    json_path = output / f"profile-{profile}.json"
    atomic_write_bytes(json_path, json.dumps(data, indent=2).encode() + b"\n")
    data["outputs"] = [str(json_path)] + ([str(png)] if drawn else [])
    data["png_skipped"] = not drawn
    return data


def run_train_log_profile(paths: Sequence[Path], output: Path) -> dict[str, Any]:
    """Fig. 6 from training logs: ``loss_inside`` / ``loss_outside`` of ``train_log.jsonl`` files (``cloak
    train-ti --masks``) against the step, each series also divided by its first value (the paper compares the
    proportions by which the two losses fall). Each log is labelled by its folder name."""
    series: dict[str, dict[str, list[float]]] = {}
    for path in paths:
        if not Path(path).is_file():
            raise UsageError(f"training log not found: {path}")
        steps, inside, outside = [], [], []
        for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
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
        label = Path(path).resolve().parent.name
        series[label] = {"step": steps, "inside": inside, "outside": outside,
                         "inside_relative": [v / inside[0] if inside[0] else float("nan") for v in inside],
                         "outside_relative": [v / outside[0] if outside[0] else float("nan") for v in outside]}
    png, json_path = output / "profile-mask-loss.png", output / "profile-mask-loss.json"
    plt = _figure()
    if plt is not None:
        figure, axis = plt.subplots(figsize=(6, 3.6))
        for index, (label, data) in enumerate(series.items()):
            axis.plot(data["step"], data["inside_relative"], color=f"C{index}", label=f"{label} inside")
            axis.plot(data["step"], data["outside_relative"], color=f"C{index}", linestyle="--",
                      label=f"{label} outside")
        axis.set_xlabel("training step")
        axis.set_ylabel("loss / first logged loss")
        axis.set_title("loss inside vs outside the concept mask during training")
        axis.legend(fontsize=7)
        _save_figure(figure, png)
    data = {"profile": "mask-loss", "source": "train-logs", "logs": [str(p) for p in paths], "series": series}
    atomic_write_bytes(json_path, json.dumps(data, indent=2).encode() + b"\n")
    data["outputs"] = [str(json_path)] + ([str(png)] if plt is not None else [])
    data["png_skipped"] = plt is None
    data["images"], data["rejected"] = [], []
    return data
