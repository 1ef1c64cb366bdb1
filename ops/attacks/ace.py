"""ACE — Attacking with Consistent Errors (Mist v2's default "lunet" mode; Zheng et al., "Understanding and
Improving Adversarial Attacks on Latent Diffusion Model", 2023).

Reference code: psyker-team/mist-v2 ``attacks/mist.py`` — ``pgd_attack`` (``mode='lunet'``), ``train_one_epoch``
and ``main``. Set-level. The perturbation pulls the *noise prediction* of the LoRA-trained surrogate toward a fixed
target latent, so whatever a trainer learns from the images is a consistent, visible error:

    min_δ  mean ‖ε_θ(z'_t, t, c_inst) − z_target‖²,   z_target = s·E(x_target)   (their ``loss = −mse``, ascended)

alternating ``epochs`` × [``pgd_steps`` sign steps on every image against a frozen copy, then ``lora_steps`` LoRA
steps of the surrogate on the perturbed images: 1 instance + 1 class image a step, instance loss + ``prior_weight``
0.1 × class loss, gradient norm clipped to 1.0, AdamW lr 1e-4, LoRA rank 4 on the UNet's attention and GEGLU
projections (lora_diffusion's ``UNET_DEFAULT_TARGET_REPLACE``), text encoder frozen (their ``train_text_encoder``
false)]. Their defaults: ``max_train_steps`` 5,
``max_adv_train_steps`` 30, ``max_f_train_steps`` 10, ``num_class_images`` 50, ``prior_loss_weight`` 0.1.

Budget, in units: mist-v2 works in [-1, 1] with ``pgd_eps`` 8/255 and ``pgd_alpha`` 0.005, i.e. 4/255 and 0.6375/255
in cloaklab's pixel units — our defaults eps 4, step_size 0.6375. (Their example scripts pass ``--pgd_eps 0.04``,
5.1/255 in pixel units; we follow the code's own default, which is what the WebUI runs; ``--eps 5.1`` gives the
scripts'.) Differences: PGD runs in minibatches instead of one image at a time (the loss is per image, so the steps
are the same); latents of the perturbed images and the target are the VAE posterior mean (mist-v2 samples the
target's posterior once); LoRA is peft's (gaussian init = lora_diffusion's normal(1/r) down, zero up) and its random
init draws from the run's seed, not the global RNG. Target as ``ea``: our high-contrast ``pattern`` (their
``MIST.png`` is not ours to ship), ``gray``, ``zero`` or an image path (resized to each photo's working size).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from .. import diffusion
from ..train.dreambooth import DreamBoothTrainer, encode_class_images
from .ea import make_target
from .engine import AttackModels, PGDResult
from .setlevel import attack_models, base_surrogate, pgd_over_set, results, start_run

DEFAULTS = {"eps": 4.0, "step_size": 0.6375, "epochs": 5, "pgd_steps": 30, "lora_steps": 10, "lora_rank": 4,
            "lora_lr": 1e-4, "target": "pattern", "prior_weight": 0.1, "num_class_images": 50,
            "train_text_encoder": False}
# lora_diffusion's inject_trainable_lora (what mist-v2 calls) wraps every Linear inside the UNet's Attention and GEGLU
# modules (UNET_DEFAULT_TARGET_REPLACE): the four attention projections and the feed-forward's GEGLU projection
LORA_MODULES = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj"]


def add_lora(unet, rank: int, generator: torch.Generator) -> list[torch.nn.Parameter]:
    """Attach a rank-``rank`` LoRA adapter (peft) to the UNet's attention and GEGLU projections; returns its
    parameters.

    peft's gaussian init draws from torch's global RNG: it runs inside a forked RNG seeded from ``generator``, so
    the adapter depends only on the run's seed and the caller's global RNG state is left as it was."""
    from peft import LoraConfig

    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    devices = [unet.device] if unet.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                    target_modules=LORA_MODULES))
    return [p for name, p in unet.named_parameters() if "lora_" in name]


def target_loss(models: AttackModels, targets: dict[tuple[int, int], torch.Tensor]):
    """``loss(x, generators, mask) -> (B,)``: ‖f_θ(z'_t, t, c) − z_target‖² (latent-masked by ``mask``)."""
    def loss(images: torch.Tensor, generators: Sequence[torch.Generator], mask=None) -> torch.Tensor:
        latents = models.encode(images, generators)
        timesteps, noise = models.draw(latents, generators)
        noisy = diffusion.add_noise(models.scheduler, latents, noise, timesteps)
        prediction = models.predict(noisy, timesteps, tuple(images.shape[-2:]))
        target = targets[tuple(images.shape[-2:])].expand_as(prediction)
        weight = diffusion.latent_mask(mask, latents.shape[-2:]) if mask is not None else None
        return diffusion.masked_mse(prediction, target, weight)
    return loss


def attack_set(images: Sequence[torch.Tensor], *, models: AttackModels, generators: Sequence[torch.Generator],
               eps: float = 4.0, step_size: float = 0.6375, epochs: int = 5, pgd_steps: int = 30,
               lora_steps: int = 10, lora_rank: int = 4, lora_lr: float = 1e-4, target: str = "pattern",
               prior_weight: float = 0.1, num_class_images: int = 50, train_text_encoder: bool = False,
               progress=None, **params: Any) -> list[PGDResult]:
    """Protect the set ``images`` ``[(3, H, W)]`` in [0, 1]; one result per image, in order."""
    params.pop("targets", None)
    run = start_run(images, pipe=models.pipe, generators=generators, progress=progress, prior_weight=prior_weight,
                    num_class_images=num_class_images, train_text_encoder=False, **params)
    surrogate = base_surrogate(models.pipe)
    lora = add_lora(surrogate.unet, lora_rank, run.generator)
    config = replace(run.dreambooth, learning_rate=lora_lr, train_text_encoder=False)
    posterior = encode_class_images(surrogate.vae, run.class_images) if run.class_images is not None else None
    lora_trainer = DreamBoothTrainer(surrogate, config, None, generator=run.generator, parameters=lora,
                                     class_posterior=posterior)
    with torch.no_grad():
        shapes = {tuple(image.shape[-2:]) for image in run.pset.clean}
        targets = {shape: models.encode(make_target(target, *shape)[None].to(models.device)) for shape in shapes}
    for epoch in range(epochs):
        frozen = attack_models(surrogate, run)
        loss = pgd_over_set(run, frozen, pgd_steps, eps=eps, step_size=step_size, ascent=False,
                            loss_fn=target_loss(frozen, targets))
        lora_trainer.train(run.pset.squares(run.resolution), lora_steps)
        run.report("ace", epoch + 1, epochs, target_loss=loss)
    frozen = attack_models(surrogate, run)
    return results(run, frozen, eps, target_loss(frozen, targets), surrogate="LoRA-trained copy",
                   objective="target loss, descending")
