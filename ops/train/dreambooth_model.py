"""DreamBooth (full UNet, optionally the text encoder) or LoRA as a :class:`~.loop.Trainable` of the shared training
loop, plus the class images of prior preservation and the LoRA file. ``cloak train-db``'s folder-level run (data,
class images, resume checks, manifest) is :mod:`ops.commands.train_db`.

* DreamBooth (Ruiz et al. 2023) with prior preservation, as paper 004 Eq. 2 / paper 001 A.1 write it:
  ``L = ‖f(z_t, t, c_inst) − y‖² + λ ‖f(z̄_t, t̄, c_class) − ȳ‖²`` with λ = 1.0, 200 class images generated once by
  the base model from the class prompt, AdamW lr 5e-7 constant (β 0.9/0.999, weight decay 1e-2, grad-norm clip 1),
  batch 1 instance + 1 class image, 1000 steps, text encoder trained — the settings of paper 001's released run
  (DiffShortcut ``scripts/sub/train/full.sh``: ``--train_text_encoder --train_batch_size=1
  --with_prior_preservation --prior_loss_weight=1.0 --learning_rate=5e-7 --lr_scheduler=constant
  --num_class_images=200 --max_train_steps=1000 --resolution=512 --center_crop``; ``train_dreambooth.py``
  ``collate_fn`` concatenates the instance and class examples, so batch 1 = 1 + 1). :data:`.presets.DREAMBOOTH`
  holds them.
  That script also passes ``--use_8bit_adam --mixed_precision=bf16 --gradient_checkpointing`` (CUDA memory
  settings; ``cloak train-db --use-8bit-adam --mixed-precision bf16 --gradient-checkpointing``, not defaults here
  because they need a GPU). Where we differ: the instance resize is Pillow bicubic, theirs torchvision bilinear.
* LoRA (paper 000 App. P): rank-4 adapters on the UNet attention projections (``to_q/k/v/out.0``; the text encoder's
  ``q/k/v/out_proj`` with ``train_text_encoder``) via peft; the base weights stay frozen. Paper 000 uses no prior
  preservation and a prompt with a dummy "*" token; the learning rate is not stated there — we default to 1e-4
  (diffusers' LoRA examples use 1e-4 to 5e-4; :data:`.presets.LORA`). Saved as ``pytorch_lora_weights.safetensors``
  for diffusers ``load_lora_weights``.
* DiffShortcut (paper 001 Alg. 1 line 7): ``neg_token`` → instance prompt + ", {neg}", class prompt + ", without
  {neg}" (:func:`ops.prompts.decoupled_prompts`).

The instance term, SZT options (t-sampler, LM/IM/LIM/ZM masks, JPEG via :mod:`.data`), checkpoints, ``--resume``
and ``train_log.jsonl`` all come from :func:`ops.train.loop.train`; the prior term is
:func:`ops.train.dreambooth.dreambooth_loss` on the class batch, added through the loop's ``extra_loss`` hook.
The class term draws t ~ U[0, T) whatever the instance sampler (class images are clean; SZT restricts only the
poisoned instance data) — our choice, as no paper combines SZT with prior preservation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import diffusion
from ..errors import CloakError, UsageError
from ..models import cast
from ..prompts import decoupled_prompts
from .dreambooth import dreambooth_loss
from .loop import training_scheduler
from .presets import DREAMBOOTH

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
PIPELINE_DIR = "pipeline"
UNET_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


@dataclass
class DreamBoothSettings:
    """What a DreamBooth/LoRA run trains and saves (the loop's own settings are in :class:`~.loop.TrainConfig`).

    Defaults: :data:`.presets.DREAMBOOTH` (``cloak train-db`` resolves them, or :data:`.presets.LORA`, per run)."""

    instance_prompt: str = DREAMBOOTH["instance_prompt"]
    class_prompt: str | None = DREAMBOOTH["class_prompt"]
    neg_token: str | None = None
    lora_rank: int | None = None  # None = full fine-tuning
    train_text_encoder: bool = False  # opt-in for library callers (immunize); train-db resolves DREAMBOOTH / LORA
    prior_weight: float = DREAMBOOTH["prior_weight"]
    num_class_images: int = DREAMBOOTH["num_class_images"]
    class_steps: int = DREAMBOOTH["class_steps"]
    class_guidance: float = DREAMBOOTH["class_guidance"]
    gradient_checkpointing: bool = False
    mixed_precision: str = "no"  # no | bf16 | fp16 (autocast; fp32 master weights)
    save_trained_only: bool = False

    def prompts(self) -> tuple[str, str | None]:
        """The training prompts (DiffShortcut-decoupled when ``neg_token`` is set)."""
        if self.class_prompt is None:
            return decoupled_prompts(self.instance_prompt, "", self.neg_token)[0], None
        return decoupled_prompts(self.instance_prompt, self.class_prompt, self.neg_token)


class DreamBoothModel:
    """A :class:`~.loop.Trainable`: the UNet (+ text encoder), full or as LoRA adapters, plus the prior term.

    ``class_latents`` is the cached VAE posterior ``(mean, std)`` of the class images, each ``(M, 4, h, w)``.
    """

    def __init__(self, pipe, settings: DreamBoothSettings, *, batch_size: int = 2,
                 class_latents: tuple[torch.Tensor, torch.Tensor] | None = None, sample_latents: bool = True,
                 seed: int = 0):
        self.pipe, self.settings, self.batch_size = pipe, settings, batch_size
        self.instance_prompt, self.class_prompt = settings.prompts()
        self.class_latents = class_latents if settings.prior_weight else None
        self.sample_latents = sample_latents
        self._text_cache: dict[tuple[str, ...], torch.Tensor] = {}
        if settings.prior_weight and class_latents is None:
            raise UsageError("prior preservation needs class images (give --class-prompt, or --prior-weight 0)")
        self.scheduler = training_scheduler(pipe)
        self.modules = {"unet": pipe.unet}
        if settings.train_text_encoder:
            self.modules["text_encoder"] = pipe.text_encoder
        pipe.vae.requires_grad_(False)
        pipe.text_encoder.requires_grad_(False)
        if settings.lora_rank is not None:
            with torch.random.fork_rng(devices=[]):  # adapter init is a function of the run's seed
                torch.manual_seed(seed)
                self._add_lora(settings.lora_rank)
        else:
            for module in self.modules.values():
                module.requires_grad_(True)
        for module in self.modules.values():
            module.train()
        if settings.gradient_checkpointing:
            pipe.unet.enable_gradient_checkpointing()
            if settings.train_text_encoder:
                encoder = pipe.text_encoder  # transformers >= 5 renamed the switch
                getattr(encoder, "activation_checkpointing_enable", encoder.gradient_checkpointing_enable)()
        self._named = [(f"{name}.{key}", p) for name, module in self.modules.items()
                       for key, p in module.named_parameters() if p.requires_grad]

    def _add_lora(self, rank: int) -> None:
        from peft import LoraConfig

        if rank < 1:
            raise UsageError(f"--lora rank must be >= 1, got {rank}")
        self.pipe.unet.requires_grad_(False)
        if self.settings.mixed_precision != "no":
            # frozen base weights in the compute dtype (the diffusers LoRA examples do this); adapters stay fp32
            half = {"bf16": torch.bfloat16, "fp16": torch.float16}[self.settings.mixed_precision]
            for module in (self.pipe.unet, self.pipe.text_encoder, self.pipe.vae):
                cast(module, half)
        self.pipe.unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                              target_modules=UNET_LORA_TARGETS))
        if self.settings.train_text_encoder:
            self.pipe.text_encoder.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                                          target_modules=TEXT_LORA_TARGETS))
        for module in self.modules.values():
            for parameter in module.parameters():
                if parameter.requires_grad:
                    parameter.data = parameter.data.float()

    # ------------------------------------------------------------------------------------------- Trainable
    def parameters(self) -> list[torch.Tensor]:
        return [p for _, p in self._named]

    def condition(self, prompts: list[str]) -> tuple[torch.Tensor, dict[str, Any]]:
        if self.settings.train_text_encoder:
            return diffusion.encode_prompts(self.pipe, prompts), {}
        key = tuple(prompts)  # a frozen text encoder: each prompt batch is encoded once per run
        if key not in self._text_cache:
            with torch.no_grad():
                self._text_cache[key] = diffusion.encode_prompts(self.pipe, prompts)
        return self._text_cache[key], {}

    def after_step(self) -> None:
        return None

    def extra_loss(self, generator: torch.Generator, rows: slice | None = None) -> torch.Tensor | None:
        """``λ ×`` the denoising loss of a random class batch under the class prompt (paper 004 Eq. 2). The class
        batch (``batch_size`` images, their latent samples, timesteps and noise) is drawn in full; ``rows`` (a
        data-parallel process's block) keeps only those rows' share ``Σ rows ÷ batch_size``."""
        if self.class_latents is None:
            return None
        mean, std = self.class_latents
        index = torch.randint(len(mean), (self.batch_size,), generator=generator)
        latents = mean[index]
        if self.sample_latents:
            latents = latents + std[index] * torch.randn(latents.shape, generator=generator).to(latents.device)
        text, _ = self.condition([self.class_prompt])
        prior = dreambooth_loss(self.pipe.unet, self.scheduler, latents, text, generator=generator, rows=rows)
        return self.settings.prior_weight * prior

    def grad_norm(self) -> float:
        return sum(float(p.grad.float().pow(2).sum()) for p in self.parameters() if p.grad is not None) ** 0.5

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: p.detach() for name, p in self._named}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, p in self._named:
                p.copy_(state[name])

    def save(self, folder: Path, step: int, final: bool) -> list[str]:
        target = Path(folder) if final else Path(folder) / "snapshots" / f"step-{step:06d}"
        rel = "" if final else f"snapshots/step-{step:06d}/"
        for module in self.modules.values():
            module.eval()
        try:
            if self.settings.lora_rank is not None:
                save_lora(self.pipe, target, self.settings.train_text_encoder)
                return [rel + LORA_WEIGHTS]
            if self.settings.save_trained_only or not final:
                written = []
                for name, module in self.modules.items():
                    module.save_pretrained(str(target / name), safe_serialization=True)
                    written.append(rel + name)
                return written
            self.pipe.save_pretrained(str(target / PIPELINE_DIR), safe_serialization=True)
            return [PIPELINE_DIR]
        finally:
            for module in self.modules.values():
                module.train()


def save_lora(pipe, folder: Path, with_text_encoder: bool) -> Path:
    """Write the pipeline's peft adapters as ``folder/pytorch_lora_weights.safetensors`` (diffusers format)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = {"unet_lora_layers": convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))}
    if with_text_encoder:
        layers["text_encoder_lora_layers"] = convert_state_dict_to_diffusers(
            get_peft_model_state_dict(pipe.text_encoder))
    folder.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(str(folder), safe_serialization=True, **layers)
    return folder / LORA_WEIGHTS


# ------------------------------------------------------------------------------------------- class images
def ensure_class_images(pipe, class_prompt: str, folder: Path, count: int, *, model_record: dict[str, Any],
                        seed: int = 0, steps: int = 50, guidance: float = 7.5, resolution: int | None = None,
                        batch_size: int = 4, on_event: Callable[[str, str, dict], None] | None = None) -> list[Path]:
    """Generate (once; reruns skip finished images) ``count`` class images with the *base* model (DDIM, η = 0).

    Images are ``folder/p00_iKKK.png`` from ``cloak generate``'s own loop, so an interrupted run resumes and a
    cache folder can be shared by every concept of the same class and model.
    """
    from ..commands.generate import generate_folder
    from ..generate import plan_jobs, set_scheduler
    from ..manifest import Manifest

    jobs = plan_jobs([class_prompt], "", count, seed)
    settings = {"steps": steps, "guidance": guidance, "height": resolution, "width": resolution, "eta": 0.0,
                "lora_scale": None}
    manifest = Manifest(folder, "train-db class images", {"model": model_record, "scheduler": "ddim",
                                                          "dtype": str(pipe.unet.dtype), **settings}, seed=seed,
                        model=model_record)
    original = pipe.scheduler
    set_scheduler(pipe, "ddim")
    try:
        summary = generate_folder(pipe, jobs, folder, manifest, settings=settings, batch_size=batch_size,
                                  **({"on_event": on_event} if on_event else {}))
    finally:
        pipe.scheduler = original
    if summary.failed:
        raise CloakError(f"class image generation failed: {summary.failed[0][1]}")
    return [Path(folder) / job.name for job in jobs]


def class_image_paths(class_prompt: str, folder: Path, count: int, seed: int) -> list[Path]:
    """Where :func:`ensure_class_images` puts the class images, without making them (a data-parallel run's other
    processes read the images rank 0 made)."""
    from ..generate import plan_jobs

    return [Path(folder) / job.name for job in plan_jobs([class_prompt], "", count, seed)]


def autocast_context(mixed_precision: str, device: torch.device):
    """bf16/fp16 autocast around the whole loop (master weights stay fp32). fp16 has no loss scaling here."""
    if mixed_precision == "no":
        return contextlib.nullcontext()
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    if mixed_precision not in dtypes:
        raise UsageError(f"--mixed-precision {mixed_precision!r}: choose no, bf16 or fp16")
    return torch.autocast(device_type=device.type, dtype=dtypes[mixed_precision])
