"""PhotoGuard's diffusion attack (``da``): back-propagate through a short sampling run and pull its output to a target.

Salman et al., "Raising the Cost of Malicious AI-Powered Image Editing", ICML 2023. Reference code:
MadryLab/photoguard ``notebooks/demo_complex_attack_inpainting.ipynb`` — ``attack_forward`` (the differentiable
sampler), ``compute_grad`` (the loss) and ``super_l2`` (the PGD loop):

    min_δ ‖D(sample_θ(x + δ)) − x_target‖₂   (decoder output and target in [-1, 1] units, no clamp),

``sample_θ``: 4 DDIM steps with η = 1 and classifier-free guidance 7.5 on the *empty* prompt (so the guided
prediction equals the unconditional one), ``x_target`` mid-grey (their ``target_image = 0`` in [-1, 1]); the decoder
output is not clamped (a clamp would zero the gradient of every saturated pixel). L2 PGD: gradient averaged over
``grad_reps`` 10 samples (fresh starting and DDIM noise each), normalized step 1, ``torch.renorm`` onto the L2 ball
ε 16, both in [-1, 1] units (0.5 and 8 on the [0, 1] scale), 200 iterations, constant step, no random start.

Where we differ, and why: PhotoGuard attacked the *inpainting* UNet, whose extra input channels carry the
photo's latent, and starts from pure noise. A text-to-image UNet has no such channels — from pure noise the photo
would have no path into the output — so the photo enters img2img-style: encoded, noised to the first timestep of
the 4-step schedule (``strength`` 1.0: all 4 steps run) and denoised. ``strength`` < 1 skips early steps (the old
behaviour at 0.5). cloaklab also projects onto the L∞ ball of ``eps`` (/255) so the saved PNG obeys the same budget
as every other attack. Every random draw (start noise, the η = 1 DDIM noise) comes from the image's generator.
SD 1.x/2.x only (ε or v prediction); not SDXL or flow models.

Defaults: eps 16 (L∞, /255), l2_eps 16, l2_step 1 ([-1, 1] units), steps 200, grad_samples 10, sampling_steps 4,
guidance 7.5, strength 1.0, eta 1.0, sampling_prompt "" (the sampler's prompt; ``--prompt`` does not reach it), target
``gray``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .. import diffusion
from .engine import AttackModels, PGDResult, evaluate_loss, loss_gradient, project_linf, report_step


def sample(models: AttackModels, images: torch.Tensor, generators: Sequence[torch.Generator], *,
           sampling_steps: int = 4, guidance: float = 7.5, strength: float = 1.0, eta: float = 1.0,
           prompt: str = "") -> torch.Tensor:
    """Differentiable DDIM run from ``images`` ``(B, 3, H, W)`` in [0, 1] → decoded ``(B, 3, H, W)`` in [-1, 1]
    units, *not clamped* (PhotoGuard's ``attack_forward`` with the photo entering as img2img, see the module)."""
    from diffusers import DDIMScheduler

    if diffusion.is_flow_matching(models.scheduler):
        raise ValueError("the da attack needs a DDPM-style scheduler (SD 1.x/2.x), not a flow-matching model")
    scheduler = DDIMScheduler.from_config(models.scheduler.config)
    scheduler.set_timesteps(sampling_steps, device=images.device)
    keep = min(int(sampling_steps * strength), sampling_steps)
    timesteps = scheduler.timesteps[sampling_steps - keep:]
    batch = images.shape[0]
    latents = models.encode(images)

    def draw() -> torch.Tensor:
        return torch.stack([torch.randn(latents.shape[1:], generator=g) for g in generators]).to(latents)

    z = latents
    if len(timesteps):
        z = diffusion.add_noise(models.scheduler, latents, draw(), timesteps[:1].repeat(batch).cpu())
    conditional = prompt != "" and guidance != 1.0  # with the empty prompt cond = uncond: the guided ε is uncond's
    embeddings = models.text_embeddings(batch, "")
    if conditional:
        embeddings = torch.cat([embeddings, models.text_embeddings(batch, prompt)])
    for t in timesteps:
        prediction = models.unet(torch.cat([z, z] if conditional else [z]).to(models.dtype), t,
                                 encoder_hidden_states=embeddings.to(models.dtype)).sample.float()
        if conditional:
            uncond, cond = prediction.chunk(2)
            prediction = uncond + guidance * (cond - uncond)
        z = scheduler.step(prediction, t, z, eta=eta, variance_noise=draw() if eta else None).prev_sample
    return diffusion.decode_latents(models.vae, z, clamp=False) * 2 - 1


def attack(images: torch.Tensor, *, models: AttackModels, generators: Sequence[torch.Generator],
           targets: torch.Tensor, eps: float = 16.0, l2_eps: float = 16.0, l2_step: float = 1.0, steps: int = 200,
           grad_samples: int = 10, sampling_steps: int = 4, guidance: float = 7.5, strength: float = 1.0,
           eta: float = 1.0, sampling_prompt: str = "", random_start: bool = False, mask: torch.Tensor | None = None,
           eot: Any = None, eot_samples: int = 1, grad_transform: Any = None, delta_transform: Any = None,
           on_step: Any = None, eval_draws: int = 1) -> PGDResult:
    """Run the diffusion attack on ``images`` ``(B, 3, H, W)`` in [0, 1] toward ``targets`` (same shape, [0, 1])."""
    clean = images.detach().float()
    target = targets.to(clean) * 2 - 1  # [-1, 1] units, as PhotoGuard's loss
    radius, step = l2_eps / 2, l2_step / 2  # [-1, 1] units → [0, 1] units

    def loss_fn(x: torch.Tensor, gens: Sequence[torch.Generator]) -> torch.Tensor:
        out = sample(models, x, gens, sampling_steps=sampling_steps, guidance=guidance, strength=strength, eta=eta,
                     prompt=sampling_prompt)
        return (out - target).flatten(1).norm(dim=1)

    loss_start = evaluate_loss(clean, loss_fn, generators, eval_draws)
    x = clean.clone()
    if random_start:  # not PhotoGuard's (super_l2 starts at x); a uniform draw scaled into the L2 ball
        noise = torch.stack([torch.rand(clean.shape[1:], generator=g) * 2 - 1 for g in generators]).to(clean)
        x = project_linf(clean + noise * radius / clean[0].numel() ** 0.5, clean, eps, mask)
    for index in range(steps):
        grad = torch.zeros_like(clean)
        loss = torch.zeros(clean.shape[0])
        for _ in range(max(1, grad_samples)):
            sample_grad, sample_loss = loss_gradient(x, loss_fn, generators, eot=eot, eot_samples=eot_samples)
            grad += sample_grad / max(1, grad_samples)
            loss += sample_loss.cpu() / max(1, grad_samples)
        if grad_transform is not None:
            grad = grad_transform(grad)
        if mask is not None:
            grad = grad * mask
        direction = grad / (grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1) + 1e-10)
        delta = x - step * direction - clean  # descent
        if delta_transform is not None:
            delta = delta_transform(delta)
        norms = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        delta = delta * (radius / norms.clamp_min(radius))
        x = project_linf(clean + delta, clean, eps, mask).detach()
        if on_step is not None:
            on_step(index, loss)
        report_step(index + 1, steps)
    return PGDResult(x, loss_start, evaluate_loss(x, loss_fn, generators, eval_draws))
