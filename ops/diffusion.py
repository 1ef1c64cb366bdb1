"""The shared diffusion math: latents, forward noising, training targets, (masked) losses and timestep samplers.

One place for it: attacks, purifiers, training and analysis all call these functions, so a fix here is a fix
everywhere. Conventions: images are float ``(B, 3, H, W)`` in [0, 1]; latents are *scaled* (``z0 = s · E(x)``);
timesteps are integer indices into the model's own training schedule (``num_train_timesteps``, 1000 for SD).

Forward process (DDPM, paper 000 Eq. 2): ``z_t = sqrt(ᾱ_t) z0 + sqrt(1 − ᾱ_t) ε``. Targets from the scheduler
config: ``epsilon`` → ε; ``v_prediction`` → ``sqrt(ᾱ_t) ε − sqrt(1 − ᾱ_t) z0``; ``sample`` → z0; rectified flow
(``FlowMatch*`` schedulers) → ``z_t = (1 − σ) z0 + σ ε`` with σ = t / T and target ``ε − z0``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from .train.presets import TIMESTEP_SAMPLERS  # noqa: F401 - the names, stdlib-only there so the CLI can list them


# --------------------------------------------------------------------------------------------------- VAE
def encode_images(vae, images: torch.Tensor, *, sample: bool = False,
                  generator: torch.Generator | None = None, device: torch.device | None = None,
                  dtype: torch.dtype | None = None) -> torch.Tensor:
    """Images ``(B, 3, H, W)`` in [0, 1] → scaled latents ``(B, C, H/8, W/8)`` (posterior mean, or a sample).

    ``device``/``dtype``: the VAE's, when the caller knows them (reading ``vae.device``/``vae.dtype`` walks every
    module of a diffusers model)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images shaped (B, 3, H, W), got {tuple(images.shape)}")
    device, dtype = device or vae.device, dtype or vae.dtype
    posterior = vae.encode((images * 2 - 1).to(device, dtype)).latent_dist  # inputs follow the model
    latents = posterior.sample(generator) if sample else posterior.mean
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


def latent_posterior(vae, images: torch.Tensor, *, device: torch.device | None = None,
                     dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(B, 3, H, W)`` in [0, 1] → scaled posterior ``(mean, std)`` of the VAE, so a trainer can cache them
    and draw ``mean + std · n`` per step (the same law as ``latent_dist.sample()``) without re-running the encoder.
    ``device``/``dtype``: the VAE's, when the caller knows them (as :func:`encode_images`)."""
    device, dtype = device or vae.device, dtype or vae.dtype
    posterior = vae.encode((images * 2 - 1).to(device, dtype)).latent_dist
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (posterior.mean - shift) * vae.config.scaling_factor, posterior.std * vae.config.scaling_factor


def decode_latents(vae, latents: torch.Tensor, *, clamp: bool = True) -> torch.Tensor:
    """Scaled latents → images in [0, 1] (``clamp=False`` keeps the decoder's overshoot, and its gradient)."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    decoded = vae.decode((latents / vae.config.scaling_factor + shift).to(vae.dtype)).sample
    images = (decoded.float() + 1) / 2
    return images.clamp(0, 1) if clamp else images


# ----------------------------------------------------------------------------------------- noise & targets
def is_flow_matching(scheduler) -> bool:
    return "FlowMatch" in type(scheduler).__name__


def prediction_type(scheduler) -> str:
    """``epsilon``, ``v_prediction``, ``sample`` or ``flow`` (rectified flow / flow matching)."""
    if is_flow_matching(scheduler):
        return "flow"
    return getattr(scheduler.config, "prediction_type", "epsilon")


def num_train_timesteps(scheduler) -> int:
    return int(scheduler.config.num_train_timesteps)


def _broadcast(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.reshape(-1, *([1] * (like.ndim - 1))).to(like.device, like.dtype)


def signal_noise_coefficients(scheduler, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a_t, b_t)`` with ``z_t = a_t z0 + b_t ε``: ``(sqrt ᾱ_t, sqrt(1−ᾱ_t))``, or ``(1−σ, σ)`` for flows."""
    timesteps = timesteps.long().cpu()
    if is_flow_matching(scheduler):
        sigma = timesteps.double() / num_train_timesteps(scheduler)
        return 1 - sigma, sigma
    alpha_bar = scheduler.alphas_cumprod.double()[timesteps]
    return alpha_bar.sqrt(), (1 - alpha_bar).sqrt()


def add_noise(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Forward-noise ``latents`` to ``timesteps`` (one per batch element)."""
    signal, noise_scale = signal_noise_coefficients(scheduler, timesteps)
    return _broadcast(signal, latents) * latents + _broadcast(noise_scale, latents) * noise


def training_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the denoiser is trained to output at ``timesteps`` for the model's prediction type."""
    kind = prediction_type(scheduler)
    if kind == "epsilon":
        return noise
    if kind == "sample":
        return latents
    if kind == "flow":
        return noise - latents
    if kind == "v_prediction":
        signal, noise_scale = signal_noise_coefficients(scheduler, timesteps)
        return _broadcast(signal, latents) * noise - _broadcast(noise_scale, latents) * latents
    raise ValueError(f"unknown prediction type {kind!r} in the scheduler config")


def timestep_for_model(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """The value passed to the denoiser as its time input (the index itself; flows get σ·T, the same number)."""
    return timesteps


# -------------------------------------------------------------------------------------------------- losses
def masked_mse(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample mean squared error ``(B,)``; with ``mask`` (broadcastable, values in [0, 1]) the squared error is
    weighted by it — LM of paper 000 App. I: ``‖(ε_θ(z_t) − ε) ⊙ M_z‖²`` — and averaged over all elements."""
    error = (prediction.float() - target.float()) ** 2
    if mask is not None:
        error = error * mask.to(error.device, error.dtype)
    return error.flatten(1).mean(1)


def latent_mask(mask: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
    """Pixel-space mask ``(B, 1, H, W)`` in [0, 1] → latent-space mask ``(B, 1, h, w)`` (paper 000 Eq. 7).

    Area-averaged resize, so a latent cell is weighted by the fraction of its pixels inside the mask.
    """
    if mask.ndim != 4 or mask.shape[1] != 1:
        raise ValueError(f"expected a mask shaped (B, 1, H, W), got {tuple(mask.shape)}")
    return F.interpolate(mask.float(), size=latent_size, mode="area")


def encode_prompts(pipe, prompts: list[str], device: Any = None) -> torch.Tensor:
    """CLIP text embeddings ``(B, 77, D)`` of ``prompts`` with the pipeline's tokenizer and text encoder."""
    tokens = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids
    encoder = pipe.text_encoder
    return encoder(tokens.to(device or encoder.device))[0]


def diffusion_loss(unet, scheduler, latents: torch.Tensor, text_embeddings: torch.Tensor, timesteps: torch.Tensor,
                   noise: torch.Tensor, mask: torch.Tensor | None = None, **unet_kwargs: Any) -> torch.Tensor:
    """Per-sample denoising loss ``‖f_θ(z_t, t, c) − target‖²`` ``(B,)``, optionally latent-masked."""
    prediction, target = denoise_prediction(unet, scheduler, latents, text_embeddings, timesteps, noise,
                                            **unet_kwargs)
    return masked_mse(prediction, target, mask)


def denoise_prediction(unet, scheduler, latents: torch.Tensor, text_embeddings: torch.Tensor,
                       timesteps: torch.Tensor, noise: torch.Tensor, *, input_mask: torch.Tensor | None = None,
                       **unet_kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(f_θ(z_t, t, c), target)`` — the two sides of :func:`diffusion_loss`, for callers that need both (per-region
    losses). ``input_mask`` multiplies ``z_t`` before the denoiser (ZM of paper 000 App. I: ``ε_θ(z_t ⊙ M_z)``)."""
    device = getattr(unet, "device", None) or next(unet.parameters()).device  # inputs follow the model
    latents, noise = latents.to(device), noise.to(device)  # timesteps may stay on the CPU (coefficients are)
    noisy = add_noise(scheduler, latents, noise, timesteps)
    if input_mask is not None:
        noisy = noisy * input_mask.to(device, noisy.dtype)
    prediction = unet(noisy.to(unet.dtype), timestep_for_model(scheduler, timesteps).to(device),
                      encoder_hidden_states=text_embeddings.to(device, unet.dtype), **unet_kwargs).sample
    return prediction, training_target(scheduler, latents, noise, timesteps)


# ------------------------------------------------------------------------------------------- t sampling
def _tanh_density(grid: torch.Tensor, rho: float) -> torch.Tensor:
    return torch.tanh(rho * (grid - 0.5)) / 2 + 0.5


def timestep_density(sampler: str, rho: float | None, t: torch.Tensor) -> torch.Tensor:
    """Normalized density on [0, 1] of a sampler of paper 000 App. H (for plots and statistical tests)."""
    t = t.double()
    ones = torch.ones_like(t)
    if sampler == "uniform":
        return ones
    rho = _check_rho(sampler, rho)
    if sampler == "threshold-high":
        return (t >= rho).double() / (1 - rho)
    if sampler == "threshold-low":
        return (t < rho).double() / rho
    if sampler == "power":
        return (rho + 1) * t**rho
    if sampler == "tanh":
        grid = torch.linspace(0, 1, 20001, dtype=torch.float64)
        return _tanh_density(t, rho) / torch.trapezoid(_tanh_density(grid, rho), grid)
    raise ValueError(f"unknown timestep sampler {sampler!r}; choose one of {', '.join(TIMESTEP_SAMPLERS)}")


def _check_rho(sampler: str, rho: float | None) -> float:
    if rho is None:
        raise ValueError(f"timestep sampler {sampler!r} needs a parameter rho (--t-param)")
    if sampler.startswith("threshold") and not 0 < rho < 1:
        raise ValueError(f"{sampler} needs 0 < rho < 1 (a fraction of the schedule), got {rho}")
    if sampler == "power" and rho <= -1:
        raise ValueError(f"power sampler needs rho > -1, got {rho}")
    return float(rho)


def sample_unit_times(n: int, sampler: str = "uniform", rho: float | None = None,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` draws in [0, 1) from a sampler of paper 000 App. H (float64, on the CPU).

    uniform U(0,1) · threshold-high U(ρ,1) · threshold-low U(0,ρ) · power p(t) ∝ t^ρ (inverse CDF u^{1/(ρ+1)}) ·
    tanh p(t) ∝ tanh(ρ(t − 0.5))/2 + 0.5 (numerical inverse CDF on a fine grid).
    """
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    if sampler == "uniform":
        return u
    rho = _check_rho(sampler, rho)
    if sampler == "threshold-high":
        return rho + (1 - rho) * u
    if sampler == "threshold-low":
        return rho * u
    if sampler == "power":
        return u ** (1 / (rho + 1))
    if sampler == "tanh":
        grid = torch.linspace(0, 1, 20001, dtype=torch.float64)
        density = _tanh_density(grid, rho)
        cdf = torch.cat([torch.zeros(1, dtype=torch.float64),
                         torch.cumsum((density[1:] + density[:-1]) / 2 * (grid[1] - grid[0]), 0)])
        cdf = cdf / cdf[-1]
        index = torch.searchsorted(cdf, u).clamp(1, len(grid) - 1)
        low, high = cdf[index - 1], cdf[index]
        weight = (u - low) / (high - low).clamp_min(1e-300)
        return (grid[index - 1] + weight * (grid[index] - grid[index - 1])).clamp(0, math.nextafter(1.0, 0.0))
    raise ValueError(f"unknown timestep sampler {sampler!r}; choose one of {', '.join(TIMESTEP_SAMPLERS)}")


def sample_timesteps(n: int, sampler: str = "uniform", rho: float | None = None, *, num_timesteps: int = 1000,
                     t_range: tuple[int, int] | None = None, generator: torch.Generator | None = None,
                     device: Any = "cpu") -> torch.Tensor:
    """Integer timesteps ``(n,)``: a unit-interval draw scaled to the schedule (``floor(t · T)``).

    ``t_range=(lo, hi)`` restricts a uniform draw to ``lo <= t < hi`` (the attacks' ``--t-range``).
    """
    if t_range is not None:
        low, high = t_range
        if not 0 <= low < high <= num_timesteps:
            raise ValueError(f"t-range {low}..{high} must satisfy 0 <= lo < hi <= {num_timesteps}")
        unit = sample_unit_times(n, "uniform", generator=generator)
        values = low + unit * (high - low)
    else:
        values = sample_unit_times(n, sampler, rho, generator) * num_timesteps
    return values.floor().long().clamp(0, num_timesteps - 1).to(device)
