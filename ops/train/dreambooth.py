"""DreamBooth fine-tuning with prior preservation: the loss and a reusable few-steps trainer.

DreamBooth (Ruiz et al. CVPR 2023) as written in paper 004 Eq. 2:
``ℓ_θ = E[ SE(x_inst, c_inst) + λ · SE(x_class, c_class) ]`` with ``SE = ‖f_θ(z_t, t, c) − target‖²`` from
:func:`ops.diffusion.diffusion_loss` (ε or v target from the scheduler). Published defaults (papers 001 A.1, 004 §4,
Anti-DreamBooth): UNet + text encoder trained, AdamW lr 5e-7 (betas 0.9/0.999, weight decay 1e-2, eps 1e-8),
prior weight λ = 1.0, batch 2, gradient-norm clip 1.0, instance prompt "a photo of sks person", class prompt
"a photo of person", t ~ U[0, 1000), latents sampled from the VAE posterior.

Two entry points:
  * :func:`dreambooth_loss` — the scalar loss on latents + text embeddings (differentiable in both, so callers may
    train the UNet, the text encoder, or take gradients w.r.t. the images that produced the latents);
  * :class:`DreamBoothTrainer` — owns an optimizer over a :class:`Surrogate`'s trainable parts and runs
    ``step(instance_images)`` / ``train(instance_images, steps)``. Set-level poisons (ASPL, FSMG, MetaCloak,
    InMark) call it for their surrogate updates; ``cloak train-db`` can drive the same object for full runs.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..diffusion import (
    diffusion_loss,
    encode_images,
    encode_prompts,
    num_train_timesteps,
    sample_timesteps,
)
from .loop import latent_cache
from .presets import DREAMBOOTH


@dataclass
class DreamBoothConfig:
    """Hyper-parameters of a DreamBooth run (defaults: :data:`.presets.DREAMBOOTH` — papers 001 A.1 / 004 §4 /
    Anti-DreamBooth — with Anti-DreamBooth's batch of 2 instance + 2 class images)."""

    instance_prompt: str = DREAMBOOTH["instance_prompt"]
    class_prompt: str = DREAMBOOTH["class_prompt"]
    learning_rate: float = DREAMBOOTH["lr"]
    prior_weight: float = DREAMBOOTH["prior_weight"]
    batch_size: int = 2
    train_text_encoder: bool = DREAMBOOTH["train_text_encoder"]
    t_range: tuple[int, int] | None = None
    max_grad_norm: float | None = DREAMBOOTH["max_grad_norm"]
    weight_decay: float = DREAMBOOTH["weight_decay"]
    sample_posterior: bool = True


@dataclass
class Surrogate:
    """The parts of a Stable Diffusion pipeline a DreamBooth surrogate needs. ``unet``/``text_encoder`` may be
    trained; ``vae``, ``tokenizer`` and ``scheduler`` are shared (never trained) between clones."""

    vae: Any
    unet: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any
    name: str = "model"
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_pipe(cls, pipe, name: str = "model") -> Surrogate:
        return cls(pipe.vae, pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.scheduler, name)

    def clone(self) -> Surrogate:
        """Deep copies of the trainable UNet and text encoder (f → f′ of ASPL); VAE/tokenizer/scheduler shared."""
        return Surrogate(self.vae, copy.deepcopy(self.unet), copy.deepcopy(self.text_encoder), self.tokenizer,
                         self.scheduler, self.name, dict(self.extra))

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        return encode_prompts(self, prompts, self.device)


def dreambooth_loss(unet, scheduler, instance_latents: torch.Tensor, instance_text: torch.Tensor,
                    class_latents: torch.Tensor | None = None, class_text: torch.Tensor | None = None, *,
                    prior_weight: float = 1.0, t_range: tuple[int, int] | None = None,
                    generator: torch.Generator | None = None, mask: torch.Tensor | None = None,
                    rows: slice | None = None) -> torch.Tensor:
    """Scalar DreamBooth loss: mean instance SE + ``prior_weight`` × mean class SE (paper 004 Eq. 2).

    ``instance_latents`` ``(B, C, h, w)`` scaled latents, ``instance_text`` ``(B or 1, 77, D)`` embeddings; the class
    pair likewise (omit it, or ``prior_weight=0``, to train without prior preservation). Timesteps are drawn
    ``U[0, T)`` (or in ``t_range``) and noise ``N(0, I)`` from ``generator`` (CPU), per sample. ``mask`` is an
    optional latent mask for the instance term (LM of paper 000 App. I). ``rows`` (a data-parallel process's block of
    the batch, :mod:`ops.train.distributed`): the draws are made for every sample, the loss only for those rows, as
    their share ``Σ rows ÷ B`` of each mean (the shares of all processes add up to the full loss).
    """
    def term(latents: torch.Tensor, text: torch.Tensor, term_mask: torch.Tensor | None) -> torch.Tensor:
        n = latents.shape[0]
        timesteps = sample_timesteps(n, num_timesteps=num_train_timesteps(scheduler), t_range=t_range,
                                     generator=generator, device=latents.device)
        noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents.device,
                                                                                          latents.dtype)
        if text.shape[0] == 1 and n > 1:
            text = text.expand(n, *text.shape[1:])
        if rows is None:
            return diffusion_loss(unet, scheduler, latents, text, timesteps, noise, term_mask).mean()
        term_mask = term_mask[rows] if term_mask is not None and term_mask.shape[0] == n else term_mask
        return diffusion_loss(unet, scheduler, latents[rows], text[rows], timesteps[rows], noise[rows],
                              term_mask).sum() / n

    loss = term(instance_latents, instance_text, mask)
    if class_latents is not None and prior_weight:
        if class_text is None:
            raise ValueError("class latents given without class text embeddings")
        loss = loss + prior_weight * term(class_latents, class_text, None)
    return loss


class DreamBoothTrainer:
    """A DreamBooth optimizer over ``surrogate`` (UNet, plus the text encoder when ``config.train_text_encoder``).

    ``class_images`` ``(M, 3, H, W)`` in [0, 1] are the prior-preservation set (see
    :func:`ops.attacks.setlevel.class_images`); their VAE posterior is encoded once (or given as
    ``class_posterior``, see :func:`encode_class_images`). Each :meth:`step` takes
    ``config.batch_size`` instance images in turn (cycling through the set it is given) and as many class images,
    and makes one AdamW update. ``parameters`` restricts training to a subset (LoRA weights, K/V projections …);
    a custom ``optimizer`` may be passed instead of the default AdamW. ``on_step(index, loss)`` is called after
    every step (spies and progress use it).
    """

    def __init__(self, surrogate: Surrogate, config: DreamBoothConfig | None = None,
                 class_images: torch.Tensor | None = None, *, generator: torch.Generator | None = None,
                 on_step: Callable[[int, float], None] | None = None, optimizer: Any = None,
                 parameters: list[torch.nn.Parameter] | None = None,
                 class_posterior: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        self.surrogate = surrogate
        self._parameters = parameters
        self.config = config or DreamBoothConfig()
        self.generator = generator
        self.on_step = on_step
        self.steps_done = 0
        self._cursor = 0
        self._class_cursor = 0
        self.optimizer = optimizer or torch.optim.AdamW(self.parameters(), lr=self.config.learning_rate,
                                                        betas=(0.9, 0.999), weight_decay=self.config.weight_decay,
                                                        eps=1e-8)
        self.class_posterior = None
        if self.config.prior_weight:
            if class_posterior is not None:
                self.class_posterior = class_posterior
            elif class_images is not None and len(class_images):
                self.class_posterior = encode_class_images(surrogate.vae, class_images)

    def parameters(self) -> list[torch.nn.Parameter]:
        """What the optimizer updates: the given ``parameters`` (e.g. LoRA weights), else UNet (+ text encoder)."""
        if self._parameters is not None:
            return list(self._parameters)
        params = list(self.surrogate.unet.parameters())
        if self.config.train_text_encoder:
            params += list(self.surrogate.text_encoder.parameters())
        return params

    def _latents(self, images: torch.Tensor) -> torch.Tensor:
        vae = self.surrogate.vae
        images = images.to(vae.device, torch.float32)
        return encode_images(vae, images, sample=self.config.sample_posterior, generator=self.generator).float()

    def _take(self, pool_size: int, cursor_name: str) -> torch.Tensor:
        start = getattr(self, cursor_name)
        index = torch.arange(start, start + self.config.batch_size) % pool_size
        setattr(self, cursor_name, (start + self.config.batch_size) % pool_size)
        return index

    def step(self, instance_images: torch.Tensor) -> float:
        """One optimizer step on instance images ``(N, 3, H, W)`` in [0, 1] (a batch is taken from them in turn)."""
        cfg, parts = self.config, self.surrogate
        unet, text_encoder = parts.unet, parts.text_encoder
        unet.train()
        text_encoder.train(cfg.train_text_encoder)
        for p in self.parameters():
            p.requires_grad_(True)
        batch = instance_images[self._take(len(instance_images), "_cursor")].detach()
        with torch.no_grad():
            latents = self._latents(batch)
        with torch.set_grad_enabled(any(p.requires_grad for p in text_encoder.parameters())):
            texts = parts.encode_prompts([cfg.instance_prompt, cfg.class_prompt])
        class_latents = None
        if self.class_posterior is not None:
            mean, std = self.class_posterior
            index = self._take(len(mean), "_class_cursor")
            class_latents = mean[index]
            if cfg.sample_posterior:  # a fresh posterior draw per step, as latent_dist.sample() would give
                noise = torch.randn(class_latents.shape, generator=self.generator).to(mean.device, mean.dtype)
                class_latents = class_latents + std[index] * noise
        loss = dreambooth_loss(unet, parts.scheduler, latents, texts[:1], class_latents, texts[1:],
                               prior_weight=cfg.prior_weight, t_range=cfg.t_range, generator=self.generator)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.parameters(), cfg.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        unet.eval()
        text_encoder.eval()
        value = float(loss.detach())
        self.steps_done += 1
        if self.on_step is not None:
            self.on_step(self.steps_done, value)
        return value

    def train(self, instance_images: torch.Tensor, steps: int) -> list[float]:
        """``steps`` optimizer steps; returns the loss of each."""
        return [self.step(instance_images) for _ in range(steps)]


def encode_class_images(vae, class_images: torch.Tensor, chunk: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled VAE posterior ``(mean, std)`` (float32) of the class images ``(M, 3, H, W)``, encoded once so every
    step only draws ``mean + std · n``; pass it as ``class_posterior`` to share it between trainers. The training
    loop's own posterior cache (:func:`.loop.latent_cache`) on the VAE's device."""
    return latent_cache(vae, class_images.float(), vae.device, chunk)

