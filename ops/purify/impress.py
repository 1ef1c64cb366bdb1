"""IMPRESS (Cao et al., NeurIPS 2023; paper 001 App. C.1 Eq. 8): optimize the image to be consistent under the
LDM autoencoder while staying perceptually close to the protected input,

    min_x ‖x − D(E(x))‖²₂ + α · max(LPIPS(x, x_ptb) − Δ, 0),

α = 0.1, Δ = 0.1, Adam with a cosine-annealed learning rate from 0.01 (METHODS.md; paper 001's text says 0.001),
``iters`` = 3000 (paper; 500 is the documented faster setting, most of the gain comes early), starting from
x = x_ptb and clamping x to [0, 1] after every step. E = posterior mean; the consistency term is the mean squared
error over pixels in [0, 1] (our normalization; the paper does not state one). Batched images are optimized jointly
but independently (per-image losses are summed; Adam is element-wise). LPIPS backbone: VGG by default (our choice;
paper 001 does not name one).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..diffusion import decode_latents, encode_images
from .sdedit import pad_to_multiple


def load_models(*, device: Any = "cpu", dtype: Any = None, model: str | None = None, trust_pickle: bool = False,
                lpips_model: str = "vgg", **_: Any):
    from ..models import load_pipeline
    from .models import PurifierModels, quiet_loading, load_lpips

    with quiet_loading():
        pipe = load_pipeline(model, device, dtype, trust_pickle=trust_pickle)
    return PurifierModels(pipe=pipe, lpips=load_lpips(lpips_model, device))


def objective(vae, lpips, x: torch.Tensor, reference: torch.Tensor, alpha: float,
              budget: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-image ``(total, consistency, lpips)``, each ``(B,)``, for ``x`` and the protected ``reference``."""
    reconstruction = decode_latents(vae, encode_images(vae, x.to(vae.dtype)))
    consistency = (x.float() - reconstruction.float()).pow(2).flatten(1).mean(1)
    distance = lpips(x.float(), reference.float()).float()
    return consistency + alpha * (distance - budget).clamp_min(0), consistency, distance


def purify(images: torch.Tensor, *, models, generators: Sequence[torch.Generator] | None = None, iters: int = 3000,
           lr: float = 0.01, lpips_weight: float = 0.1, lpips_budget: float = 0.1,
           **_: Any) -> tuple[torch.Tensor, list[dict]]:
    """Purify ``(B, 3, H, W)`` images in [0, 1]; returns images and per-image objective stats. Sizes that are not
    multiples of 8 are reflect-padded for the VAE and cropped back."""
    vae, lpips = models.pipe.vae, models.lpips
    height, width = images.shape[-2:]
    reference = pad_to_multiple(images.detach().float(), 8)
    x = reference.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([x], lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, iters))
    with torch.enable_grad():  # the runner calls purifiers under no_grad; this one optimizes
        with torch.no_grad():
            start = objective(vae, lpips, x, reference, lpips_weight, lpips_budget)[0]
        for _ in range(iters):
            optimizer.zero_grad()
            objective(vae, lpips, x, reference, lpips_weight, lpips_budget)[0].sum().backward()
            optimizer.step()
            schedule.step()
            with torch.no_grad():
                x.clamp_(0, 1)
    with torch.no_grad():
        total, consistency, distance = objective(vae, lpips, x, reference, lpips_weight, lpips_budget)
    stats = [{"objective_start": float(s), "objective": float(o), "consistency": float(c), "lpips": float(d)}
             for s, o, c, d in zip(start, total, consistency, distance)]
    return x.detach()[..., :height, :width], stats
