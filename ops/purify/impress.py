"""IMPRESS (Cao et al., NeurIPS 2023; paper 001 App. C.1 Eq. 8): optimize the image to be consistent under the
LDM autoencoder while staying perceptually close to the protected input,

    min_x ‖x − D(E(x))‖²₂ + α · max(LPIPS(x, x_ptb) − Δ, 0).

Reference: the release's ``impress(X_adv, model, eps, iters, clamp_min, clamp_max, lr, pur_alpha, noise)``
(IMPRESS ``impress.py``; called by DiffShortcut ``diffshortcut/defenses/impress.py``, ``denoise_images``, with
``eps=0.1, iters=3000, lr=0.01, pur_alpha=0.1, noise=0.1, clamp_min=-1, clamp_max=1``). As there, we work in the
model's [-1, 1] units y = 2x − 1:

* start ``y = y_ptb + 2·noise · n``, ``n ~ N(0, I)``: ``noise`` 0.05 of the [0, 1] range (``--noise``'s unit, as in
  noisy-upscale) is the release's ``pur_noise`` 0.1 in [-1, 1] units; n from the image's own generator (the run's
  seed); not clamped before the first step;
* consistency ``mean((D(E(y)) − y)²)`` in [-1, 1] units (``nn.MSELoss``; 4× the [0, 1] MSE); E = the posterior
  mean (diffusers' ``AutoencoderKL.forward`` default), D unclamped so the gradient survives overshoot;
* LPIPS-VGG on the images (the release's ``lpips.LPIPS(net='vgg')``), hinge ``max(d − Δ, 0)``, α 0.1, Δ 0.1;
* Adam(lr 0.01, eps 1e-5) with ``CosineAnnealingLR(T_max=iters, eta_min=1e-5)``, y clamped to [-1, 1] after
  every step; 3000 iterations (``--iters 500`` is the documented faster setting; most of the gain comes early).

Where we differ: float32 instead of the release's float16; a batch is optimized jointly but independently (per-image
losses are summed; Adam is element-wise, so each image follows its own trajectory); LPIPS is torchmetrics'
implementation of the same network; sizes that are not multiples of 8 are reflect-padded (the release used 512²).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..diffusion import decode_latents, encode_images
from .sdedit import pad_to_multiple, per_image_noise

ADAM_EPS = 1e-5  # release: torch.optim.Adam([X_p], lr=lr, eps=1e-5)
LR_FLOOR = 1e-5  # release: CosineAnnealingLR(optimizer, iters, eta_min=1e-5)


def load_models(*, device: Any = "cpu", dtype: Any = None, model: str | None = None, trust_pickle: bool = False,
                lpips_model: str = "vgg", **_: Any):
    from ..models import load_pipeline
    from .models import PurifierModels, load_lpips, quiet_loading

    with quiet_loading():
        pipe = load_pipeline(model, device, dtype, trust_pickle=trust_pickle)
    return PurifierModels(pipe=pipe, lpips=load_lpips(lpips_model, device))


def objective(vae, lpips, x: torch.Tensor, reference: torch.Tensor, alpha: float,
              budget: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-image ``(total, consistency, lpips)``, each ``(B,)``, for images ``x`` and the protected ``reference``
    (both in [0, 1]); the consistency term is the MSE in the model's [-1, 1] units, as the release computes it."""
    reconstruction = decode_latents(vae, encode_images(vae, x.to(vae.dtype)), clamp=False)
    consistency = (2 * (x.float() - reconstruction.float())).pow(2).flatten(1).mean(1)
    distance = lpips(x.float(), reference.float()).float()
    return consistency + alpha * (distance - budget).clamp_min(0), consistency, distance


def purify(images: torch.Tensor, *, models, generators: Sequence[torch.Generator] | None = None, iters: int = 3000,
           lr: float = 0.01, lpips_weight: float = 0.1, lpips_budget: float = 0.1, noise: float = 0.05,
           **_: Any) -> tuple[torch.Tensor, list[dict]]:
    """Purify ``(B, 3, H, W)`` images in [0, 1]; returns images and per-image objective stats. ``noise`` is the
    starting noise's σ as a fraction of the [0, 1] range (0.05 = the release's ``pur_noise`` 0.1 on [-1, 1])."""
    vae, lpips = models.pipe.vae, models.lpips
    height, width = images.shape[-2:]
    reference = pad_to_multiple(images.detach().float(), 8)
    generators = list(generators) if generators is not None else [None] * images.shape[0]
    start_noise = per_image_noise(reference.shape[1:], generators, reference) if noise > 0 else 0.0
    y = (reference * 2 - 1 + 2 * noise * start_noise).requires_grad_(True)
    optimizer = torch.optim.Adam([y], lr=lr, eps=ADAM_EPS)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, iters), eta_min=LR_FLOOR)
    with torch.enable_grad():  # the runner calls purifiers under no_grad; this one optimizes
        with torch.no_grad():
            start = objective(vae, lpips, reference, reference, lpips_weight, lpips_budget)[0]
        for _ in range(iters):
            optimizer.zero_grad()
            objective(vae, lpips, (y + 1) / 2, reference, lpips_weight, lpips_budget)[0].sum().backward()
            optimizer.step()
            schedule.step()
            with torch.no_grad():
                y.clamp_(-1, 1)
    with torch.no_grad():
        x = ((y + 1) / 2).clamp(0, 1)
        total, consistency, distance = objective(vae, lpips, x, reference, lpips_weight, lpips_budget)
    stats = [{"objective_start": float(s), "objective": float(o), "consistency": float(c), "lpips": float(d)}
             for s, o, c, d in zip(start, total, consistency, distance)]
    return x.detach()[..., :height, :width], stats
