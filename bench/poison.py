"""Benchmark the PGD engine (not a test): ratios measured side by side in one run.

CPU, tiny model (default):
  * one adm+ PGD step vs a bare VAE-encoder + UNet forward+backward on the same input   (goal ≤ 1.10×)
  * one sds step vs one adm step                                                         (goal ≤ 0.6×)
  * batched vs one-by-one throughput of adm+ steps

GPU (``--device cuda --sd15``): SD1.5-shaped UNet/VAE with random weights at 512², bf16:
  * seconds per image for 100 adm+ steps, batched (``--batch``, default 4)              (goal ≤ 3 s/img)
  * peak memory of one image with gradient checkpointing on                             (goal ≤ 8 GB)
  * sds step vs adm step at that size                                                    (goal ≤ 0.6×)

Usage:  python bench/poison.py [--device cpu|cuda] [--sd15] [--size 64] [--repeats 20] [--batch 4] [--steps 100]
"""

from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import torch

from cloaklab.ops import diffusion
from cloaklab.ops.attacks import engine, sds


def sd15_pipe(device: torch.device, dtype: torch.dtype):
    """SD1.5-shaped UNet (320/640/1280/1280, cross-attn 768) and VAE (128/256/512/512), random weights."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    unet = UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), latent_channels=4, layers_per_block=2,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        scaling_factor=0.18215)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=False)
    return SimpleNamespace(unet=unet.to(device, dtype), vae=vae.to(device, dtype), scheduler=scheduler)


def attack_models(pipe, device, dtype, checkpointing: bool = False) -> engine.AttackModels:
    models = engine.AttackModels(pipe, checkpointing=checkpointing)
    if isinstance(pipe, SimpleNamespace):  # no text encoder: a fixed random condition (speed only)
        dim = pipe.unet.config.cross_attention_dim
        models._embeddings[models.prompt] = (torch.randn(1, 77, dim, device=device, dtype=dtype), {})
    return models


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(functions, repeats: int, device: torch.device) -> list[float]:
    """Best (minimum) seconds per call of each function — the figure least disturbed by other processes on a shared
    machine (as ``timeit`` advises) — with calls interleaved round-robin, after two warm-up calls each."""
    for function in functions:
        function()
        function()
    samples: list[list[float]] = [[] for _ in functions]
    for _ in range(repeats):
        for index, function in enumerate(functions):
            sync(device)
            start = time.perf_counter()
            function()
            sync(device)
            samples[index].append(time.perf_counter() - start)
    return [min(values) for values in samples]


def cpu_ratios(models: engine.AttackModels, size: int, repeats: int, batch: int, device: torch.device) -> None:
    x = torch.rand(1, 3, size, size, device=device)
    gens = [torch.Generator().manual_seed(0)]
    clean = x.clone()

    def bare() -> None:  # the irreducible work: encoder + UNet forward and backward, nothing else
        xi = x.detach().requires_grad_(True)
        z = diffusion.encode_images(models.vae, xi).float()
        t = torch.tensor([500], device=device)
        noise = torch.randn_like(z)
        pred = models.unet(diffusion.add_noise(models.scheduler, z, noise, t).to(models.dtype), t,
                           encoder_hidden_states=models.text_embeddings(1)).sample
        ((pred.float() - noise) ** 2).mean().backward()

    def adm_step() -> None:
        grad, _ = engine.loss_gradient(x, models.denoise_loss, gens)
        engine.pgd_step(x, grad, clean, eps=16, step_size=1)

    def sds_step() -> None:
        grad, _ = engine.loss_gradient(x, lambda xi, g: sds.sds_surrogate(models, xi, g), gens)
        engine.pgd_step(x, grad, clean, eps=16, step_size=1)

    t_bare, t_adm, t_sds = timed([bare, adm_step, sds_step], repeats, device)
    print(f"bare encoder+UNet fwd+bwd: {t_bare * 1e3:8.2f} ms")
    print(f"adm+ PGD step:             {t_adm * 1e3:8.2f} ms   ratio adm/bare = {t_adm / t_bare:.3f}  (goal <= 1.10)")
    print(f"sds PGD step:              {t_sds * 1e3:8.2f} ms   ratio sds/adm  = {t_sds / t_adm:.3f}  (goal <= 0.60)")

    xb = torch.rand(batch, 3, size, size, device=device)
    gens_b = [torch.Generator().manual_seed(i) for i in range(batch)]

    def batched() -> None:
        engine.loss_gradient(xb, models.denoise_loss, gens_b)

    def one_by_one() -> None:
        for i in range(batch):
            engine.loss_gradient(xb[i:i + 1], models.denoise_loss, gens_b[i:i + 1])

    t_b, t_1 = timed([batched, one_by_one], max(3, repeats // batch), device)
    print(f"throughput batch {batch}: {batch / t_b:8.1f} img-steps/s; one by one {batch / t_1:8.1f}; "
          f"speed-up {t_1 / t_b:.2f}x")


def gpu_figures(device: torch.device, dtype: torch.dtype, batch: int, steps: int) -> None:
    pipe = sd15_pipe(device, dtype)
    models = attack_models(pipe, device, dtype)
    x = torch.rand(batch, 3, 512, 512, device=device)
    gens = [torch.Generator().manual_seed(i) for i in range(batch)]
    engine.pgd(x, models.denoise_loss, generators=gens, steps=2, eval_draws=0)  # warm-up
    sync(device)
    start = time.perf_counter()
    engine.pgd(x, models.denoise_loss, generators=gens, steps=steps, eval_draws=0)
    sync(device)
    seconds = time.perf_counter() - start
    print(f"SD1.5-shaped 512² {dtype}: {steps} adm+ steps, batch {batch}: {seconds / batch:.2f} s/img (goal <= 3)")
    one, gen1 = x[:1], gens[:1]
    t_adm, t_sds = timed([lambda: engine.loss_gradient(one, models.denoise_loss, gen1),
                          lambda: engine.loss_gradient(one, lambda xi, g: sds.sds_surrogate(models, xi, g), gen1)],
                         5, device)
    print(f"SD1.5-shaped 512² one image: sds step / adm step = {t_sds / t_adm:.3f} (goal <= 0.60)")
    del models, pipe
    torch.cuda.empty_cache()
    pipe = sd15_pipe(device, dtype)
    models = attack_models(pipe, device, dtype, checkpointing=True)
    torch.cuda.reset_peak_memory_stats(device)
    engine.pgd(x[:1], models.denoise_loss, generators=gens[:1], steps=3, eval_draws=0)
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    print(f"peak memory, one image, checkpointing on: {peak:.2f} GiB (goal <= 8)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sd15", action="store_true", help="GPU figures with an SD1.5-shaped random model")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1: stable figures on shared machines)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    if args.sd15:
        if device.type != "cuda":
            raise SystemExit("--sd15 figures need --device cuda (512² SD1.5 on a CPU is not a meaningful figure)")
        gpu_figures(device, torch.bfloat16, args.batch, args.steps)
        return
    from cloaklab.ops.models import load_pipeline

    pipe = load_pipeline("tiny", device=device)
    cpu_ratios(attack_models(pipe, device, torch.float32), args.size, args.repeats, args.batch, device)


if __name__ == "__main__":
    main()
