"""Training recipe for ``--model toy``: a small Stable-Diffusion-architecture model trained on the toy world.

Stages, run one after another (two torch jobs on 2 cores slow each other 2-3×):

1. ``AutoencoderKL`` with 4× downsampling (64 px → 16×16×4 latents), block_out_channels (16, 32, 64): L1 + MSE
   reconstruction and a tiny KL weight (1e-6, as SD's VAE), no GAN. ``scaling_factor`` = 1/std of the dataset's
   latents (unit-variance latents, as SD's 0.18215). Latent posteriors (mean, std) are then cached once.
2. ``UNet2DConditionModel`` (32, 64, 64) with cross-attention at 16×16 and 8×8 (cross_attention_dim 64, 2 heads:
   twice as fast on a CPU as 8) and a 2-layer ``CLIPTextModel`` (hidden 64) with the real CLIP tokenizer, trained
   jointly with the ε-prediction loss of :func:`cloaklab.ops.diffusion.diffusion_loss` on SD 1.5's scaled-linear
   schedule; AdamW 1e-3 cosine-decayed to 1e-4 over the time budget, batch 64, 10% caption dropout (so
   classifier-free guidance works), EMA of the weights; half the images show an unnamed shape (``--novel-fraction``).

``--init-from FOLDER`` continues a trained model (its VAE and scaling factor kept; UNet and text encoder from its EMA
weights, fresh optimizer with a 100-step warmup), for more steps than one sitting gives. The shipped weights are
one sitting of the default recipe (82 min on 2 CPU cores, 8,364 UNet steps).

Each stage stops at its wall-clock budget (``--vae-minutes``, ``--unet-minutes``) or step cap, whichever comes first,
so the recipe fits a 2-core CPU in ≤ 90 min (7 + 75 by default); a lent GPU (``--device cuda``) runs the same
recipe many times faster.
The result is a diffusers folder (fp16 weights, ~11 MB + tokenizer) loadable with ``from_pretrained``.

    nice -n 19 python -m cloaklab.ops.toy.train --out ops/toy/weights      # or: make toy-model
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch

from ..diffusion import diffusion_loss, sample_timesteps
from . import dataset

TEXT_HIDDEN = 64
ATTENTION_HEADS = 2


def build_components(seed: int = 0, attention_heads: int = ATTENTION_HEADS):
    """Fresh (untrained) VAE, UNet, text encoder, tokenizer and DDIM scheduler of the toy architecture.

    ``attention_heads`` per UNet attention layer (head width 32 / heads and 64 / heads): 2 by default. The parameters
    do not depend on it, but the speed does: PyTorch's CPU attention kernel with 8 heads of width 4–8 took 56 % of a
    training step, and 2 heads halve the step time on 2 CPU cores (``diffusers`` calls this ``attention_head_dim``)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ..models.shaped import sd15_scheduler
    from ..models.tokenizer import VOCAB_SIZE, clip_tokenizer

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 64), layers_per_block=1,
        norm_num_groups=8, sample_size=dataset.RESOLUTION,
    )
    unet = UNet2DConditionModel(
        sample_size=dataset.RESOLUTION // 4, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN, attention_head_dim=attention_heads, norm_num_groups=8,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=VOCAB_SIZE, hidden_size=TEXT_HIDDEN, intermediate_size=2 * TEXT_HIDDEN, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=TEXT_HIDDEN, bos_token_id=49406,
        eos_token_id=49407, pad_token_id=49407,
    ))
    return vae, unet, text_encoder, clip_tokenizer(), sd15_scheduler()  # Stable Diffusion 1.x's schedule


def _images_tensor(items: list[dataset.ToyItem]) -> torch.Tensor:
    """(N,3,64,64) float in [-1, 1]."""
    images, _, _ = dataset.as_arrays(items)
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def train_vae(vae, images: torch.Tensor, *, minutes: float, max_steps: int, batch_size: int, device, seed: int,
              crop: int = 32):
    """Reconstruction training of the VAE until the time budget or step cap; returns (steps, last loss).

    The VAE is fully convolutional, so it trains on random ``crop``² crops (4× cheaper than 64² at 32) and is used
    on whole 64² images, as SD's VAE was trained on 256² crops and runs at 512².
    """
    generator = torch.Generator().manual_seed(seed)
    vae.to(device).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    deadline, step, smooth = time.time() + minutes * 60, 0, None
    while step < max_steps and time.time() < deadline:
        idx = torch.randint(len(images), (batch_size,), generator=generator)
        top, left = torch.randint(0, images.shape[-1] - crop + 1, (2,), generator=generator).tolist()
        batch = images[idx, :, top:top + crop, left:left + crop].to(device)
        posterior = vae.encode(batch).latent_dist
        recon = vae.decode(posterior.sample(generator=None)).sample
        loss = (recon - batch).abs().mean() + ((recon - batch) ** 2).mean() + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        smooth = loss.item() if smooth is None else 0.95 * smooth + 0.05 * loss.item()
        if step % 10 == 0:
            _log(f"vae step {step} loss {smooth:.4f}")
    vae.eval()
    return step, smooth


def calibrated_latents(vae, images: torch.Tensor, device, *, calibrate: bool):
    """Scaled VAE posteriors ``(mean, std)`` (N,4,16,16) on the CPU of ``images`` in [-1, 1], through the trainers'
    :func:`~cloaklab.ops.train.loop.latent_cache`. ``calibrate`` first sets ``scaling_factor`` to 1/std of the
    dataset's latents (unit-variance latents, as SD's 0.18215); otherwise the VAE's own factor is kept (a model being
    continued was trained at it)."""
    from ..train.loop import latent_cache

    if calibrate:
        vae.register_to_config(scaling_factor=1.0)
    means, stds = latent_cache(vae, (images + 1) / 2, device, chunk=256)
    if calibrate:
        scale = float(1.0 / means.std())
        vae.register_to_config(scaling_factor=scale)
        means, stds = means * scale, stds * scale
    return means.cpu(), stds.cpu()


@torch.no_grad()
def vae_psnr(vae, images: torch.Tensor, device) -> float:
    recon = vae.decode(vae.encode(images.to(device)).latent_dist.mean).sample.clamp(-1, 1)
    mse = (((recon - images.to(device)) / 2) ** 2).mean().item()
    return 10 * math.log10(1 / max(mse, 1e-12))


def learning_rate(lr: float, elapsed: float, budget: float, step: int, *, warmup: int = 0,
                  final_fraction: float = 1.0, max_steps: int | None = None) -> float:
    """``lr`` after a linear ``warmup`` (steps), then cosine-decayed to ``final_fraction`` of itself over whichever
    budget ends first: the wall-clock ``budget`` (seconds; what binds on a CPU) or ``max_steps`` (what binds on a
    GPU, where the step cap is reached long before the clock runs out)."""
    ramp = min(1.0, (step + 1) / warmup) if warmup else 1.0
    time_progress = elapsed / budget if budget > 0 else 1.0
    step_progress = step / max_steps if max_steps else 0.0
    progress = min(1.0, max(0.0, time_progress, step_progress))
    return lr * ramp * (final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress)))


def train_unet(unet, text_encoder, tokenizer, scheduler, means, stds, captions, *, minutes: float,
               max_steps: int, batch_size: int, device, seed: int, save_fn=None, save_every_min: float = 5.0,
               lr: float = 1e-3, warmup: int = 0, final_lr_fraction: float = 1.0):
    """Joint UNet + text-encoder training; returns (EMA unet, EMA text encoder, steps, last loss).

    The learning rate is ``lr`` (constant by default); ``warmup`` steps and ``final_lr_fraction`` < 1 give a warmup
    and a cosine decay over the time budget (used when continuing from trained weights)."""
    generator = torch.Generator().manual_seed(seed)
    unet.to(device).train()
    text_encoder.to(device).train()
    ids = tokenizer(captions + [""], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    caption_ids, empty_ids = ids[:-1], ids[-1:]
    embeddings = text_encoder.get_input_embeddings().weight
    params = [{"params": list(unet.parameters()), "weight_decay": 1e-2},
              {"params": [p for p in text_encoder.parameters() if p is not embeddings], "weight_decay": 1e-2},
              {"params": [embeddings], "weight_decay": 0.0}]  # unused token rows must not decay away
    optimizer = torch.optim.AdamW(params, lr=lr)
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    live = list(unet.parameters()) + list(text_encoder.parameters())
    shadow = list(ema_unet.parameters()) + list(ema_text.parameters())
    start = time.time()
    deadline, next_save, step, smooth = start + minutes * 60, start + save_every_min * 60, 0, None
    while step < max_steps and time.time() < deadline:
        idx = torch.randint(len(means), (batch_size,), generator=generator)
        z0 = means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=generator)
        tokens = caption_ids[idx].clone()
        dropped = torch.rand(batch_size, generator=generator) < 0.1
        tokens[dropped] = empty_ids
        noise = torch.randn(z0.shape, generator=generator)
        t = sample_timesteps(batch_size, "uniform", generator=generator)
        text_emb = text_encoder(tokens.to(device))[0]
        loss = diffusion_loss(unet, scheduler, z0.to(device), text_emb, t.to(device), noise.to(device)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(live, 1.0)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(lr, time.time() - start, minutes * 60, step, warmup=warmup,
                                        final_fraction=final_lr_fraction, max_steps=max_steps)
        optimizer.step()
        step += 1
        decay = min(0.998, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(shadow, [p.detach() for p in live], 1 - decay)
        smooth = loss.item() if smooth is None else 0.98 * smooth + 0.02 * loss.item()
        if step % 10 == 0:
            _log(f"unet step {step} loss {smooth:.4f} lr {optimizer.param_groups[0]['lr']:.2e} "
                 f"({(time.time() - start) / step:.2f} s/step)")
        if save_fn is not None and time.time() > next_save:
            save_fn(ema_unet, ema_text, step, smooth)
            next_save = time.time() + save_every_min * 60
    return ema_unet, ema_text, step, smooth


def load_trained(folder: Path):
    """VAE, UNet and text encoder (float32) of a saved toy folder, and its ``toy_train.json`` record."""
    from ..models import load_pipeline

    pipe = load_pipeline(str(folder))
    record = folder / "toy_train.json"
    return pipe.vae, pipe.unet, pipe.text_encoder, json.loads(record.read_text()) if record.exists() else {}


def save_pipeline(out: Path, vae, unet, text_encoder, tokenizer, scheduler, info: dict) -> None:
    """Write a diffusers ``StableDiffusionPipeline`` folder with fp16 safetensors (atomic per folder swap)."""
    import shutil

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=copy.deepcopy(vae).cpu().half(), text_encoder=copy.deepcopy(text_encoder).cpu().half(), tokenizer=tokenizer,
        unet=copy.deepcopy(unet).cpu().half(), scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    tmp = out.with_name(out.name + ".tmp")
    check_replaceable(out)
    check_replaceable(tmp)
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    (tmp / "toy_train.json").write_text(json.dumps(info, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def check_replaceable(folder: Path) -> None:
    """Refuse to replace ``folder`` unless it is missing or a toy model this script wrote (it holds
    ``toy_train.json``): ``--out`` must never delete a folder of the user's."""
    from ..errors import UsageError

    folder = Path(folder)
    if not folder.exists() and not folder.is_symlink():
        return
    if folder.is_symlink() or not folder.is_dir() or not (folder / "toy_train.json").is_file():
        raise UsageError(f"{folder} exists and is not a toy model written by this script (no toy_train.json); "
                         "choose another --out or move it away")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train the toy world's text-to-image model (--model toy).")
    parser.add_argument("--out", default=str(Path(__file__).parent / "weights"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--attention-heads", type=int, default=ATTENTION_HEADS,
                        help="heads per UNet attention layer (8 made the CPU step twice as slow)")
    parser.add_argument("--num-images", type=int, default=6000)
    parser.add_argument("--novel-fraction", type=float, default=dataset.NOVEL_FRACTION,
                        help="share of training images showing an unnamed shape")
    parser.add_argument("--vae-minutes", type=float, default=7.0)
    parser.add_argument("--vae-steps", type=int, default=3000)
    parser.add_argument("--vae-batch-size", type=int, default=32)
    parser.add_argument("--vae-crop", type=int, default=32, help="training crop size (64 = whole images)")
    parser.add_argument("--save-every-min", type=float, default=5.0)
    parser.add_argument("--unet-minutes", type=float, default=75.0)
    parser.add_argument("--unet-steps", type=int, default=20000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--final-lr-fraction", type=float, default=0.1,
                        help="cosine-decay the UNet learning rate to this fraction over --unet-minutes or "
                             "--unet-steps, whichever ends first (1 = constant)")
    parser.add_argument("--init-from", default=None,
                        help="continue from a trained toy folder: keep its VAE (and scaling factor), start the UNet "
                             "and text encoder from its EMA weights (fresh optimizer, 100-step warmup)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    out = Path(args.out)
    _log(f"generating {args.num_images} toy images (seed {args.seed})")
    items = dataset.generate(args.num_images, seed=args.seed, novel_fraction=args.novel_fraction)
    images = _images_tensor(items)
    captions = [it.caption for it in items]
    vae, unet, text_encoder, tokenizer, scheduler = build_components(args.seed, args.attention_heads)
    previous: dict = {}
    if args.init_from:
        vae, unet, text_encoder, previous = load_trained(Path(args.init_from))
        vae_steps = previous.get("vae_steps", 0)
        _log(f"continuing from {args.init_from} ({previous.get('unet_steps', '?')} UNet steps so far)")
    else:
        vae_steps, _ = train_vae(vae, images, minutes=args.vae_minutes, max_steps=args.vae_steps,
                                 batch_size=args.vae_batch_size, device=device, seed=args.seed, crop=args.vae_crop)
    vae.to(device)
    psnr = vae_psnr(vae, images[:256], device)
    _log(f"vae: {vae_steps} steps, PSNR {psnr:.2f} dB")
    means, stds = calibrated_latents(vae, images, device, calibrate=not args.init_from)
    scale = float(vae.config.scaling_factor)
    _log(f"latents cached, scaling factor {scale:.4f}")
    vae.requires_grad_(False)

    info = {"seed": args.seed, "num_images": args.num_images, "novel_fraction": args.novel_fraction,
            "vae_steps": vae_steps, "vae_psnr_db": round(psnr, 2),
            "scaling_factor": scale, "batch_size": args.batch_size, "device": str(device)}
    if previous:
        info["continued_from"] = {k: previous[k] for k in ("num_images", "novel_fraction", "unet_steps", "unet_minutes",
                                                          "continued_from") if k in previous}

    def save(ema_unet, ema_text, step, loss):
        save_pipeline(out, vae, ema_unet, ema_text, tokenizer, scheduler,
                      {**info, "unet_steps": step + previous.get("unet_steps", 0), "unet_loss": round(float(loss), 5),
                       "final": False})
        _log(f"checkpoint saved at step {step}")

    t0 = time.time()
    ema_unet, ema_text, steps, loss = train_unet(
        unet, text_encoder, tokenizer, scheduler, means, stds, captions,
        minutes=args.unet_minutes, max_steps=args.unet_steps, batch_size=args.batch_size, device=device,
        seed=args.seed + previous.get("unet_steps", 0),  # fresh batches when continuing
        save_fn=save, save_every_min=args.save_every_min, lr=args.lr,
        warmup=100 if args.init_from else 0, final_lr_fraction=args.final_lr_fraction)
    steps += previous.get("unet_steps", 0)
    info.update(unet_steps=steps, unet_loss=round(float(loss), 5), unet_minutes=round((time.time() - t0) / 60, 1),
                final=True)
    save_pipeline(out, vae, ema_unet, ema_text, tokenizer, scheduler, info)
    _log(f"done: {steps} UNet steps, weights in {out}")


if __name__ == "__main__":
    main()
