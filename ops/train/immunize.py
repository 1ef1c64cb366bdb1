"""IMMA model immunization (Zheng & Yeh, "IMMA: Immunizing text-to-image models against malicious adaptation",
ECCV 2024; appendix = paper 003) against Textual Inversion, DreamBooth and DreamBooth-LoRA.

Bi-level problem (paper 003 main text, Eq. 3): ``θ* = argmax_θ L_A(x, c; θ, φ*(θ))`` s.t.
``φ*(θ) = argmin_φ L_A(x, c; θ, φ)``, where ``L_A`` is the adaptation method's own denoising loss on the target
concept's images ``x`` (prompt ``c``), ``φ`` what the adaptation trains (TI: the new token's embedding; DreamBooth:
the whole UNet; LoRA: rank-r adapters on ``to_q/k/v/out.0``) and ``θ`` the UNet attention weights (every parameter
whose name holds ``to_q``, ``to_k``, ``to_v`` or ``to_out``; self- and cross-attention, weights and biases).

Solved as in the authors' released code, by alternating first-order steps on fresh batches: ``inner_steps``
AdamW steps that *minimise* ``L_A`` w.r.t. φ, then ``outer_steps`` AdamW steps that *maximise* it w.r.t. θ
(gradient of ``−L_A``; the implicit dependence of φ* on θ is dropped). Defaults (paper 003 A4 / the authors'
scripts for SD v1-4): 1000 steps in all (inner and outer alternate 1:1), batch 1, t ~ U[0, T), AdamW β 0.9/0.999,
weight decay 1e-2, constant lr —

=========  ==============  ===============  ==============
against    adaptation lr   defence lr       grad-norm clip
=========  ==============  ===============  ==============
ti         5e-4            1e-6             none
db         5e-6            2e-5             1.0
lora       5e-6 (rank 4)   2e-5             1.0
=========  ==============  ===============  ==============

DreamBooth runs without prior preservation, as the authors' script does. The immunized model is the *base* model
with only its attention weights replaced: the adaptation's own state (TI token, LoRA adapters, DreamBooth's drift of
the non-attention UNet weights) is thrown away, as the released code saves only the attention tensors. Several
concepts are immunized sequentially, each stage starting from the previous stage's weights (paper 003 A1.3).

Reuse: the adaptation methods are the training core's :class:`~.loop.Trainable` objects
(:class:`~.textual_inversion.TextualInversion`, :class:`~.dreambooth_model.DreamBoothModel` with or without LoRA),
the loss is :func:`~.loop.masked_step_loss` (→ :mod:`ops.diffusion`), batches are drawn exactly as
:func:`~.loop.train` draws them (seeded :class:`~.loop.DataOrder`, one CPU generator), and the optimizers come from
:func:`~.loop.make_optimizer`. Only the alternation (two optimizers, the sign of the outer step) is new here.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch

from .. import diffusion
from ..errors import CloakError, UsageError
from ..models import cast
from .data import OBJECT_TEMPLATES, InstanceData, fill_templates
from .loop import (CHECKPOINT_DIR, LOG_NAME, DataOrder, TrainConfig, latent_cache, training_scheduler,
                   check_finite, latest_checkpoint, make_optimizer, masked_step_loss)

AGAINST = ("ti", "db", "lora")
ATTENTION_KEYS = ("to_q", "to_k", "to_v", "to_out")
IMMUNIZED_NAME = "immunized_attention.safetensors"
DEFAULTS: dict[str, dict[str, Any]] = {
    "ti": {"lr": 5e-4, "defence_lr": 1e-6, "max_grad_norm": None},
    "db": {"lr": 5e-6, "defence_lr": 2e-5, "max_grad_norm": 1.0},
    "lora": {"lr": 5e-6, "defence_lr": 2e-5, "max_grad_norm": 1.0},
}


@dataclass
class ImmunizeConfig:
    """Hyper-parameters of one immunization stage; ``None`` means the per-method default of :data:`DEFAULTS`."""

    against: str = "ti"
    steps: int = 1000
    inner_steps: int = 1
    outer_steps: int = 1
    lr: float | None = None
    defence_lr: float | None = None
    max_grad_norm: float | None = field(default=None)
    clip: bool = True  # False: no clipping even where the method's default clips
    batch_size: int = 1
    weight_decay: float = 1e-2
    lora_rank: int = 4
    cross_attention_only: bool = False
    sample_latents: bool = True
    seed: int = 0
    checkpoint_every: int = 250
    log_every: int = 1

    def resolved(self) -> "ImmunizeConfig":
        if self.against not in AGAINST:
            raise UsageError(f"--against {self.against!r}: choose one of {', '.join(AGAINST)}")
        base = DEFAULTS[self.against]
        clip = self.max_grad_norm if self.max_grad_norm is not None else base["max_grad_norm"]
        return replace(self, lr=self.lr if self.lr is not None else base["lr"],
                       defence_lr=self.defence_lr if self.defence_lr is not None else base["defence_lr"],
                       max_grad_norm=clip if self.clip else None)

    def check(self) -> None:
        if min(self.steps, self.inner_steps, self.outer_steps, self.batch_size, self.lora_rank) < 1:
            raise UsageError("--steps, --inner-steps, --outer-steps, --batch-size and --lora-rank must be >= 1")
        if not (self.lr and self.lr > 0 and self.defence_lr and self.defence_lr > 0):
            raise UsageError("--lr and --defence-lr must be > 0")

    def resume_key(self) -> dict[str, Any]:
        keep = asdict(self)
        for name in ("steps", "checkpoint_every", "log_every"):
            keep.pop(name)
        return keep


@dataclass
class ImmunizeResult:
    state: dict[str, torch.Tensor]  # the immunized attention tensors (CPU, fp32), keyed by UNet parameter name
    steps_done: int
    resumed_from: int | None
    inner_loss: float
    outer_loss: float
    seconds: float


# ------------------------------------------------------------------------------------------ attention weights
def attention_parameters(unet, cross_attention_only: bool = False) -> dict[str, torch.nn.Parameter]:
    """The UNet parameters IMMA immunizes: names holding ``to_q/to_k/to_v/to_out`` (``attn2`` only with
    ``cross_attention_only``), LoRA adapter weights excluded. Call before adapters are added (names stay plain)."""
    found = {}
    for name, param in unet.named_parameters():
        parts = name.split(".")
        if "lora" in name or not any(key in parts for key in ATTENTION_KEYS):
            continue
        if cross_attention_only and "attn2" not in parts:
            continue
        found[name] = param
    if not found:
        raise CloakError("the UNet has no attention projections (to_q/to_k/to_v/to_out): nothing to immunize")
    return found


def attention_state(unet, cross_attention_only: bool = False) -> dict[str, torch.Tensor]:
    """CPU fp32 copies of :func:`attention_parameters`."""
    return {name: p.detach().float().cpu().clone()
            for name, p in attention_parameters(unet, cross_attention_only).items()}


def apply_attention_state(unet, state: dict[str, torch.Tensor]) -> None:
    """Copy immunized attention tensors into ``unet`` (names and shapes must match: same base architecture)."""
    params = dict(unet.named_parameters())
    for name, value in state.items():
        if name not in params or params[name].shape != value.shape:
            raise CloakError(f"immunized weight {name} does not fit this UNet (other architecture?): immunize and "
                             "load with the same base model")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))


def save_attention_state(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Atomic, byte-stable ``safetensors`` file of the immunized attention tensors (see io.save_safetensors)."""
    from ..io import save_safetensors

    save_safetensors(state, path, metadata or {})


def load_attention_state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


# ------------------------------------------------------------------------------------------- adaptation
@dataclass
class Adaptation:
    """What the attacker trains: a Trainable over a working copy of the pipeline, and its prompts."""

    trainable: Any
    prompts: list[str]
    pipe: Any


def working_copy(pipe):
    """A pipeline sharing VAE/scheduler with ``pipe`` but with its own fp32 UNet, text encoder and tokenizer, so
    the adaptation (new token rows, LoRA adapters, DreamBooth drift) never touches ``pipe``."""
    components = dict(pipe.components)
    for name in ("unet", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"):
        if components.get(name) is not None:
            components[name] = copy.deepcopy(components[name])
    for name in ("unet", "text_encoder", "text_encoder_2"):
        if components.get(name) is not None:
            components[name] = cast(components[name], torch.float32)
    work = type(pipe)(**components)
    if hasattr(work, "set_progress_bar_config"):
        work.set_progress_bar_config(disable=True)
    return work


def make_adaptation(work, against: str, *, token: str, class_word: str, instance_prompt: str | None,
                    lora_rank: int, batch_size: int, resolution: int) -> Adaptation:
    """TI: new token ``token`` initialised from ``class_word``, the TI object templates (the authors' TI set-up).
    db/lora: ``instance_prompt`` (default ``"a photo of {token} {class_word}"``), no prior preservation."""
    if against == "ti":
        from .textual_inversion import TextualInversion

        return Adaptation(TextualInversion(work, token, class_word, 1, resolution),
                          fill_templates(OBJECT_TEMPLATES, token), work)
    from .dreambooth_model import DreamBoothModel, DreamBoothSettings

    prompt = instance_prompt or f"a photo of {token} {class_word}"
    settings = DreamBoothSettings(instance_prompt=prompt, class_prompt=None, prior_weight=0.0,
                                  lora_rank=lora_rank if against == "lora" else None)
    return Adaptation(DreamBoothModel(work, settings, batch_size=batch_size), [prompt], work)


def _adaptation_loss(work, scheduler, trainable, prompts: list[str], mean: torch.Tensor, std: torch.Tensor,
                     order: DataOrder, batch_size: int, sample_latents: bool, generator: torch.Generator
                     ) -> tuple[torch.Tensor, list[int]]:
    """One batch of the adaptation loss and its timesteps, with the random draws in :func:`~.loop.train`'s
    order."""
    device = work.unet.device
    index = order.next(batch_size, generator)
    batch_mean, batch_std = mean[index], std[index]
    latent_noise = torch.randn(batch_mean.shape, generator=generator) if sample_latents else None
    timesteps = diffusion.sample_timesteps(batch_size, num_timesteps=diffusion.num_train_timesteps(scheduler),
                                           generator=generator)
    noise = torch.randn(batch_mean.shape, generator=generator).to(device)
    choice = torch.randint(len(prompts), (batch_size,), generator=generator).tolist()
    latents = batch_mean + batch_std * latent_noise.to(device) if latent_noise is not None else batch_mean
    text, unet_kwargs = trainable.condition([prompts[i] for i in choice])
    loss, _, _ = masked_step_loss(work.unet, scheduler, latents, text, timesteps.to(device), noise, "none", None,
                                  **unet_kwargs)
    loss = loss.mean()
    extra = trainable.extra_loss(generator)
    return (loss + extra if extra is not None else loss), timesteps.tolist()


def _optimizer(params: list[torch.Tensor], lr: float, config: ImmunizeConfig):
    return make_optimizer(params, TrainConfig(lr=lr, weight_decay=config.weight_decay))


# ------------------------------------------------------------------------------------------------- stage
def immunize(pipe, data: InstanceData, config: ImmunizeConfig, out_dir: Path, *, token: str = "<R*>",
             class_word: str = "object", instance_prompt: str | None = None,
             init_state: dict[str, torch.Tensor] | None = None, resume: bool = False,
             on_progress: Callable[[int, int, dict[str, Any]], None] | None = None,
             stop_after: int | None = None) -> ImmunizeResult:
    """One IMMA stage on the concept in ``data`` (images ``(N, 3, R, R)`` in [0, 1]); ``pipe`` is not modified.

    ``init_state`` (attention tensors of an earlier stage) is applied to the working copy first. Writes
    ``out_dir/train_log.jsonl`` (step, phase inner|outer, t, loss, lr) and ``out_dir/checkpoints/step-N.pt``
    (``--resume`` continues bit-exactly). Returns the immunized attention tensors; see the module docstring.
    """
    config = config.resolved()
    config.check()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    work = working_copy(pipe)
    if init_state is not None:
        apply_attention_state(work.unet, init_state)
    defended = attention_parameters(work.unet, config.cross_attention_only)  # before LoRA wraps the layers
    names = list(defended)
    adaptation = make_adaptation(work, config.against, token=token, class_word=class_word,
                                 instance_prompt=instance_prompt, lora_rank=config.lora_rank,
                                 batch_size=config.batch_size, resolution=int(data.images.shape[-1]))
    trainable = adaptation.trainable
    inner_params = trainable.parameters()
    outer_params = list(defended.values())
    inner_ids = {id(p) for p in inner_params}
    inner_opt = _optimizer(inner_params, config.lr, config)
    outer_opt = _optimizer(outer_params, config.defence_lr, config)
    scheduler = training_scheduler(work)
    mean, std = latent_cache(work.vae, data.images, work.unet.device)
    generator = torch.Generator().manual_seed(config.seed)
    order = DataOrder(len(data))
    step, resumed_from = 0, None
    log_path = out_dir / LOG_NAME

    if resume and (checkpoint := latest_checkpoint(out_dir)) is not None:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        if (state["config"] != config.resume_key() or state["names"] != data.names
                or state["adaptation"] != [token, class_word, instance_prompt or ""]):
            raise CloakError(f"{checkpoint} was written with other settings or images; resume with the same ones, "
                             "or start fresh (--overwrite)")
        trainable.load_state_dict(state["trainable"])
        apply_attention_state(work.unet, state["attention"])
        inner_opt.load_state_dict(state["inner_optimizer"])
        outer_opt.load_state_dict(state["outer_optimizer"])
        generator.set_state(state["generator"])
        order.order, order.position = state["order"], state["position"]
        step = resumed_from = int(state["step"])
        kept = [line for line in log_path.read_text().splitlines() if line.strip()
                and json.loads(line)["step"] <= step] if log_path.exists() else []
        log_path.write_text("".join(line + "\n" for line in kept))
    else:
        log_path.write_text("")

    cycle = config.inner_steps + config.outer_steps
    losses = {"inner": float("nan"), "outer": float("nan")}
    with log_path.open("a") as log_file:
        while step < config.steps and (stop_after is None or step < stop_after):
            phase = "inner" if step % cycle < config.inner_steps else "outer"
            # DreamBooth trains the attention weights too in its inner step (they are part of its UNet)
            for p in inner_params:
                p.requires_grad_(phase == "inner")
            for p in outer_params:
                p.requires_grad_(phase == "outer" or (phase == "inner" and id(p) in inner_ids))
            params, optimizer = (inner_params, inner_opt) if phase == "inner" else (outer_params, outer_opt)
            optimizer.zero_grad(set_to_none=True)
            loss, timesteps = _adaptation_loss(work, scheduler, trainable, adaptation.prompts, mean, std, order,
                                               config.batch_size, config.sample_latents, generator)
            (loss if phase == "inner" else -loss).backward()
            if config.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            trainable.after_step()
            step += 1
            value = float(loss.detach())
            check_finite(value)
            losses[phase] = value
            record = {"step": step, "phase": phase, "t": timesteps, "loss": value,
                      "lr": config.lr if phase == "inner" else config.defence_lr}
            if step % config.log_every == 0 or step == config.steps:
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
            at_stop = stop_after is not None and step == stop_after
            if (config.checkpoint_every and step % config.checkpoint_every == 0) or at_stop or step == config.steps:
                _save_checkpoint(out_dir, step, trainable, defended, inner_opt, outer_opt, generator, order, config,
                                 data, [token, class_word, instance_prompt or ""])
            if on_progress is not None:
                on_progress(step, config.steps, record)
    state = {name: defended[name].detach().float().cpu().clone() for name in names}
    return ImmunizeResult(state, step, resumed_from, losses["inner"], losses["outer"],
                          time.perf_counter() - started)


def _save_checkpoint(out_dir: Path, step: int, trainable, defended: dict[str, torch.Tensor], inner_opt, outer_opt,
                     generator: torch.Generator, order: DataOrder, config: ImmunizeConfig, data: InstanceData,
                     adaptation: list[str]) -> None:
    path = out_dir / CHECKPOINT_DIR / f"step-{step:06d}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"step": step, "trainable": {k: v.detach().cpu().clone() for k, v in trainable.state_dict().items()},
             "attention": {k: v.detach().cpu().clone() for k, v in defended.items()},
             "inner_optimizer": inner_opt.state_dict(), "outer_optimizer": outer_opt.state_dict(),
             "generator": generator.get_state(), "order": list(order.order), "position": order.position,
             "config": config.resume_key(), "names": list(data.names), "adaptation": adaptation}
    temporary = path.with_suffix(".tmp")
    torch.save(state, temporary)
    temporary.replace(path)
    for old in sorted(path.parent.glob("step-*.pt"))[:-2]:
        old.unlink()


# --------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def adaptation_loss(work, trainable, prompts: list[str], data: InstanceData, *, draws: int = 32,
                    seed: int = 1234) -> float:
    """Mean adaptation loss over ``draws`` fixed (image, t, noise, prompt) draws — the same draws for any model,
    so an immunized and a plain model adapted alike can be compared (higher = the concept is learnt worse)."""
    scheduler = training_scheduler(work)
    mean, std = latent_cache(work.vae, data.images, work.unet.device)
    generator = torch.Generator().manual_seed(seed)
    order = DataOrder(len(data))
    values = [float(_adaptation_loss(work, scheduler, trainable, prompts, mean, std, order, 1, False, generator)[0])
              for _ in range(draws)]
    return sum(values) / len(values)


def adapted_loss(pipe, state: dict[str, torch.Tensor] | None, data: InstanceData, against: str, out_dir: Path, *,
                 steps: int, lr: float, token: str, class_word: str = "object", instance_prompt: str | None = None,
                 lora_rank: int = 4, seed: int = 0, draws: int = 16) -> float:
    """Adapt a copy of ``pipe`` (with the attention tensors ``state`` applied, or the plain model for ``None``) on
    ``data`` for ``steps`` steps of the shared training loop, then return :func:`adaptation_loss`. Same arguments
    → same batches, timesteps and noise for both models, so the two numbers compare directly (IMMA's check)."""
    work = working_copy(pipe)
    if state is not None:
        apply_attention_state(work.unet, state)
    from .loop import train

    adaptation = make_adaptation(work, against, token=token, class_word=class_word, instance_prompt=instance_prompt,
                                 lora_rank=lora_rank, batch_size=1, resolution=int(data.images.shape[-1]))
    train(work, adaptation.trainable, data, adaptation.prompts,
          TrainConfig(steps=steps, lr=lr, seed=seed, checkpoint_every=0, snapshot_every=0), out_dir)
    return adaptation_loss(work, adaptation.trainable, adaptation.prompts, data, draws=draws, seed=seed + 1234)
