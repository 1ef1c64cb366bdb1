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

The code follows those steps by name: :func:`encode_training_data` (the posterior cache, once) →
:func:`draw_batch` (0–3, the whole micro-batch) → :func:`micro_batch_backward` (4 and the backward) →
:func:`optimizer_step` (5: gradient sum, grad-by-t bins, clipping, step) → the log record, snapshots and checkpoints
→ :func:`_write_final`. :class:`RunState` is what a checkpoint restores.

Data-parallel (``torchrun``/``accelerate launch -m cloaklab``; :mod:`.distributed`): every process runs this same
loop and draws the whole batch, :func:`micro_batch_backward` takes only the process's block of rows (its share of the
loss: Σ rows ÷ batch), :func:`optimizer_step` sums the gradients across processes before anything reads them, the
logged values are summed the same way, and only rank 0 writes. The run equals the one-process run at the same
``batch_size`` within float round-off; one process takes exactly the code path it always did.

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
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from .. import diffusion
from ..errors import CloakError, UsageError
from . import distributed
from .data import InstanceData
from .presets import MASK_MODES, TEXTUAL_INVERSION

CHECKPOINT_DIR = "checkpoints"
LOG_NAME = "train_log.jsonl"
GRAD_BY_T_NAME = "grad_by_t.json"
FLIP_STREAM = 1  # the flip generator's seed offset from the run's seed


class Trainable(Protocol):
    """What the loop needs from a trainer (TI, DreamBooth, LoRA)."""

    def parameters(self) -> list[torch.Tensor]: ...  # what the optimizer updates (requires_grad=True)
    def condition(self, prompts: list[str]) -> tuple[torch.Tensor, dict[str, Any]]: ...  # (hidden states, unet kw)
    def after_step(self) -> None: ...  # e.g. TI: put the frozen embedding rows back
    def extra_loss(self, generator: torch.Generator, rows: slice | None = None) -> torch.Tensor | None: ...
    # e.g. prior preservation: drawn for the whole batch; with ``rows`` only those rows' share (Σ rows ÷ batch)
    def grad_norm(self) -> float: ...  # magnitude of the trained gradient (for --log-grad-by-t)
    def state_dict(self) -> dict[str, torch.Tensor]: ...
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...
    def save(self, folder: Path, step: int, final: bool) -> list[str]: ...  # returns written file names


@dataclass
class TrainConfig:
    """Hyper-parameters of one run (defaults: Textual Inversion of paper 000 §5.1.2, :data:`.presets.TEXTUAL_INVERSION`
    — except ``weight_decay`` and ``flip_p``, off here; ``cloak train-ti`` passes the diffusers TI example's 1e-2 and
    0.5 from there)."""

    steps: int = TEXTUAL_INVERSION["steps"]
    batch_size: int = TEXTUAL_INVERSION["batch_size"]
    lr: float = TEXTUAL_INVERSION["lr"]
    warmup_steps: int = TEXTUAL_INVERSION["warmup_steps"]
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_epsilon: float = 1e-8
    grad_accumulation: int = TEXTUAL_INVERSION["grad_accumulation"]
    max_grad_norm: float | None = None
    seed: int = 0
    t_sampler: str = "uniform"
    t_param: float | None = None
    mask_mode: str = "none"
    sample_latents: bool = True
    checkpoint_every: int = TEXTUAL_INVERSION["checkpoint_every"]
    snapshot_every: int = TEXTUAL_INVERSION["snapshot_every"]
    log_every: int = 1
    log_grad_by_t: bool = False
    grad_bins: int = 10
    optimizer: str = "adamw"  # or "adamw8bit" (bitsandbytes; train-db --use-8bit-adam)
    flip_p: float = 0.0  # horizontal-flip probability per sample (diffusers TI example: 0.5; see FLIP_STREAM)

    def check(self, data_parallel: bool = True) -> None:
        """Refuse bad values (the CLI's exit 2); ``data_parallel``: also a batch the processes of a launcher's run
        cannot share equally (:func:`.distributed.check_batch`)."""
        if self.steps < 1 or self.batch_size < 1 or self.grad_accumulation < 1:
            raise UsageError("--steps, --batch-size and --grad-accumulation must be >= 1")
        if data_parallel:
            distributed.check_batch(self.batch_size)
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


def region_sums(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[Σ e·M, Σ M, Σ e·(1−M), Σ (1−M)]`` of the channel-mean squared error ``e`` under a latent mask
    ``(B, 1, h, w)``: sums over samples, so the shares of a data-parallel batch add up."""
    error = ((prediction.detach().float() - target.float()) ** 2).mean(1, keepdim=True)
    return torch.stack([(error * mask).sum(), mask.sum(), (error * (1 - mask)).sum(), (1 - mask).sum()])


def region_losses(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[inside, outside]``: mean squared error inside and outside a latent mask ``(B, 1, h, w)`` (area-weighted;
    for the log; a tensor, so the caller reads it back with the loss in one device sync)."""
    sums = region_sums(prediction, target, mask)
    return torch.stack([sums[0] / sums[1].clamp_min(1e-8), sums[2] / sums[3].clamp_min(1e-8)])


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
    found = own_checkpoints(Path(out_dir) / CHECKPOINT_DIR)
    return found[-1] if found else None


def own_checkpoints(folder: Path) -> list[Path]:
    """The checkpoints a run wrote in ``folder`` (names ``step-NNNNNN.pt``), in step order — by number, so step
    1,000,000 comes after step 999,999; files cloak did not name this way are never listed."""
    found = [path for path in Path(folder).glob("step-*.pt") if OWN_FILE_NAMES.match(path.name)]
    return sorted(found, key=lambda path: int(path.stem.removeprefix("step-")))


# the files a training run writes in its checkpoint and snapshot folders (and nothing else is deleted)
OWN_FILE_NAMES = re.compile(r"^step-\d{6,}\.(pt|tmp)$|^learned_embeds-step-\d{6}\.safetensors(\.tmp)?$")


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
    if overwrite and not distributed.is_main():
        return  # data-parallel: rank 0 clears the folder
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


def truncate_log(path: Path, step: int) -> None:
    """Keep the lines of the train log ``path`` up to ``step`` (a resumed run continues from its checkpoint)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


# --------------------------------------------------------------------------------------------------- loop
@dataclass
class LatentCache:
    """The training images as cached VAE posteriors ``(N, 4, h, w)`` and latent masks ``(N, 1, h, w)``, plus the
    mirrored images' own (the VAE is not exactly flip-equivariant), computed once per run on the model's device."""

    mean: torch.Tensor
    std: torch.Tensor
    masks: torch.Tensor | None
    flipped: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None

    def pick(self, index: list[int], flips: torch.Tensor | None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(mean, std, mask) of the samples ``index``, mirrored where ``flips``."""
        mean, std = self.mean[index], self.std[index]
        masks = self.masks[index] if self.masks is not None else None
        if flips is not None and self.flipped is not None:
            mean_flipped, std_flipped, masks_flipped = self.flipped
            pick = flips.to(mean.device)[:, None, None, None]
            mean = torch.where(pick, mean_flipped[index], mean)
            std = torch.where(pick, std_flipped[index], std)
            if masks is not None:
                masks = torch.where(pick, masks_flipped[index], masks)
        return mean, std, masks


def encode_training_data(vae, data: InstanceData, config: TrainConfig, device) -> LatentCache:
    """Step 1 of a run: encode the images once. IM / LIM encode the masked image ``x ⊙ M_x`` (App. I)."""
    images, masks = data.images, data.masks
    encoded = images * masks if config.mask_mode in ("im", "lim") else images
    mean, std = latent_cache(vae, encoded, device)
    size = tuple(mean.shape[-2:])
    latent_masks = diffusion.latent_mask(masks, size).to(device) if masks is not None else None
    flipped = None
    if config.flip_p > 0:
        mean_flipped, std_flipped = latent_cache(vae, encoded.flip(-1), device)
        masks_flipped = diffusion.latent_mask(masks.flip(-1), size).to(device) if masks is not None else None
        flipped = (mean_flipped, std_flipped, masks_flipped)
    return LatentCache(mean, std, latent_masks, flipped)


@dataclass
class Batch:
    """One micro-batch as drawn in full (every process draws all of it; see :mod:`.distributed`)."""

    latents: torch.Tensor  # (B, 4, h, w) z0 on the model's device
    masks: torch.Tensor | None  # (B, 1, h, w) latent masks
    timesteps: torch.Tensor  # (B,) on the CPU
    noise: torch.Tensor  # (B, 4, h, w) on the model's device
    prompts: list[str]
    flips: list[int]

    def rows(self, part: slice | None) -> Batch:
        """The samples ``part`` of this batch (all of them for ``None``)."""
        if part is None:
            return self
        return Batch(self.latents[part], self.masks[part] if self.masks is not None else None,
                     self.timesteps[part], self.noise[part], self.prompts[part], self.flips[part])


@dataclass
class RunState:
    """What a checkpoint restores: the step, the random streams, the data order and the grad-by-t bins."""

    generator: torch.Generator
    flip_generator: torch.Generator | None
    order: DataOrder
    bins: torch.Tensor
    counts: torch.Tensor
    step: int = 0

    @classmethod
    def fresh(cls, config: TrainConfig, count: int) -> RunState:
        flip_generator = torch.Generator().manual_seed(config.seed + FLIP_STREAM) if config.flip_p > 0 else None
        return cls(torch.Generator().manual_seed(config.seed), flip_generator, DataOrder(count),
                   torch.zeros(config.grad_bins, dtype=torch.float64),
                   torch.zeros(config.grad_bins, dtype=torch.float64))

    def snapshot(self) -> tuple:
        """RNG / data order / grad bins after the last finished step (restored on Ctrl-C)."""
        flip_state = self.flip_generator.get_state() if self.flip_generator is not None else None
        return (self.generator.get_state(), list(self.order.order), self.order.position, self.bins.clone(),
                self.counts.clone(), flip_state)

    def restore(self, snapshot: tuple) -> None:
        generator_state, order, position, bins, counts, flip_state = snapshot
        self.generator.set_state(generator_state)
        if self.flip_generator is not None:
            self.flip_generator.set_state(flip_state)
        self.order.order, self.order.position = order, position
        self.bins, self.counts = bins, counts


def draw_batch(cache: LatentCache, state: RunState, prompts: list[str], config: TrainConfig, num_t: int,
               device) -> Batch:
    """Step 2: draw a whole micro-batch, in the run's fixed order — data order, flips (their own stream), latent
    sample, timesteps, noise, prompts — from the CPU generators (module docstring, steps 0–3)."""
    size, generator = config.batch_size, state.generator
    index = state.order.next(size, generator)
    flips = None
    if state.flip_generator is not None:
        flips = torch.rand(size, generator=state.flip_generator) < config.flip_p
    mean, std, masks = cache.pick(index, flips)
    latent_noise = torch.randn(mean.shape, generator=generator) if config.sample_latents else None
    timesteps = diffusion.sample_timesteps(size, config.t_sampler, config.t_param, num_timesteps=num_t,
                                           generator=generator)
    noise = torch.randn(mean.shape, generator=generator).to(device)
    choice = torch.randint(len(prompts), (size,), generator=generator).tolist()
    latents = mean + std * latent_noise.to(device) if latent_noise is not None else mean
    return Batch(latents, masks, timesteps, noise, [prompts[i] for i in choice],
                 [int(flip) for flip in flips] if flips is not None else [])


def batch_loss(unet, scheduler, trainable: Trainable, batch: Batch, config: TrainConfig, generator: torch.Generator,
               part: slice | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Batch]:
    """The scalar loss of this process's ``part`` of ``batch`` (all of it for ``None``; see
    :func:`micro_batch_backward`), with the prediction, target and rows it was computed on."""
    mine = batch.rows(part)
    text, unet_kwargs = trainable.condition(mine.prompts)
    loss, prediction, target = masked_step_loss(unet, scheduler, mine.latents, text, mine.timesteps.to(unet.device),
                                                mine.noise, config.mask_mode, mine.masks, **unet_kwargs)
    if part is None:
        loss = loss.mean()
        extra = trainable.extra_loss(generator)
    else:
        loss = loss.sum() / config.batch_size
        extra = trainable.extra_loss(generator, part)
    if extra is not None:
        loss = loss + extra
    return loss, prediction, target, mine


def micro_batch_backward(unet, scheduler, trainable: Trainable, batch: Batch, config: TrainConfig,
                         generator: torch.Generator, part: slice | None) -> torch.Tensor:
    """Step 3: the loss of this process's ``part`` of ``batch`` (all of it for ``None``), backward (÷ the
    accumulation steps). Returns the values to log — ``[loss]`` or ``[loss, Σ err·M, Σ M, Σ err·(1−M), Σ(1−M)]``
    with masks — as this process's share, so that their sum over the processes is the whole batch's.

    One process: ``loss = mean over the batch + trainable.extra_loss``. Data-parallel: ``Σ over the rows ÷ batch
    + the rows' share of the extra loss``, whose sum over the processes is the same number."""
    loss, prediction, target, mine = batch_loss(unet, scheduler, trainable, batch, config, generator, part)
    (loss / config.grad_accumulation).backward()
    readback = loss.detach().float().reshape(1)
    if mine.masks is not None:
        readback = torch.cat([readback, region_sums(prediction, target, mine.masks)])
    return readback


def optimizer_step(trainable: Trainable, optimizer, params: list[torch.Tensor], config: TrainConfig,
                   state: RunState, record_t: list[int], num_t: int) -> float | None:
    """Step 4: sum the gradients over the processes, bin the gradient norm by t (``--log-grad-by-t``), clip, step,
    and let the trainable restore what it keeps fixed. Returns the gradient norm when it is logged."""
    distributed.all_reduce_grads(params)
    grad_norm = None
    if config.log_grad_by_t:
        grad_norm = trainable.grad_norm()
        for t in record_t:
            which = min(config.grad_bins - 1, t * config.grad_bins // num_t)
            state.bins[which] += grad_norm
            state.counts[which] += 1
    if config.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
    optimizer.step()
    trainable.after_step()
    return grad_norm


def _resume(out_dir: Path, trainable: Trainable, optimizer, state: RunState, config: TrainConfig,
            data: InstanceData) -> int | None:
    """Load the latest checkpoint into the trainable, optimizer and run state; the step it was made at (or None)."""
    checkpoint = latest_checkpoint(out_dir)
    if checkpoint is None:
        return None
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if saved["config"] != config.resume_key() or saved["names"] != data.names:
        raise CloakError(f"{checkpoint} was written with other settings or images; resume with the same "
                         "ones, or start fresh in a new folder (or with --overwrite)")
    trainable.load_state_dict(saved["trainable"])
    optimizer.load_state_dict(saved["optimizer"])
    state.generator.set_state(saved["generator"])
    if state.flip_generator is not None:
        state.flip_generator.set_state(saved["flip_generator"])
    state.order.order, state.order.position = saved["order"], saved["position"]
    state.bins, state.counts = saved["grad_bins"], saved["grad_counts"]
    state.step = int(saved["step"])
    return state.step


def _check_run(pipe, data: InstanceData, prompts: list[str], config: TrainConfig, data_parallel: bool) -> None:
    config.check(data_parallel)
    if not prompts:
        raise UsageError("no training prompts")
    if config.mask_mode != "none" and data.masks is None:
        raise UsageError(f"--mask-mode {config.mask_mode} needs masks (--masks DIR)")
    if getattr(pipe, "unet", None) is None:
        raise UsageError(f"{type(pipe).__name__} has no UNet: cloak trains UNet pipelines (SD 1.x/2.x/XL, "
                         "rectified-flow SD1.5) only")


def train(pipe, trainable: Trainable, data: InstanceData, prompts: list[str], config: TrainConfig, out_dir: Path,
          *, resume: bool = False, on_progress: Callable[[int, int, dict[str, Any]], None] | None = None,
          stop_after: int | None = None, data_parallel: bool = True) -> TrainResult:
    """Run (or resume) training; see the module docstring. ``stop_after`` ends early at that step (for tests and
    to split a run), after writing a checkpoint there.

    Under a launcher (``torchrun``/``accelerate launch``, :mod:`.distributed`) the batch is split across the
    processes and only rank 0 writes; ``data_parallel=False`` trains the whole batch in this process alone (a
    side computation that only one process makes)."""
    _check_run(pipe, data, prompts, config, data_parallel)
    out_dir = Path(out_dir)
    writer = distributed.is_main()
    if writer:
        out_dir.mkdir(parents=True, exist_ok=True)
    part = distributed.slice_batch(config.batch_size) if data_parallel and distributed.world() > 1 else None
    unet, scheduler = pipe.unet, training_scheduler(pipe)
    started = time.perf_counter()
    cache = encode_training_data(pipe.vae, data, config, unet.device)
    params = trainable.parameters()
    optimizer = make_optimizer(params, config)
    state = RunState.fresh(config, len(data))
    log_path = out_dir / LOG_NAME
    if part is not None:
        distributed.barrier()  # rank 0 has prepared the folder (--overwrite) before anyone reads a checkpoint
    resumed_from = _resume(out_dir, trainable, optimizer, state, config, data) if resume else None
    if writer:
        if resumed_from is not None:
            truncate_log(log_path, resumed_from)
        else:
            log_path.write_text("")

    total = config.steps
    last_loss = float("nan")
    written: list[str] = []
    history: list[dict[str, Any]] = []
    num_t = diffusion.num_train_timesteps(scheduler)

    def save_checkpoint() -> None:
        if writer:
            _save_checkpoint(out_dir, state.step, trainable, optimizer, state.generator, state.order, state.bins,
                             state.counts, config, data, state.flip_generator)

    resumable, stepping = state.snapshot(), False
    log_file = log_path.open("a") if writer else None
    try:
        while state.step < total and (stop_after is None or state.step < stop_after):
            lr = config.lr * min(1.0, (state.step + 1) / config.warmup_steps) if config.warmup_steps else config.lr
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            step_loss, record_t, inside, outside, record_flip = 0.0, [], [], [], []
            for _ in range(config.grad_accumulation):
                batch = draw_batch(cache, state, prompts, config, num_t, unet.device)
                readback = micro_batch_backward(unet, scheduler, trainable, batch, config, state.generator, part)
                if part is not None:
                    distributed.all_reduce_sum(readback)
                if len(readback) > 1:  # the area-weighted losses inside / outside the mask
                    readback = torch.stack([readback[0], readback[1] / readback[2].clamp_min(1e-8),
                                            readback[3] / readback[4].clamp_min(1e-8)])
                values = readback.tolist()  # one device sync per micro-batch
                step_loss += values[0] / config.grad_accumulation
                record_t += batch.timesteps.tolist()
                record_flip += batch.flips
                if len(values) == 3:
                    inside.append(values[1])
                    outside.append(values[2])
            stepping = True
            grad_norm = optimizer_step(trainable, optimizer, params, config, state, record_t, num_t)
            state.step += 1
            stepping = False
            resumable = state.snapshot()
            check_finite(step_loss)
            last_loss = step_loss
            step = state.step
            record: dict[str, Any] = {"step": step, "t": record_t, "loss": step_loss, "lr": lr}
            if state.flip_generator is not None:
                record["flip"] = record_flip
            if inside:
                record["loss_inside"] = sum(inside) / len(inside)
                record["loss_outside"] = sum(outside) / len(outside)
            if grad_norm is not None:
                record["grad_norm"] = grad_norm
            if step % config.log_every == 0 or step == total:
                if log_file is not None:
                    log_file.write(json.dumps(record) + "\n")
                    log_file.flush()
                history.append(record)
            if config.snapshot_every and step % config.snapshot_every == 0 and step < total and writer:
                written += trainable.save(out_dir, step, False)
            at_stop = stop_after is not None and step == stop_after
            if (config.checkpoint_every and step % config.checkpoint_every == 0) or at_stop or step == total:
                save_checkpoint()
            if on_progress is not None:
                on_progress(step, total, record)
    except KeyboardInterrupt:
        # Ctrl-C between optimizer steps: checkpoint the last finished step so --resume loses nothing.
        if not stepping and state.step > 0:
            state.restore(resumable)
            save_checkpoint()
        raise
    finally:
        if log_file is not None:
            log_file.close()
    if writer:
        written += _write_final(out_dir, trainable, state, config, num_t, total)
    return TrainResult(state.step, last_loss, resumed_from, written, time.perf_counter() - started, history)


def _write_final(out_dir: Path, trainable: Trainable, state: RunState, config: TrainConfig, num_t: int,
                 total: int) -> list[str]:
    """Step 5: the final artefacts (when the run reached its last step) and ``grad_by_t.json``."""
    written = trainable.save(out_dir, state.step, True) if state.step >= total else []
    if config.log_grad_by_t:
        edges = [round(i * num_t / config.grad_bins) for i in range(config.grad_bins + 1)]
        summary = {"bins": [[edges[i], edges[i + 1]] for i in range(config.grad_bins)],
                   "mean_grad_norm": [float(b / c) if c else None for b, c in zip(state.bins, state.counts)],
                   "count": [int(c) for c in state.counts]}
        (out_dir / GRAD_BY_T_NAME).write_text(json.dumps(summary, indent=2) + "\n")
        written.append(GRAD_BY_T_NAME)
    return written


def _save_checkpoint(out_dir: Path, step: int, trainable: Trainable, optimizer, generator: torch.Generator,
                     order: DataOrder, bins: torch.Tensor, counts: torch.Tensor, config: TrainConfig,
                     data: InstanceData, flip_generator: torch.Generator | None = None) -> None:
    state = {"step": step, "trainable": {k: v.detach().cpu().clone() for k, v in trainable.state_dict().items()},
             "optimizer": optimizer.state_dict(), "generator": generator.get_state(), "order": list(order.order),
             "position": order.position, "grad_bins": bins, "grad_counts": counts, "config": config.resume_key(),
             "names": list(data.names)}
    if flip_generator is not None:
        state["flip_generator"] = flip_generator.get_state()
    write_checkpoint(out_dir, step, state)


def write_checkpoint(out_dir: Path, step: int, state: dict[str, Any]) -> None:
    """Save ``state`` atomically as ``out_dir/checkpoints/step-NNNNNN.pt`` and keep only the last two checkpoints."""
    path = _checkpoint_path(out_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    torch.save(state, temporary)
    temporary.replace(path)
    for old in own_checkpoints(path.parent)[:-2]:  # keep the last two; a file cloak did not name this way stays
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
