"""The shared personalization training loop (Textual Inversion, DreamBooth, LoRA) with every Safe-Zone Training
component of paper 000 (§4.5 Eq. 7, App. H–J) as an option.

How a trainer uses it::

    data = load_instance_images(items, 512, jpeg_quality=25, mask_dir=masks, dilate=16)      # ops.train.data
    trainable = TextualInversion(pipe, "<R*>", "object")                                       # a Trainable
    config = TrainConfig(steps=5000, lr=5e-4, t_sampler="threshold-high", t_param=0.5, mask_mode="lm")
    result = train(pipe, trainable, data, prompts, config, out_dir, resume=False, on_progress=callback)

One step (batch ``B`` drawn from a seeded data order; everything random comes from ONE CPU generator — plus, with
flips, a second one seeded from the same seed — so a run is a function of its seed and ``--resume`` continues
bit-exactly):
  0. with ``flip_p`` > 0, each sample is mirrored left-right with probability ``flip_p`` (the diffusers TI
     example's ``RandomHorizontalFlip(p=flip_p)`` after the resize, ``TextualInversionDataset.__getitem__``); the
     draws come from a second generator seeded ``seed + FLIP_STREAM`` (one ``torch.rand(B)`` per micro-batch, flip
     where ``< flip_p``), so ``flip_p`` = 0 leaves every other draw of the run unchanged;
  1. images → cached VAE posterior (mean, std) → ``z0 = mean + std · n`` (the law of ``latent_dist.sample()`` that
     the diffusers TI example uses; ``sample_latents=False`` uses the mean);
  2. ``t ~ sampler`` (uniform / threshold-high / threshold-low / power / tanh, App. H) via :func:`sample_timesteps`;
  3. prompt = a random template with the placeholder → ``trainable.condition(prompts)``;
  4. loss by mask mode (App. I): ``none`` ‖f−y‖² · ``lm`` ‖(f−y)⊙M_z‖² · ``im`` z0 from x⊙M_x · ``lim`` both ·
     ``zm`` f(z_t⊙M_z); plus ``trainable.extra_loss`` (e.g. DreamBooth prior preservation);
  5. backward, optimizer step (AdamW, constant lr after ``warmup_steps``), ``trainable.after_step()``.

Outputs in ``out_dir``: ``train_log.jsonl`` (one line per logged step: step, t, loss, lr, inside/outside-mask loss
when masks are given, grad_norm with ``log_grad_by_t``), ``grad_by_t.json``, ``checkpoints/step-NNNNNN.pt`` (loaded
with ``torch.load(weights_only=True)``: tensors and plain types only), snapshots and the final artefacts written by
``trainable.save``.

The :class:`Trainable` protocol is the plug: ``parameters()``, ``condition(prompts)``, ``after_step()``,
``extra_loss(generator)``, ``state_dict()/load_state_dict()``, ``grad_norm()``, ``save(folder, step, final)``.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import torch

from .. import diffusion
from ..errors import CloakError, UsageError
from .data import InstanceData
from .presets import MASK_MODES

CHECKPOINT_DIR = "checkpoints"
LOG_NAME = "train_log.jsonl"
GRAD_BY_T_NAME = "grad_by_t.json"
FLIP_STREAM = 1  # the flip generator's seed offset from the run's seed


class Trainable(Protocol):
    """What the loop needs from a trainer (TI, DreamBooth, LoRA)."""

    def parameters(self) -> list[torch.Tensor]: ...  # what the optimizer updates (requires_grad=True)
    def condition(self, prompts: list[str]) -> tuple[torch.Tensor, dict[str, Any]]: ...  # (hidden states, unet kw)
    def after_step(self) -> None: ...  # e.g. TI: put the frozen embedding rows back
    def extra_loss(self, generator: torch.Generator) -> torch.Tensor | None: ...  # e.g. prior preservation
    def grad_norm(self) -> float: ...  # magnitude of the trained gradient (for --log-grad-by-t)
    def state_dict(self) -> dict[str, torch.Tensor]: ...
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...
    def save(self, folder: Path, step: int, final: bool) -> list[str]: ...  # returns written file names


@dataclass
class TrainConfig:
    """Hyper-parameters of one run (defaults: Textual Inversion of paper 000 §5.1.2)."""

    steps: int = 5000
    batch_size: int = 1
    lr: float = 5e-4
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_epsilon: float = 1e-8
    grad_accumulation: int = 1
    max_grad_norm: float | None = None
    seed: int = 0
    t_sampler: str = "uniform"
    t_param: float | None = None
    mask_mode: str = "none"
    sample_latents: bool = True
    checkpoint_every: int = 500
    snapshot_every: int = 500
    log_every: int = 1
    log_grad_by_t: bool = False
    grad_bins: int = 10
    optimizer: str = "adamw"  # or "adamw8bit" (bitsandbytes; train-db --use-8bit-adam)
    flip_p: float = 0.0  # horizontal-flip probability per sample (diffusers TI example: 0.5; see FLIP_STREAM)

    def check(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.grad_accumulation < 1:
            raise UsageError("--steps, --batch-size and --grad-accumulation must be >= 1")
        if self.lr <= 0:
            raise UsageError(f"--lr must be > 0, got {self.lr}")
        if not 0.0 <= self.flip_p <= 1.0:
            raise UsageError(f"--flip-p must be in [0, 1], got {self.flip_p}")
        if self.mask_mode not in MASK_MODES:
            raise UsageError(f"--mask-mode {self.mask_mode!r}: choose one of {', '.join(MASK_MODES)}")
        if self.t_sampler not in diffusion.TIMESTEP_SAMPLERS:
            raise UsageError(f"--t-sampler {self.t_sampler!r}: choose one of {', '.join(diffusion.TIMESTEP_SAMPLERS)}")
        try:
            diffusion.timestep_density(self.t_sampler, self.t_param, torch.zeros(1))
        except ValueError as exc:
            raise UsageError(str(exc)) from None

    def resume_key(self) -> dict[str, Any]:
        """The settings a checkpoint must share with the run that resumes it (everything but the bookkeeping)."""
        keep = asdict(self)
        for name in ("steps", "checkpoint_every", "snapshot_every", "log_every"):
            keep.pop(name)
        keep["adam_betas"] = list(keep["adam_betas"])
        return keep


@dataclass
class TrainResult:
    steps_done: int
    final_loss: float
    resumed_from: int | None
    files: list[str]
    seconds: float
    log: list[dict[str, Any]] = field(default_factory=list)


# -------------------------------------------------------------------------------------------- data order
class DataOrder:
    """Seeded epoch permutations of ``n`` items, drawn lazily from the run's generator (state saved in checkpoints)."""

    def __init__(self, n: int):
        self.n = n
        self.order: list[int] = []
        self.position = 0

    def next(self, count: int, generator: torch.Generator) -> list[int]:
        picked = []
        while len(picked) < count:
            if self.position >= len(self.order):
                self.order = torch.randperm(self.n, generator=generator).tolist()
                self.position = 0
            picked.append(self.order[self.position])
            self.position += 1
        return picked


# ------------------------------------------------------------------------------------------------ helpers
def latent_cache(vae, images: torch.Tensor, device, chunk: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior (mean, std) of the training images, computed once per run; each step samples from it."""
    means, stds = [], []
    with torch.no_grad():
        for start in range(0, images.shape[0], chunk):
            mean, std = diffusion.latent_posterior(vae, images[start:start + chunk].to(device))
            means.append(mean.float())
            stds.append(std.float())
    return torch.cat(means), torch.cat(stds)


def region_losses(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[inside, outside]``: mean squared error inside and outside a latent mask ``(B, 1, h, w)`` (area-weighted;
    for the log; a tensor, so the caller reads it back with the loss in one device sync)."""
    error = ((prediction.detach().float() - target.float()) ** 2).mean(1, keepdim=True)
    inside = (error * mask).sum() / mask.sum().clamp_min(1e-8)
    outside = (error * (1 - mask)).sum() / (1 - mask).sum().clamp_min(1e-8)
    return torch.stack([inside, outside])


def masked_step_loss(unet, scheduler, latents: torch.Tensor, text: torch.Tensor, timesteps: torch.Tensor,
                     noise: torch.Tensor, mask_mode: str, latent_masks: torch.Tensor | None,
                     **unet_kwargs: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample loss ``(B,)`` of one mask mode (paper 000 App. I), with the prediction and target.

    ``latents`` are already those of the masked image for ``im``/``lim`` (the caller picks the cache).
    """
    input_mask = latent_masks if mask_mode == "zm" else None
    prediction, target = diffusion.denoise_prediction(unet, scheduler, latents, text, timesteps, noise,
                                                      input_mask=input_mask, **unet_kwargs)
    loss_mask = latent_masks if mask_mode in ("lm", "lim") else None
    return diffusion.masked_mse(prediction, target, loss_mask), prediction, target


def _checkpoint_path(out_dir: Path, step: int) -> Path:
    return out_dir / CHECKPOINT_DIR / f"step-{step:06d}.pt"


def latest_checkpoint(out_dir: Path) -> Path | None:
    found = sorted((Path(out_dir) / CHECKPOINT_DIR).glob("step-*.pt"))
    return found[-1] if found else None


# the files a training run writes in its checkpoint and snapshot folders (and nothing else is deleted)
OWN_FILE_NAMES = re.compile(r"^step-\d{6}\.(pt|tmp)$|^learned_embeds-step-\d{6}\.safetensors(\.tmp)?$")


def refuse_foreign_outputs(out_dir: Path, names: Sequence[str], owned: bool) -> None:
    """Refuse to train into a folder where a final artifact's name is taken by something cloak did not write
    (``owned``: the manifest records an earlier training there) or by a symlink (never written through)."""
    for name in names:
        path = Path(out_dir) / name
        if path.is_symlink():
            raise UsageError(f"{path} is a symlink inside the output folder; cloak does not write through "
                             "symlinks (remove it)")
        if path.exists() and not owned:
            raise UsageError(f"{path} exists and was not written by cloak (its manifest has no record of it): "
                             "move it away or choose another --output")


def prepare_run_folder(out_dir: Path, *, resume: bool, overwrite: bool, extra: tuple[str, ...] = ()) -> None:
    """Guard a training folder before a run: ``overwrite`` clears its checkpoints, train log and ``extra`` folders;
    otherwise earlier checkpoints are refused unless ``resume`` (a silent restart would mix two runs' files)."""
    out_dir = Path(out_dir)
    if overwrite:  # only files named the way cloak names them; anything the user put there stays
        for name in (CHECKPOINT_DIR, *extra):
            folder = out_dir / name
            if folder.is_symlink() or not folder.is_dir():
                continue
            for path in folder.iterdir():
                if OWN_FILE_NAMES.match(path.name) and path.is_file() and not path.is_symlink():
                    path.unlink()
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when nothing else is left
        log = out_dir / LOG_NAME
        if log.is_file() and not log.is_symlink():
            log.unlink()
    elif not resume and latest_checkpoint(out_dir) is not None:
        raise UsageError(f"{out_dir} holds checkpoints of an earlier run: pass --resume to continue it or "
                         "--overwrite to start again")


def _truncate_log(path: Path, step: int) -> None:
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


# --------------------------------------------------------------------------------------------------- loop
def train(pipe, trainable: Trainable, data: InstanceData, prompts: list[str], config: TrainConfig, out_dir: Path,
          *, resume: bool = False, on_progress: Callable[[int, int, dict[str, Any]], None] | None = None,
          stop_after: int | None = None) -> TrainResult:
    """Run (or resume) training; see the module docstring. ``stop_after`` ends early at that step (for tests and
    to split a run), after writing a checkpoint there."""
    config.check()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not prompts:
        raise UsageError("no training prompts")
    if config.mask_mode != "none" and data.masks is None:
        raise UsageError(f"--mask-mode {config.mask_mode} needs masks (--masks DIR)")
    if getattr(pipe, "unet", None) is None:
        raise UsageError(f"{type(pipe).__name__} has no UNet: cloak trains UNet pipelines (SD 1.x/2.x/XL, "
                         "rectified-flow SD1.5) only")
    unet, vae, scheduler = pipe.unet, pipe.vae, training_scheduler(pipe)
    device = unet.device
    started = time.perf_counter()

    images = data.images
    masks = data.masks
    # IM / LIM encode the masked image x ⊙ M_x (App. I); the others the image itself
    encoded = images * masks if config.mask_mode in ("im", "lim") else images
    mean, std = latent_cache(vae, encoded, device)
    latent_masks = diffusion.latent_mask(masks, tuple(mean.shape[-2:])).to(device) if masks is not None else None
    flip_generator = None
    if config.flip_p > 0:  # the mirrored images' own posteriors and masks (the VAE is not exactly flip-equivariant)
        flip_generator = torch.Generator().manual_seed(config.seed + FLIP_STREAM)
        mean_flipped, std_flipped = latent_cache(vae, encoded.flip(-1), device)
        latent_masks_flipped = (diffusion.latent_mask(masks.flip(-1), tuple(mean.shape[-2:])).to(device)
                                if masks is not None else None)

    params = trainable.parameters()
    optimizer = make_optimizer(params, config)
    generator = torch.Generator().manual_seed(config.seed)
    order = DataOrder(len(data))
    bins = torch.zeros(config.grad_bins, dtype=torch.float64)
    counts = torch.zeros(config.grad_bins, dtype=torch.float64)
    step, resumed_from = 0, None
    log_path = out_dir / LOG_NAME

    if resume:
        checkpoint = latest_checkpoint(out_dir)
        if checkpoint is not None:
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
            if state["config"] != config.resume_key() or state["names"] != data.names:
                raise CloakError(f"{checkpoint} was written with other settings or images; resume with the same "
                                 "ones, or start fresh in a new folder (or with --overwrite)")
            trainable.load_state_dict(state["trainable"])
            optimizer.load_state_dict(state["optimizer"])
            generator.set_state(state["generator"])
            if flip_generator is not None:
                flip_generator.set_state(state["flip_generator"])
            order.order, order.position = state["order"], state["position"]
            bins, counts = state["grad_bins"], state["grad_counts"]
            step = resumed_from = int(state["step"])
            _truncate_log(log_path, step)
    if not resume or resumed_from is None:
        log_path.write_text("")

    total = config.steps
    last_loss = float("nan")
    written: list[str] = []
    history: list[dict[str, Any]] = []
    num_t = diffusion.num_train_timesteps(scheduler)

    def resumable_state() -> tuple:  # RNG / data order / grad bins after the last finished step
        flip_state = flip_generator.get_state() if flip_generator is not None else None
        return generator.get_state(), list(order.order), order.position, bins.clone(), counts.clone(), flip_state

    resumable, stepping = resumable_state(), False
    log_file = log_path.open("a")
    try:
        while step < total and (stop_after is None or step < stop_after):
            lr = config.lr * min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps else config.lr
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            step_loss, record_t, inside, outside, record_flip = 0.0, [], [], [], []
            for _ in range(config.grad_accumulation):
                index = order.next(config.batch_size, generator)
                batch_mean, batch_std = mean[index], std[index]
                batch_masks = latent_masks[index] if latent_masks is not None else None
                if flip_generator is not None:
                    flips = torch.rand(config.batch_size, generator=flip_generator) < config.flip_p
                    record_flip += [int(flip) for flip in flips]
                    pick = flips.to(device)[:, None, None, None]
                    batch_mean = torch.where(pick, mean_flipped[index], batch_mean)
                    batch_std = torch.where(pick, std_flipped[index], batch_std)
                    if batch_masks is not None:
                        batch_masks = torch.where(pick, latent_masks_flipped[index], batch_masks)
                shape = batch_mean.shape
                latent_noise = torch.randn(shape, generator=generator) if config.sample_latents else None
                timesteps = diffusion.sample_timesteps(config.batch_size, config.t_sampler, config.t_param,
                                                       num_timesteps=num_t, generator=generator)
                noise = torch.randn(shape, generator=generator).to(device)
                choice = torch.randint(len(prompts), (config.batch_size,), generator=generator).tolist()
                latents = batch_mean + batch_std * latent_noise.to(device) if latent_noise is not None else batch_mean
                text, unet_kwargs = trainable.condition([prompts[i] for i in choice])
                loss, prediction, target = masked_step_loss(unet, scheduler, latents, text, timesteps.to(device),
                                                            noise, config.mask_mode, batch_masks, **unet_kwargs)
                loss = loss.mean()
                extra = trainable.extra_loss(generator)
                if extra is not None:
                    loss = loss + extra
                (loss / config.grad_accumulation).backward()
                readback = loss.detach().float().reshape(1)
                if batch_masks is not None:
                    readback = torch.cat([readback, region_losses(prediction, target, batch_masks)])
                values = readback.tolist()  # one device sync per micro-batch
                step_loss += values[0] / config.grad_accumulation
                record_t += timesteps.tolist()
                if len(values) == 3:
                    inside.append(values[1])
                    outside.append(values[2])
            grad_norm = None
            if config.log_grad_by_t:
                grad_norm = trainable.grad_norm()
                for t in record_t:
                    which = min(config.grad_bins - 1, t * config.grad_bins // num_t)
                    bins[which] += grad_norm
                    counts[which] += 1
            if config.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            stepping = True
            optimizer.step()
            trainable.after_step()
            step += 1
            stepping = False
            resumable = resumable_state()
            check_finite(step_loss)
            last_loss = step_loss
            record: dict[str, Any] = {"step": step, "t": record_t, "loss": step_loss, "lr": lr}
            if flip_generator is not None:
                record["flip"] = record_flip
            if inside:
                record["loss_inside"] = sum(inside) / len(inside)
                record["loss_outside"] = sum(outside) / len(outside)
            if grad_norm is not None:
                record["grad_norm"] = grad_norm
            if step % config.log_every == 0 or step == total:
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
                history.append(record)
            if config.snapshot_every and step % config.snapshot_every == 0 and step < total:
                written += trainable.save(out_dir, step, False)
            at_stop = stop_after is not None and step == stop_after
            if (config.checkpoint_every and step % config.checkpoint_every == 0) or at_stop or step == total:
                _save_checkpoint(out_dir, step, trainable, optimizer, generator, order, bins, counts, config, data,
                                 flip_generator)
            if on_progress is not None:
                on_progress(step, total, record)
    except KeyboardInterrupt:
        # Ctrl-C between optimizer steps: checkpoint the last finished step so --resume loses nothing.
        if not stepping and step > 0:
            generator.set_state(resumable[0])
            if flip_generator is not None:
                flip_generator.set_state(resumable[5])
            order.order, order.position = resumable[1], resumable[2]
            _save_checkpoint(out_dir, step, trainable, optimizer, generator, order, resumable[3], resumable[4],
                             config, data, flip_generator)
        raise
    finally:
        log_file.close()
    if step >= total:
        written += trainable.save(out_dir, step, True)
    if config.log_grad_by_t:
        edges = [round(i * num_t / config.grad_bins) for i in range(config.grad_bins + 1)]
        summary = {"bins": [[edges[i], edges[i + 1]] for i in range(config.grad_bins)],
                   "mean_grad_norm": [float(b / c) if c else None for b, c in zip(bins, counts)],
                   "count": [int(c) for c in counts]}
        (out_dir / GRAD_BY_T_NAME).write_text(json.dumps(summary, indent=2) + "\n")
        written.append(GRAD_BY_T_NAME)
    return TrainResult(step, last_loss, resumed_from, written, time.perf_counter() - started, history)


def _save_checkpoint(out_dir: Path, step: int, trainable: Trainable, optimizer, generator: torch.Generator,
                     order: DataOrder, bins: torch.Tensor, counts: torch.Tensor, config: TrainConfig,
                     data: InstanceData, flip_generator: torch.Generator | None = None) -> None:
    path = _checkpoint_path(out_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"step": step, "trainable": {k: v.detach().cpu().clone() for k, v in trainable.state_dict().items()},
             "optimizer": optimizer.state_dict(), "generator": generator.get_state(), "order": list(order.order),
             "position": order.position, "grad_bins": bins, "grad_counts": counts, "config": config.resume_key(),
             "names": list(data.names)}
    if flip_generator is not None:
        state["flip_generator"] = flip_generator.get_state()
    temporary = path.with_suffix(".tmp")
    torch.save(state, temporary)
    temporary.replace(path)
    for old in sorted(path.parent.glob("step-*.pt"))[:-2]:  # keep the last two
        old.unlink()


def make_optimizer(params: list[torch.Tensor], config: TrainConfig):
    """AdamW over ``params``; ``config.optimizer == "adamw8bit"`` uses bitsandbytes' 8-bit AdamW (same update rule,
    8-bit optimizer states; papers 001/004 train DreamBooth with it)."""
    options = dict(lr=config.lr, betas=config.adam_betas, eps=config.adam_epsilon, weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, **options)
    if config.optimizer == "adamw8bit":
        try:
            import bitsandbytes
        except ImportError:
            raise UsageError("--use-8bit-adam needs bitsandbytes (pip install bitsandbytes; CUDA only)") from None
        return bitsandbytes.optim.AdamW8bit(params, **options)
    raise UsageError(f"unknown optimizer {config.optimizer!r}: adamw or adamw8bit")


def training_scheduler(pipe):
    """The training noise schedule: a DDPM scheduler from the pipeline's scheduler config (as the diffusers
    training examples do), or the flow-matching scheduler itself."""
    scheduler = pipe.scheduler
    if diffusion.is_flow_matching(scheduler):
        return scheduler
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(scheduler.config)


def check_finite(value: float) -> None:
    if not math.isfinite(value):
        raise CloakError("training diverged (loss is not finite): lower --lr or use --dtype fp32")
