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
batches are drawn and their loss reduced by :func:`~.loop.train`'s own :func:`~.loop.draw_batch` and
:func:`~.loop.batch_loss` (seeded :class:`~.loop.DataOrder`, one CPU generator; → :mod:`ops.diffusion`), and the
optimizers come from :func:`~.loop.make_optimizer`. Only the alternation (two optimizers, the sign of the outer
step) is new here.
"""

from __future__ import annotations

import contextlib
import copy
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import diffusion
from ..errors import CloakError
from ..models import cast
from . import distributed
from .data import OBJECT_TEMPLATES, InstanceData, fill_templates
from .immunize_config import (  # noqa: F401
    AGAINST,
    DEFAULT_CLASS_WORD,
    DEFAULT_TOKENS,
    DEFAULTS,
    IMMUNIZED_NAME,
    ImmunizeConfig,
    default_token,
)
from .loop import (
    LOG_NAME,
    DataOrder,
    LatentCache,
    RunState,
    TrainConfig,
    batch_loss,
    check_finite,
    draw_batch,
    latent_cache,
    latest_checkpoint,
    make_optimizer,
    training_scheduler,
    truncate_log,
    write_checkpoint,
)

ATTENTION_KEYS = ("to_q", "to_k", "to_v", "to_out")


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
    """Atomic, byte-stable ``safetensors`` file of the immunized attention tensors (see io.save_safetensors).
    Data-parallel: only rank 0 writes (:mod:`.distributed`)."""
    from ..io import save_safetensors

    if not distributed.is_main():
        return
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


def _draws(batch_size: int, sample_latents: bool, seed: int, count: int) -> tuple[TrainConfig, RunState]:
    """The batch settings and random streams of the adaptation's batches: :func:`~.loop.train`'s own (uniform t,
    no masks, no flips; one CPU generator seeded ``seed`` and the data order over ``count`` images)."""
    draw = TrainConfig(batch_size=batch_size, sample_latents=sample_latents, seed=seed)
    return draw, RunState.fresh(draw, count)


def _adaptation_loss(work, scheduler, trainable, prompts: list[str], cache: LatentCache, state: RunState,
                     draw: TrainConfig, part: slice | None = None) -> tuple[torch.Tensor, list[int]]:
    """One batch of the adaptation loss and its timesteps, drawn and reduced by :func:`~.loop.train`'s own
    :func:`~.loop.draw_batch` and :func:`~.loop.batch_loss`. ``part`` (a data-parallel process's rows): the whole
    batch is drawn, the loss is those rows' share ``Σ rows ÷ batch_size`` (the shares of all processes add up to the
    batch mean); the timesteps are all of them."""
    batch = draw_batch(cache, state, prompts, draw, diffusion.num_train_timesteps(scheduler), work.unet.device)
    loss = batch_loss(work.unet, scheduler, trainable, batch, draw, state.generator, part)[0]
    return loss, batch.timesteps.tolist()


def _optimizer(params: list[torch.Tensor], lr: float, config: ImmunizeConfig):
    return make_optimizer(params, TrainConfig(lr=lr, weight_decay=config.weight_decay))


# ------------------------------------------------------------------------------------------------- stage
@dataclass
class _Stage:
    """The live state of one stage: the working copy, what each side trains and its optimizer, the cached latents
    and the random draws (one CPU generator and the data order, as :func:`~.loop.train` keeps them)."""

    work: Any
    adaptation: Adaptation
    defended: dict[str, torch.nn.Parameter]  # θ, the attention weights the defence ascends on
    inner_params: list[torch.Tensor]  # φ, what the adaptation descends on
    inner_opt: Any
    outer_opt: Any
    scheduler: Any
    cache: LatentCache
    draw: TrainConfig  # the batch settings of :func:`~.loop.draw_batch`
    state: RunState  # the generator and data order (the grad-by-t bins are unused)

    @property
    def outer_params(self) -> list[torch.Tensor]:
        return list(self.defended.values())


def _build_stage(pipe, data: InstanceData, config: ImmunizeConfig, *, token: str, class_word: str,
                 instance_prompt: str | None, init_state: dict[str, torch.Tensor] | None) -> _Stage:
    work = working_copy(pipe)
    if init_state is not None:
        apply_attention_state(work.unet, init_state)
    defended = attention_parameters(work.unet, config.cross_attention_only)  # before LoRA wraps the layers
    adaptation = make_adaptation(work, config.against, token=token, class_word=class_word,
                                 instance_prompt=instance_prompt, lora_rank=config.lora_rank,
                                 batch_size=config.batch_size, resolution=int(data.images.shape[-1]))
    inner_params = adaptation.trainable.parameters()
    inner_opt = _optimizer(inner_params, config.lr, config)
    outer_opt = _optimizer(list(defended.values()), config.defence_lr, config)
    scheduler = training_scheduler(work)
    cache = LatentCache(*latent_cache(work.vae, data.images, work.unet.device), None)
    draw, state = _draws(config.batch_size, config.sample_latents, config.seed, len(data))
    return _Stage(work, adaptation, defended, inner_params, inner_opt, outer_opt, scheduler, cache, draw, state)


def _resume(stage: _Stage, out_dir: Path, config: ImmunizeConfig, data: InstanceData, adaptation_key: list[str]
            ) -> int | None:
    """Restore the latest checkpoint of ``out_dir`` into ``stage`` and cut the train log back to its step; return
    that step (``None``: no checkpoint). A checkpoint of other settings, images or prompts is refused. Every
    process of a data-parallel run restores it; only rank 0 cuts the log."""
    checkpoint = latest_checkpoint(out_dir)
    if checkpoint is None:
        return None
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if state["config"] != config.resume_key() or state["names"] != data.names or state["adaptation"] != adaptation_key:
        raise CloakError(f"{checkpoint} was written with other settings or images; resume with the same ones, "
                         "or start fresh (--overwrite)")
    stage.adaptation.trainable.load_state_dict(state["trainable"])
    apply_attention_state(stage.work.unet, state["attention"])
    stage.inner_opt.load_state_dict(state["inner_optimizer"])
    stage.outer_opt.load_state_dict(state["outer_optimizer"])
    stage.state.generator.set_state(state["generator"])
    stage.state.order.order, stage.state.order.position = state["order"], state["position"]
    step = int(state["step"])
    if distributed.is_main():
        truncate_log(out_dir / LOG_NAME, step)
    return step


def _alternate(stage: _Stage, config: ImmunizeConfig, phase: str, part: slice | None = None
               ) -> tuple[float, list[int]]:
    """One step of ``phase``: ``inner`` descends the adaptation loss over φ, ``outer`` ascends it over θ (the
    gradient of ``−L_A``). Returns the loss before the step (the whole batch's) and its timesteps. ``part``: this
    data-parallel process's rows (:mod:`.distributed`); the phase's gradients are summed over the processes before
    clipping, so every process takes the same step."""
    inner_ids = {id(p) for p in stage.inner_params}
    # DreamBooth trains the attention weights too in its inner step (they are part of its UNet)
    for p in stage.inner_params:
        p.requires_grad_(phase == "inner")
    for p in stage.outer_params:
        p.requires_grad_(phase == "outer" or (phase == "inner" and id(p) in inner_ids))
    params, optimizer = ((stage.inner_params, stage.inner_opt) if phase == "inner"
                         else (stage.outer_params, stage.outer_opt))
    optimizer.zero_grad(set_to_none=True)
    loss, timesteps = _adaptation_loss(stage.work, stage.scheduler, stage.adaptation.trainable,
                                       stage.adaptation.prompts, stage.cache, stage.state, stage.draw, part)
    (loss if phase == "inner" else -loss).backward()
    distributed.all_reduce_grads(params)
    if config.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    stage.adaptation.trainable.after_step()
    value = float(distributed.all_reduce_sum(loss.detach().float().reshape(1)) if part is not None
                  else loss.detach())  # the whole batch's loss
    check_finite(value)
    return value, timesteps


def immunize(pipe, data: InstanceData, config: ImmunizeConfig, out_dir: Path, *, token: str | None = None,
             class_word: str = DEFAULT_CLASS_WORD, instance_prompt: str | None = None,
             init_state: dict[str, torch.Tensor] | None = None, resume: bool = False,
             on_progress: Callable[[int, int, dict[str, Any]], None] | None = None,
             stop_after: int | None = None) -> ImmunizeResult:
    """One IMMA stage on the concept in ``data`` (images ``(N, 3, R, R)`` in [0, 1]); ``pipe`` is not modified.

    ``init_state`` (attention tensors of an earlier stage) is applied to the working copy first. Writes
    ``out_dir/train_log.jsonl`` (step, phase inner|outer, t, loss, lr) and ``out_dir/checkpoints/step-N.pt``
    (``--resume`` continues bit-exactly). Returns the immunized attention tensors; see the module docstring.

    Data-parallel under a launcher (:mod:`.distributed`): each inner and each outer step splits its batch across
    the processes and sums the gradients of that phase's parameters before clipping — the same alternation, so the
    result equals the one-process run at the same ``--batch-size`` within float round-off; only rank 0 writes.
    """
    config = config.resolved()
    config.check()
    token = token or default_token(config.against)
    part = distributed.slice_batch(config.batch_size) if distributed.world() > 1 else None
    writer = distributed.is_main()
    out_dir = Path(out_dir)
    if writer:
        out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    stage = _build_stage(pipe, data, config, token=token, class_word=class_word, instance_prompt=instance_prompt,
                         init_state=init_state)
    adaptation_key = [token, class_word, instance_prompt or ""]
    log_path = out_dir / LOG_NAME
    if part is not None:
        distributed.barrier()  # rank 0 has prepared the folder (--overwrite) before anyone reads a checkpoint
    resumed_from = _resume(stage, out_dir, config, data, adaptation_key) if resume else None
    if resumed_from is None and writer:
        log_path.write_text("")
    step = resumed_from or 0
    cycle = config.inner_steps + config.outer_steps
    losses = {"inner": float("nan"), "outer": float("nan")}
    with (log_path.open("a") if writer else contextlib.nullcontext()) as log_file:
        while step < config.steps and (stop_after is None or step < stop_after):
            phase = "inner" if step % cycle < config.inner_steps else "outer"
            losses[phase], timesteps = _alternate(stage, config, phase, part)
            step += 1
            record = {"step": step, "phase": phase, "t": timesteps, "loss": losses[phase],
                      "lr": config.lr if phase == "inner" else config.defence_lr}
            if log_file is not None and (step % config.log_every == 0 or step == config.steps):
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
            at_stop = stop_after is not None and step == stop_after
            if writer and ((config.checkpoint_every and step % config.checkpoint_every == 0) or at_stop
                           or step == config.steps):
                _save_checkpoint(out_dir, step, stage.adaptation.trainable, stage.defended, stage.inner_opt,
                                 stage.outer_opt, stage.state.generator, stage.state.order, config, data,
                                 adaptation_key)
            if on_progress is not None:
                on_progress(step, config.steps, record)
    state = {name: value.detach().float().cpu().clone() for name, value in stage.defended.items()}
    return ImmunizeResult(state, step, resumed_from, losses["inner"], losses["outer"],
                          time.perf_counter() - started)


def _save_checkpoint(out_dir: Path, step: int, trainable, defended: dict[str, torch.Tensor], inner_opt, outer_opt,
                     generator: torch.Generator, order: DataOrder, config: ImmunizeConfig, data: InstanceData,
                     adaptation: list[str]) -> None:
    state = {"step": step, "trainable": {k: v.detach().cpu().clone() for k, v in trainable.state_dict().items()},
             "attention": {k: v.detach().cpu().clone() for k, v in defended.items()},
             "inner_optimizer": inner_opt.state_dict(), "outer_optimizer": outer_opt.state_dict(),
             "generator": generator.get_state(), "order": list(order.order), "position": order.position,
             "config": config.resume_key(), "names": list(data.names), "adaptation": adaptation}
    write_checkpoint(out_dir, step, state)


# --------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def adaptation_loss(work, trainable, prompts: list[str], data: InstanceData, *, draws: int = 32,
                    seed: int = 1234) -> float:
    """Mean adaptation loss over ``draws`` fixed (image, t, noise, prompt) draws — the same draws for any model,
    so an immunized and a plain model adapted alike can be compared (higher = the concept is learnt worse)."""
    scheduler = training_scheduler(work)
    cache = LatentCache(*latent_cache(work.vae, data.images, work.unet.device), None)
    draw, state = _draws(1, False, seed, len(data))
    values = [float(_adaptation_loss(work, scheduler, trainable, prompts, cache, state, draw)[0])
              for _ in range(draws)]
    return sum(values) / len(values)


def adapted_loss(pipe, state: dict[str, torch.Tensor] | None, data: InstanceData, against: str, out_dir: Path, *,
                 steps: int, lr: float, token: str, class_word: str = DEFAULT_CLASS_WORD,
                 instance_prompt: str | None = None, lora_rank: int = 4, seed: int = 0, draws: int = 16) -> float:
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
          TrainConfig(steps=steps, lr=lr, seed=seed, checkpoint_every=0, snapshot_every=0), out_dir,
          data_parallel=False)  # a check at batch 1 that only rank 0 makes
    return adaptation_loss(work, adaptation.trainable, adaptation.prompts, data, draws=draws, seed=seed + 1234)
