"""Benchmark the PGD engine (not a test): ratios measured side by side in one run.

CPU, tiny model (default):
  * one adm+ PGD step vs a bare VAE-encoder + UNet forward+backward on the same input   (goal ≤ 1.10×)
  * one sds step vs one adm step                                                         (goal ≤ 0.6×)
  * batched vs one-by-one throughput of adm+ steps

GPU (``--device cuda --sd15``): ``--model sd15-shaped`` (SD 1.5's architecture, random weights) at 512², bf16:
  * seconds per image for 100 adm+ steps, batched (``--batch``, default 4)              (goal ≤ 3 s/img)
  * peak memory of one image with gradient checkpointing on                             (goal ≤ 8 GB)
  * sds step vs adm step at that size, and their parts (VAE-encoder fwd+bwd, UNet forward) (goal ≤ 0.6×)
  * batch 1 and 2×batch, and two knobs left off by default (cudnn.benchmark, channels-last), side by side
Figures from one H100: bench/gpu-h100.md.

Usage:  python bench/poison.py [--device cpu|cuda] [--sd15] [--size 64] [--repeats 20] [--batch 4] [--steps 100]
"""

from __future__ import annotations

import argparse
import time

import torch

from cloaklab.ops import diffusion
from cloaklab.ops.attacks import engine, sds


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


def pgd_seconds_per_image(models: engine.AttackModels, device: torch.device, batch: int, steps: int) -> float:
    x = torch.rand(batch, 3, 512, 512, device=device)
    gens = [torch.Generator().manual_seed(i) for i in range(batch)]
    engine.pgd(x, models.denoise_loss, generators=gens, steps=2, eval_draws=0)  # warm-up (cuDNN plans)
    sync(device)
    start = time.perf_counter()
    engine.pgd(x, models.denoise_loss, generators=gens, steps=steps, eval_draws=0)
    sync(device)
    return (time.perf_counter() - start) / batch


def step_parts(models: engine.AttackModels, device: torch.device) -> None:
    """One image: sds step / adm step, and what they are made of (VAE-encoder fwd+bwd, UNet forward)."""
    one = torch.rand(1, 3, 512, 512, device=device)
    gen1 = [torch.Generator().manual_seed(0)]
    latents = models.encode(one).detach()
    t500 = torch.tensor([500], device=device)

    def unet_forward() -> None:
        with torch.no_grad():
            models.predict(latents, t500, (512, 512))

    t_adm, t_sds, t_vae, t_unet = timed([
        lambda: engine.loss_gradient(one, models.denoise_loss, gen1),
        lambda: engine.loss_gradient(one, lambda xi, g: sds.sds_surrogate(models, xi, g), gen1),
        lambda: engine.loss_gradient(one, lambda xi, g: models.encode(xi).square().flatten(1).mean(1), gen1),
        unet_forward], 5, device)
    print(f"SD1.5-shaped 512² one image: sds step / adm step = {t_sds / t_adm:.3f} (goal <= 0.60); parts: "
          f"VAE-encoder fwd+bwd {t_vae * 1e3:.1f} ms, UNet forward {t_unet * 1e3:.1f} ms, adm step "
          f"{t_adm * 1e3:.1f} ms, sds step {t_sds * 1e3:.1f} ms")


def gpu_figures(device: torch.device, dtype: torch.dtype, batch: int, steps: int) -> None:
    from cloaklab.ops.models import load_pipeline

    models = engine.AttackModels(load_pipeline("sd15-shaped", device, dtype))
    t_default = pgd_seconds_per_image(models, device, batch, steps)
    print(f"SD1.5-shaped 512² {dtype}: {steps} adm+ steps, batch {batch}: {t_default:.2f} s/img (goal <= 3)")
    for other in (1, 2 * batch):
        seconds = pgd_seconds_per_image(models, device, other, steps // 4) * 4
        print(f"  batch {other}: {seconds:.2f} s/img per {steps} steps")
    # Knobs we do not turn on by default, measured side by side: cuDNN autotuning and channels-last memory format.
    torch.backends.cudnn.benchmark = True
    t_tuned = pgd_seconds_per_image(models, device, batch, steps // 4) * 4
    for module in (models.unet, models.vae):
        module.to(memory_format=torch.channels_last)
    t_nhwc = pgd_seconds_per_image(models, device, batch, steps // 4) * 4
    torch.backends.cudnn.benchmark = False
    print(f"  batch {batch}: cudnn.benchmark {t_tuned:.2f} s/img ({t_default / t_tuned:.2f}x the default's speed), "
          f"+ channels-last {t_nhwc:.2f} s/img ({t_default / t_nhwc:.2f}x)")
    models = engine.AttackModels(load_pipeline("sd15-shaped", device, dtype))
    step_parts(models, device)
    del models
    torch.cuda.empty_cache()
    models = engine.AttackModels(load_pipeline("sd15-shaped", device, dtype), checkpointing=True)
    one = torch.rand(1, 3, 512, 512, device=device)
    torch.cuda.reset_peak_memory_stats(device)
    engine.pgd(one, models.denoise_loss, generators=[torch.Generator().manual_seed(0)], steps=3, eval_draws=0)
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
    cpu_ratios(engine.AttackModels(pipe), args.size, args.repeats, args.batch, device)


if __name__ == "__main__":
    main()
