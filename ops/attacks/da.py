"""PhotoGuard's diffusion attack (``da``): back-propagate through a short sampling run and pull its output to a target.

Salman et al., "Raising the Cost of Malicious AI-Powered Image Editing", ICML 2023 (their notebooks' defaults):

    min_δ ‖D(sample_θ(x + δ)) − x_target‖₂,   sample_θ = 4 DDIM steps with classifier-free guidance 7.5,

L2 PGD: ε 16 and step 1 in [-1, 1] image units (8 and 0.5 on the [0, 1] scale), 200 iterations, each gradient the
mean of 10 samples (fresh starting noise per sample). cloaklab keeps the L2 budget and also projects onto the L∞
ball of ``eps`` (/255), so the saved PNG obeys the same budget as every other attack.

Approximations: PhotoGuard attacked the *inpainting* pipeline (the input enters through the masked-image
channels and sampling starts from pure noise). A plain text-to-image model has no such channels, so we attack
img2img instead: the input is encoded, noised to ``strength`` (0.5) of the schedule, and denoised by the remaining
steps of the 4-step DDIM schedule (2 steps at 0.5). SD 1.x/2.x only (ε or v prediction); SDXL and flow models are
not supported by this attack.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .. import diffusion
from .engine import AttackModels, PGDResult, evaluate_loss, loss_gradient, project_linf


def img2img(models: AttackModels, images: torch.Tensor, generators: Sequence[torch.Generator], *,
            sampling_steps: int = 4, guidance: float = 7.5, strength: float = 0.5) -> torch.Tensor:
    """Differentiable DDIM img2img ``(B, 3, H, W)`` → ``(B, 3, H, W)`` in [0, 1] (diffusers' strength rule)."""
    from diffusers import DDIMScheduler

    if diffusion.is_flow_matching(models.scheduler):
        raise ValueError("the da attack needs a DDPM-style scheduler (SD 1.x/2.x), not a flow-matching model")
    scheduler = DDIMScheduler.from_config(models.scheduler.config)
    scheduler.set_timesteps(sampling_steps, device=images.device)
    keep = min(int(sampling_steps * strength), sampling_steps)
    timesteps = scheduler.timesteps[sampling_steps - keep:]
    batch = images.shape[0]
    latents = models.encode(images)
    noise = torch.stack([torch.randn(latents.shape[1:], generator=g) for g in generators]).to(latents)
    if len(timesteps) == 0:
        return diffusion.decode_latents(models.vae, latents)
    z = diffusion.add_noise(models.scheduler, latents, noise, timesteps[:1].repeat(batch).cpu())
    embeddings = torch.cat([models.text_embeddings(batch, ""), models.text_embeddings(batch)]).to(models.dtype)
    for t in timesteps:
        both = models.unet(torch.cat([z, z]).to(models.dtype), t, encoder_hidden_states=embeddings).sample.float()
        uncond, cond = both.chunk(2)
        z = scheduler.step(uncond + guidance * (cond - uncond), t, z).prev_sample
    return diffusion.decode_latents(models.vae, z)


def attack(images: torch.Tensor, *, models: AttackModels, generators: Sequence[torch.Generator],
           targets: torch.Tensor, eps: float = 16.0, l2_eps: float = 16.0, l2_step: float = 1.0, steps: int = 200,
           grad_samples: int = 10, sampling_steps: int = 4, guidance: float = 7.5, strength: float = 0.5,
           random_start: bool = False, mask: torch.Tensor | None = None, eot: Any = None, eot_samples: int = 1,
           grad_transform: Any = None, delta_transform: Any = None, on_step: Any = None,
           eval_draws: int = 1) -> PGDResult:
    """Run the diffusion attack on ``images`` ``(B, 3, H, W)`` in [0, 1] toward ``targets`` (same shape)."""
    clean = images.detach().float()
    targets = targets.to(clean)
    radius, step = l2_eps / 2, l2_step / 2  # [-1, 1] units → [0, 1] units

    def loss_fn(x: torch.Tensor, gens: Sequence[torch.Generator]) -> torch.Tensor:
        out = img2img(models, x, gens, sampling_steps=sampling_steps, guidance=guidance, strength=strength)
        return (out - targets).flatten(1).norm(dim=1)

    loss_start = evaluate_loss(clean, loss_fn, generators, eval_draws)
    x = clean.clone()
    if random_start:
        x = project_linf(clean + (torch.rand_like(clean) * 2 - 1) * radius / clean[0].numel() ** 0.5, clean, eps, mask)
    for index in range(steps):
        grad = torch.zeros_like(clean)
        loss = torch.zeros(clean.shape[0])
        for _ in range(max(1, grad_samples)):
            sample_grad, sample_loss = loss_gradient(x, loss_fn, generators, eot=eot, eot_samples=eot_samples)
            grad += sample_grad / grad_samples
            loss += sample_loss.cpu() / grad_samples
        if grad_transform is not None:
            grad = grad_transform(grad)
        if mask is not None:
            grad = grad * mask
        direction = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        delta = x - step * direction - clean  # descent
        if delta_transform is not None:
            delta = delta_transform(delta)
        norms = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        delta = delta * (radius / norms.clamp_min(radius))
        x = project_linf(clean + delta, clean, eps, mask).detach()
        if on_step is not None:
            on_step(index, loss)
    return PGDResult(x, loss_start, evaluate_loss(x, loss_fn, generators, eval_draws))
