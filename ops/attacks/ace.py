"""ACE — Attacking with Consistent Errors (Mist v2's default "lunet" mode; Zheng et al., "Understanding and
Improving Adversarial Attacks on Latent Diffusion Model", 2023).

Set-level. The perturbation pulls the *noise prediction* of the fine-tuned model toward a fixed target latent, so
whatever a trainer learns from the images is a consistent, visible error:

    min_δ  E_{t,ε} ‖ε_θ(z'_t, t, c_inst) − z_target‖²,   z_target = s·E(x_target)     (METHODS: max −‖·‖²)

alternating with LoRA training of the surrogate on the perturbed set: ``epochs`` × (``pgd_steps`` PGD descent
steps on every image, then ``lora_steps`` LoRA steps — rank 4, lr 1e-4, AdamW, instance prompt, no prior term —
on the perturbed images). Defaults (Mist v2 lunet): epochs 5, pgd_steps 30, lora_steps 10, rank 4, lr 1e-4;
eps 16/255, step_size 1/255 (cloaklab's common PGD defaults). Target as ``ea``: our high-contrast ``pattern``,
``gray``, ``zero`` or an image path (resized to each photo's working size). LoRA via peft on to_q/to_k/to_v/to_out.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Sequence

import torch

from .. import diffusion
from .ea import make_target
from .engine import AttackModels, PGDResult
from .setlevel import attack_models, base_surrogate, pgd_over_set, results, start_run
from ..train.dreambooth import DreamBoothTrainer

DEFAULTS = {"eps": 16.0, "step_size": 1.0, "epochs": 5, "pgd_steps": 30, "lora_steps": 10, "lora_rank": 4,
            "lora_lr": 1e-4, "target": "pattern"}
LORA_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]


def add_lora(unet, rank: int) -> list[torch.nn.Parameter]:
    """Attach a rank-``rank`` LoRA adapter (peft) to the UNet's attention projections; returns its parameters."""
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=LORA_MODULES))
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
               eps: float = 16.0, step_size: float = 1.0, epochs: int = 5, pgd_steps: int = 30,
               lora_steps: int = 10, lora_rank: int = 4, lora_lr: float = 1e-4, target: str = "pattern",
               progress=None, **params: Any) -> list[PGDResult]:
    """Protect the set ``images`` ``[(3, H, W)]`` in [0, 1]; one result per image, in order."""
    params.pop("targets", None)
    run = start_run(images, pipe=models.pipe, generators=generators, progress=progress, prior_weight=0.0,
                    **{k: v for k, v in params.items() if k != "prior_weight"})
    surrogate = base_surrogate(models.pipe)
    lora = add_lora(surrogate.unet, lora_rank)
    config = replace(run.dreambooth, learning_rate=lora_lr, train_text_encoder=False, prior_weight=0.0)
    lora_trainer = DreamBoothTrainer(surrogate, config, None, generator=run.generator, parameters=lora)
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
