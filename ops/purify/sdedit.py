"""SDEdit (Meng et al. 2022), the routine every diffusion purifier shares: noise the image to step ``t`` of the
model's own training schedule, then run the reverse process from exactly that step back to 0.

Forward: ``x_t = sqrt(ᾱ_t) x0 + sqrt(1 − ᾱ_t) ε`` (:func:`ops.diffusion.add_noise`). Reverse: generalized DDIM
updates (Song et al. 2021, Eq. 12) on the timesteps ``t, t − k, t − 2k, … ≥ 0`` with ``k = T // schedule_steps``
(a 50-step schedule has k = 20; ``schedule_steps = T`` visits every step). ``eta = 0`` is deterministic DDIM;
``eta = 1`` gives the DDPM ancestral sampler with the posterior variance β̃ (DiffPure's reverse SDE, discretized).
The last update returns the model's clean estimate x̂0. Images are float ``(B, 3, H, W)`` in [0, 1]; every image
draws its noise from its own generator, so batching never changes a result.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from ..diffusion import (
    add_noise,
    decode_latents,
    encode_images,
    encode_prompts,
    is_flow_matching,
    latent_posterior,
    num_train_timesteps,
    prediction_type,
    signal_noise_coefficients,
)


def denoise_timesteps(t_start: int, num_timesteps: int = 1000, schedule_steps: int = 50) -> list[int]:
    """Timesteps the reverse process visits from ``t_start``: ``t_start, t_start − k, …`` (≥ 0), ``k = T // steps``."""
    if not 0 <= t_start < num_timesteps:
        raise ValueError(f"noise step t must be in 0..{num_timesteps - 1}, got {t_start}")
    if schedule_steps < 1:
        raise ValueError(f"steps must be >= 1, got {schedule_steps}")
    stride = max(1, num_timesteps // schedule_steps)
    return list(range(int(t_start), -1, -stride))


def per_image_noise(shape: Sequence[int], generators: Sequence[torch.Generator | None],
                    like: torch.Tensor) -> torch.Tensor:
    """Standard normal noise ``(B, *shape)``: image i from ``generators[i]`` (drawn on the CPU for reproducibility)."""
    return torch.stack([torch.randn(tuple(shape), generator=g) for g in generators]).to(like.device, torch.float32)


def clean_estimate(scheduler, output: torch.Tensor, x_t: torch.Tensor, t: int,
                   clip: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x̂0, ε̂)`` from the model output at step ``t`` (ε or v prediction); ``clip`` clamps x̂0 to [-1, 1] and
    re-derives ε̂ from it (DDPM's ``clip_sample``, for pixel models)."""
    a_t, b_t = (float(v[0]) for v in signal_noise_coefficients(scheduler, torch.tensor([t])))
    kind = prediction_type(scheduler)
    if kind == "epsilon":
        eps, x0 = output, (x_t - b_t * output) / a_t
    elif kind == "v_prediction":
        x0, eps = a_t * x_t - b_t * output, b_t * x_t + a_t * output
    else:
        raise ValueError(f"SDEdit purifiers need an ε- or v-prediction model, not {kind!r}")
    if clip:
        x0 = x0.clamp(-1, 1)
        eps = (x_t - a_t * x0) / b_t
    return x0, eps


def reverse_step(scheduler, x0: torch.Tensor, eps: torch.Tensor, t: int, t_prev: int, eta: float,
                 noise: torch.Tensor | None) -> torch.Tensor:
    """One generalized DDIM update ``x_t → x_{t_prev}`` (Song et al. 2021, Eq. 12):
    ``sqrt(ᾱ_prev) x̂0 + sqrt(1 − ᾱ_prev − σ²) ε̂ + σ z`` with ``σ = η sqrt((1−ᾱ_prev)/(1−ᾱ_t)) sqrt(1 − ᾱ_t/ᾱ_prev)``
    (η = 1 on consecutive steps is DDPM's posterior with variance β̃)."""
    (a_t, b_t), (a_prev, b_prev) = ((float(v[0]) for v in signal_noise_coefficients(scheduler, torch.tensor([s])))
                                    for s in (t, t_prev))
    sigma = eta * (b_prev / b_t) * max(0.0, 1 - (a_t / a_prev) ** 2) ** 0.5
    x = a_prev * x0 + max(0.0, b_prev**2 - sigma**2) ** 0.5 * eps
    return x + sigma * noise if sigma > 0 and noise is not None else x


def reverse_process(x_t: torch.Tensor, timesteps: list[int],
                    predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], scheduler, *, eta: float = 0.0,
                    clip: bool = False, generators: Sequence[torch.Generator | None] | None = None) -> torch.Tensor:
    """Run generalized DDIM from ``x_t`` over ``timesteps`` (descending) and return x̂0 ``(B, C, h, w)``.

    ``predict(x, t)`` returns the model output (ε or v per the scheduler config).
    """
    if is_flow_matching(scheduler):
        raise ValueError("SDEdit purifiers need a DDPM-type (ε or v) model, not a flow-matching one")
    generators = list(generators) if generators is not None else [None] * x_t.shape[0]
    x = x_t.float()
    for index, t in enumerate(timesteps):
        output = predict(x, torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)).float()
        x0, eps = clean_estimate(scheduler, output, x, t, clip)
        if index == len(timesteps) - 1:
            return x0
        noise = per_image_noise(x.shape[1:], generators, x) if eta > 0 else None
        x = reverse_step(scheduler, x0, eps, t, timesteps[index + 1], eta, noise)
    return x


def sdedit(x0: torch.Tensor, t_start: int, predict, scheduler, *, schedule_steps: int, eta: float = 0.0,
           clip: bool = False, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """Noise ``x0`` (model space) to ``t_start`` with per-image noise, then denoise back to a clean estimate."""
    timesteps = denoise_timesteps(t_start, num_train_timesteps(scheduler), schedule_steps)
    noise = per_image_noise(x0.shape[1:], generators, x0)
    x_t = add_noise(scheduler, x0.float(), noise, torch.full((x0.shape[0],), t_start, dtype=torch.long))
    return reverse_process(x_t, timesteps, predict, scheduler, eta=eta, clip=clip, generators=generators)


def resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic (antialiased when shrinking) resize of ``(B, C, H, W)``; a no-op at the same size."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    shrink = size[0] < images.shape[-2] or size[1] < images.shape[-1]
    return F.interpolate(images.float(), size=size, mode="bicubic", align_corners=False, antialias=shrink)


def pad_to_multiple(images: torch.Tensor, multiple: int = 8) -> torch.Tensor:
    """Reflect-pad ``(B, C, H, W)`` at the bottom/right to multiples of ``multiple`` (crop ``[..., :H, :W]`` after)."""
    height, width = images.shape[-2:]
    pad_h, pad_w = -height % multiple, -width % multiple
    if not (pad_h or pad_w):
        return images
    return F.pad(images.float(), (0, pad_w, 0, pad_h), mode="reflect" if min(height, width) > multiple else "replicate")


def latent_sdedit(pipe, images: torch.Tensor, *, t_start: int, schedule_steps: int, prompt: str, guidance: float,
                  generators: Sequence[torch.Generator | None], eta: float = 0.0,
                  posterior_sample: bool = False) -> torch.Tensor:
    """SDEdit in Stable Diffusion's latent space with classifier-free guidance (``guidance`` w; an empty prompt
    makes the guided and unguided predictions equal, so it runs one pass). Works at the input size rounded to a
    multiple of 8 (reflect padding, cropped after). ``posterior_sample`` encodes with a draw from the VAE posterior
    (``latent_dist.sample()``, from each image's generator before the SDEdit noise) instead of its mean.
    Returns ``(B, 3, H, W)`` in [0, 1]."""
    height, width = images.shape[-2:]
    vae, unet, scheduler = pipe.vae, pipe.unet, pipe.scheduler
    work = pad_to_multiple(images.clamp(0, 1), 8)
    if posterior_sample:
        mean, std = (v.float() for v in latent_posterior(vae, work.to(vae.dtype)))
        latents = mean + std * per_image_noise(mean.shape[1:], generators, mean)
    else:
        latents = encode_images(vae, work.to(vae.dtype)).float()
    batch = images.shape[0]
    cond = encode_prompts(pipe, [prompt] * batch)
    guided = guidance != 1.0 and prompt != ""
    context = torch.cat([encode_prompts(pipe, [""] * batch), cond]) if guided else cond

    def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        model_in = torch.cat([x, x]) if guided else x
        out = unet(model_in.to(unet.dtype), torch.cat([t, t]) if guided else t,
                   encoder_hidden_states=context.to(unet.dtype)).sample.float()
        if not guided:
            return out
        uncond, text = out.chunk(2)
        return uncond + guidance * (text - uncond)

    clean = sdedit(latents, t_start, predict, scheduler, schedule_steps=schedule_steps, eta=eta,
                   generators=generators)
    return decode_latents(vae, clean)[..., :height, :width].clamp(0, 1)


def pixel_sdedit(model, images: torch.Tensor, *, t_start: int, schedule_steps: int,
                 generators: Sequence[torch.Generator | None], eta: float = 1.0,
                 resolution: int | None = None) -> torch.Tensor:
    """SDEdit with a pixel-space model (:class:`ops.purify.models.PixelDiffusion`): resize to its resolution
    (``resolution`` or the model's own), map to [-1, 1], purify, map back to the input size."""
    height, width = images.shape[-2:]
    side = int(resolution or model.resolution)
    work = resize(images, (side, side)).clamp(0, 1) * 2 - 1
    clean = sdedit(work, t_start, model.predict, model.scheduler, schedule_steps=schedule_steps, eta=eta, clip=True,
                   generators=generators)
    return resize((clean + 1) / 2, (height, width)).clamp(0, 1)


def prompt_for(template: str, class_name: str | None) -> str:
    """Fill ``{class}``; a template needing a class but given none becomes "" (paper 001's ∅ variant)."""
    if "{class}" in template:
        return template.replace("{class}", class_name) if class_name else ""
    return template
