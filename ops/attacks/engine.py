"""The shared PGD engine every attack runs on: sign steps, projection, masks, EoT, per-image randomness.

Conventions: images are float ``(B, 3, H, W)`` in [0, 1]; budgets are pixel units /255 (``eps=16`` → 16/255);
``generators`` is one CPU ``torch.Generator`` per image, and every random draw of an image (random start, timestep,
noise, EoT transform) comes from its own generator, so an image gets the same draws whatever batch it is in.

Public API (what attack modules call):

* :class:`AttackModels` — the frozen diffusion model an attack works against: ``encode(x)`` (scaled latents, grad
  flows), ``text_embeddings(batch)``, ``draw(latents, generators)`` → ``(t, ε)`` per image via
  :func:`ops.diffusion.sample_timesteps`, ``predict(z_t, t, emb)`` (handles SDXL's extra conditioning) and
  ``denoise_loss(x, generators, mask)`` — the per-sample ``‖f_θ(z_t,t,c) − target‖²`` of :mod:`ops.diffusion`.
* :func:`pgd` — the loop: ``x ← Π_{ε-ball ∩ [0,1] ∩ mask}(x ± α · sign(T(∇_x L)))`` with ``L = loss_fn(EoT(x))``
  averaged over ``eot_samples`` transform draws and ``T`` an optional gradient transform (the lf-* DCT projection).
  Returns :class:`PGDResult` with the loss of the clean and of the final images on the same fixed draws.
* :func:`pgd_step`, :func:`project_linf`, :func:`random_start`, :func:`loss_gradient` — the pieces, for set-level
  attacks that interleave PGD with model training (ASPL, MetaCloak, InMark …).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import diffusion

LossFn = Callable[[torch.Tensor, Sequence[torch.Generator]], torch.Tensor]  # (x, generators) -> per-sample (B,)
Transform = Callable[[torch.Tensor, Sequence[torch.Generator]], torch.Tensor]  # EoT: (x, generators) -> x'
GradTransform = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class PGDResult:
    """``images`` ``(B, 3, H, W)`` in [0, 1]; ``loss_start``/``loss_end`` ``(B,)`` on the same fixed draws."""

    images: torch.Tensor
    loss_start: torch.Tensor
    loss_end: torch.Tensor
    stats: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------- pieces
def to_unit(value: float) -> float:
    """A pixel-unit budget (/255) as a fraction of the [0, 1] range."""
    return float(value) / 255.0


def project_linf(images: torch.Tensor, clean: torch.Tensor, eps: float, mask: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """Project ``images`` onto ``{x : |x − clean|∞ ≤ eps/255, x ∈ [0,1]}``, and onto ``clean`` outside ``mask``.

    ``mask`` ``(B, 1, H, W)`` in [0, 1]: the perturbation is multiplied by it, so a 0 keeps a pixel exactly clean.
    """
    radius = to_unit(eps)
    delta = (images - clean).clamp_(-radius, radius)  # in place on one temporary: photo-sized at native size
    if mask is not None:
        delta.mul_(mask)
    return delta.add_(clean).clamp_(0, 1)


def random_start(clean: torch.Tensor, eps: float, generators: Sequence[torch.Generator],
                 mask: torch.Tensor | None = None) -> torch.Tensor:
    """Uniform start in the ε-ball (per-image generators), projected like every iterate."""
    radius = to_unit(eps)
    noise = torch.stack([(torch.rand(clean.shape[1:], generator=g) * 2 - 1) * radius for g in generators])
    return project_linf(clean + noise.to(clean.device, clean.dtype), clean, eps, mask)


def loss_gradient(images: torch.Tensor, loss_fn: LossFn, generators: Sequence[torch.Generator], *,
                  eot: Transform | None = None, eot_samples: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``(∇_x Σ_b L_b, L)`` of the per-sample loss, averaged over ``eot_samples`` EoT draws (images untouched)."""
    x = images.detach().requires_grad_(True)
    grad: torch.Tensor | None = None
    total = torch.zeros(x.shape[0], device=x.device)
    samples = max(1, eot_samples) if eot is not None else 1
    for _ in range(samples):
        loss = loss_fn(eot(x, generators) if eot is not None else x, generators)
        (step_grad,) = torch.autograd.grad(loss.sum(), x)
        step_grad = step_grad if samples == 1 else step_grad.div_(samples)
        grad = step_grad if grad is None else grad.add_(step_grad)  # no extra image-sized buffers
        total += loss.detach().float() / samples
    return grad, total  # type: ignore[return-value]


def pgd_step(images: torch.Tensor, grad: torch.Tensor, clean: torch.Tensor, *, eps: float, step_size: float,
             ascent: bool = True, mask: torch.Tensor | None = None, grad_transform: GradTransform | None = None,
             delta_transform: GradTransform | None = None) -> torch.Tensor:
    """One L∞ sign step of ``step_size``/255 up (``ascent``) or down the gradient, then projection.

    ``grad_transform`` acts on the gradient before the sign; ``delta_transform`` on the perturbation before the
    ε-ball projection (e.g. keeping it in a subspace).
    """
    if grad_transform is not None:
        grad = grad_transform(grad)
    if mask is not None:
        grad = grad * mask
    stepped = grad.sign().mul_(to_unit(step_size) if ascent else -to_unit(step_size)).add_(images.detach())
    if delta_transform is not None:
        stepped = clean + delta_transform(stepped - clean)
    return project_linf(stepped, clean, eps, mask).detach()


def _eval_generators(generators: Sequence[torch.Generator]) -> list[torch.Generator]:
    # fixed draws for loss_start/loss_end, derived from each image's own seed (independent of the PGD draws)
    return [torch.Generator().manual_seed((g.initial_seed() * 7919 + 104729) % 2**63) for g in generators]


@torch.no_grad()
def evaluate_loss(images: torch.Tensor, loss_fn: LossFn, generators: Sequence[torch.Generator],
                  draws: int = 4) -> torch.Tensor:
    """Mean per-sample loss over ``draws`` fixed random draws seeded from ``generators`` (no EoT); NaN for 0."""
    if draws <= 0:
        return torch.full((images.shape[0],), float("nan"))
    eval_gens = _eval_generators(generators)
    return torch.stack([loss_fn(images, eval_gens).float() for _ in range(draws)]).mean(0).cpu()


# Inner-step progress: ``ops.commands.poison`` installs a callback ``(step, total)`` for the file(s) being attacked;
# every optimization loop reports through :func:`report_step` (1-based), so the CLI can show progress inside an image.
_STEP_HOOK: contextvars.ContextVar[Callable[[int, int], None] | None] = contextvars.ContextVar("cloak_step_hook",
                                                                                               default=None)


def report_step(step: int, total: int) -> None:
    """Tell the progress display that step ``step`` of ``total`` of the current attack is done."""
    hook = _STEP_HOOK.get()
    if hook is not None:
        hook(step, total)


@contextlib.contextmanager
def step_hook(callback: Callable[[int, int], None] | None):
    """Route :func:`report_step` calls made inside the block to ``callback``."""
    token = _STEP_HOOK.set(callback)
    try:
        yield
    finally:
        _STEP_HOOK.reset(token)


def pgd(clean: torch.Tensor, loss_fn: LossFn, *, generators: Sequence[torch.Generator], eps: float = 16.0,
        step_size: float = 1.0, steps: int = 100, ascent: bool = True, random_init: bool = False,
        mask: torch.Tensor | None = None, eot: Transform | None = None, eot_samples: int = 1,
        grad_transform: GradTransform | None = None, delta_transform: GradTransform | None = None,
        start: torch.Tensor | None = None, eval_draws: int = 4, eval_fn: LossFn | None = None,
        on_step: Callable[[int, torch.Tensor], None] | None = None) -> PGDResult:
    """Projected sign-gradient ascent (``ascent=True``) or descent on ``loss_fn`` — torchattacks' PGD, batched.

    Args:
        clean: ``(B, 3, H, W)`` in [0, 1], the images to protect (the ε-ball's centre).
        loss_fn: ``(x, generators) -> (B,)`` per-sample loss; it draws its own randomness (t, ε) from the generators.
        generators: one ``torch.Generator`` per image.
        eps, step_size: L∞ radius and step in pixel units /255 (defaults 16 and 1: paper 000 App. F).
        steps: PGD iterations (100).
        random_init: start from a uniform draw in the ε-ball instead of ``clean``.
        mask: ``(B, 1, H, W)`` in {0, 1}; pixels outside stay exactly clean.
        eot, eot_samples: differentiable random transform applied before the loss, averaged over that many draws.
        grad_transform: applied to the gradient before the sign (e.g. :func:`ops.attacks.lowfreq.lowpass`).
        delta_transform: applied to the perturbation after each step, before the ε-ball projection.
        start: an explicit starting point (continue an earlier run), projected first.
        eval_fn: the loss reported as ``loss_start``/``loss_end`` when it differs from the one differentiated
            (SDS differentiates a surrogate but reports the diffusion loss).
        on_step: called as ``on_step(i, loss)`` after every step.
    """
    if clean.ndim != 4 or clean.shape[1] != 3:
        raise ValueError(f"expected images shaped (B, 3, H, W), got {tuple(clean.shape)}")
    if len(generators) != clean.shape[0]:
        raise ValueError(f"need one generator per image: {len(generators)} for {clean.shape[0]} images")
    clean = clean.detach().float()
    eval_fn = eval_fn or loss_fn
    loss_start = evaluate_loss(clean, eval_fn, generators, eval_draws)
    if start is not None:
        images = project_linf(start.detach().float(), clean, eps, mask)
    elif random_init:
        images = random_start(clean, eps, generators, mask)
        if delta_transform is not None:
            images = project_linf(clean + delta_transform(images - clean), clean, eps, mask)
    else:
        images = clean.clone()
    for index in range(steps):
        grad, loss = loss_gradient(images, loss_fn, generators, eot=eot, eot_samples=eot_samples)
        images = pgd_step(images, grad, clean, eps=eps, step_size=step_size, ascent=ascent, mask=mask,
                          grad_transform=grad_transform, delta_transform=delta_transform)
        if on_step is not None:
            on_step(index, loss)
        report_step(index + 1, steps)
    loss_end = evaluate_loss(images, eval_fn, generators, eval_draws)
    return PGDResult(images, loss_start, loss_end)


# ------------------------------------------------------------------------------------------ the model
class AttackModels:
    """The frozen diffusion model an attack targets (any diffusers SD 1.x/2.x/XL pipeline).

    ``prompt`` conditions the UNet (one embedding, computed once); ``t_range`` ``(lo, hi)`` restricts the timestep
    draw (default the whole schedule, t ~ U[0, T)); ``latent_sample`` draws from the VAE posterior instead of its
    mean; ``checkpointing`` turns on UNet/VAE gradient checkpointing (memory for compute, for big images on GPUs).

    ``view`` (a :class:`ops.attacks.resample.NativeView`, or ``None``): photos larger than the working size are
    first shrunk by one random draw of a mimic's resize (per image, from the generators ``encode`` is given, else
    the view's own), so an attack optimizes its perturbation in the photo's own pixels; images already at the
    working size pass untouched. ``ops.commands.poison`` installs one per batch (docs/poison.md, "Native size").

    The UNet/VAE dtype and device are read once, here (diffusers walks every module on each ``.dtype``/``.device``:
    ≈ 5–7 ms a read on the tiny model); call :meth:`refresh` after moving or casting the modules.
    """

    def __init__(self, pipe: Any, *, prompt: str = "a photo", t_range: tuple[int, int] | None = None,
                 latent_sample: bool = False, checkpointing: bool = False):
        self.pipe = pipe
        self.vae, self.unet, self.scheduler = pipe.vae, pipe.unet, pipe.scheduler
        for module in (self.vae, self.unet, getattr(pipe, "text_encoder", None),
                       getattr(pipe, "text_encoder_2", None)):
            if module is not None:
                module.requires_grad_(False)
                module.eval()
        if checkpointing:
            for module in (self.unet, self.vae):
                if getattr(module, "_supports_gradient_checkpointing", False):
                    module.enable_gradient_checkpointing()
        self.prompt = prompt
        self.t_range = t_range
        self.latent_sample = latent_sample
        self.num_timesteps = diffusion.num_train_timesteps(self.scheduler)
        self._embeddings: dict[str, tuple[torch.Tensor, dict[str, torch.Tensor]]] = {}
        self.view: Any = None
        self.refresh()

    def refresh(self) -> None:
        """Re-read the modules' dtype and device (after ``.to(...)``)."""
        self._device, self._dtype = self.unet.device, self.unet.dtype
        self._vae_device, self._vae_dtype = self.vae.device, self.vae.dtype

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def is_sdxl(self) -> bool:
        return getattr(self.pipe, "text_encoder_2", None) is not None

    @torch.no_grad()
    def _prompt_embeddings(self, prompt: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if prompt not in self._embeddings:
            if self.is_sdxl:
                embeds, _, pooled, _ = self.pipe.encode_prompt(prompt, device=self.device,
                                                               num_images_per_prompt=1,
                                                               do_classifier_free_guidance=False)
                self._embeddings[prompt] = (embeds, {"text_embeds": pooled})
            else:
                self._embeddings[prompt] = (diffusion.encode_prompts(self.pipe, [prompt], self.device), {})
        return self._embeddings[prompt]

    def text_embeddings(self, batch: int, prompt: str | None = None) -> torch.Tensor:
        """``(batch, 77, D)`` embeddings of ``prompt`` (default: the attack's prompt)."""
        embeds, _ = self._prompt_embeddings(self.prompt if prompt is None else prompt)
        return embeds.expand(batch, -1, -1)

    def unet_kwargs(self, batch: int, image_size: tuple[int, int], prompt: str | None = None) -> dict[str, Any]:
        """SDXL's ``added_cond_kwargs`` (pooled text + size/crop ids); empty for SD 1.x/2.x."""
        if not self.is_sdxl:
            return {}
        _, extra = self._prompt_embeddings(self.prompt if prompt is None else prompt)
        height, width = image_size
        ids = torch.tensor([[height, width, 0, 0, height, width]], device=self.device, dtype=self.dtype)
        return {"added_cond_kwargs": {"text_embeds": extra["text_embeds"].expand(batch, -1),
                                      "time_ids": ids.expand(batch, -1)}}

    def encode(self, images: torch.Tensor, generators: Sequence[torch.Generator] | None = None) -> torch.Tensor:
        """``(B, 3, H, W)`` in [0, 1] → scaled latents (float32; gradients flow back to the pixels); photos larger
        than the working size go through :attr:`view` first."""
        if self.view is not None and self.view.applies(images):
            images = self.view(images, generators)
        if self.latent_sample and generators is not None:
            mean, std = diffusion.latent_posterior(self.vae, images, device=self._vae_device, dtype=self._vae_dtype)
            eps = torch.stack([torch.randn(mean.shape[1:], generator=g) for g in generators])
            return (mean + std * eps.to(mean.device, mean.dtype)).float()
        return diffusion.encode_images(self.vae, images, device=self._vae_device, dtype=self._vae_dtype).float()

    def draw(self, latents: torch.Tensor, generators: Sequence[torch.Generator]
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-image ``(t, ε)``: timesteps ``(B,)`` (U over ``t_range``) and noise shaped like ``latents``."""
        timesteps = torch.cat([diffusion.sample_timesteps(1, num_timesteps=self.num_timesteps,
                                                          t_range=self.t_range, generator=g) for g in generators])
        noise = torch.stack([torch.randn(latents.shape[1:], generator=g) for g in generators])
        return timesteps.to(latents.device), noise.to(latents.device, latents.dtype)

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, image_size: tuple[int, int],
                prompt: str | None = None) -> torch.Tensor:
        """The denoiser output ``f_θ(z_t, t, c)`` (float32)."""
        batch = noisy.shape[0]
        out = self.unet(noisy.to(self.dtype), diffusion.timestep_for_model(self.scheduler, timesteps),
                        encoder_hidden_states=self.text_embeddings(batch, prompt).to(self.dtype),
                        **self.unet_kwargs(batch, image_size, prompt)).sample
        return out.float()

    def denoise_loss(self, images: torch.Tensor, generators: Sequence[torch.Generator],
                     mask: torch.Tensor | None = None) -> torch.Tensor:
        """AdvDM's per-sample ``‖f_θ(z'_t, t, c) − target‖²`` ``(B,)`` (paper 000 Eq. 4), latent-masked by a
        pixel ``mask`` ``(B, 1, H, W)`` if given."""
        latents = self.encode(images, generators)
        timesteps, noise = self.draw(latents, generators)
        noisy = diffusion.add_noise(self.scheduler, latents, noise, timesteps)
        size = tuple(self.view.size) if self.view is not None and self.view.applies(images) else images.shape[-2:]
        prediction = self.predict(noisy, timesteps, tuple(size))
        target = diffusion.training_target(self.scheduler, latents, noise, timesteps)
        latent_mask = diffusion.latent_mask(mask, latents.shape[-2:]) if mask is not None else None
        return diffusion.masked_mse(prediction, target, latent_mask)
