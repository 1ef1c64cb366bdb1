"""Benchmark the PGD engine (not a test): ratios measured side by side in one run.

CPU, tiny model (default):
  * one adm+ PGD step vs a bare VAE-encoder + UNet forward+backward on the same input, batch 1 and --batch
                                                                                         (goal ≤ 1.05×)
  * one sds step vs one adm step                                                         (goal ≤ 0.6×)
  * batched vs one-by-one throughput of adm+ steps
  * ``--aspl``: aspl's PGD per image-step at the default minibatch (the whole set) and at --batch-size 1 vs
    Anti-DreamBooth's own loop (attacks/aspl.py ``pgd_attack``: every image in one batch), written out here (≤ 1.0)
  * ``--native``: native-size protection — adm+ (ε 8, --native-steps) on photos 2.5× and 8× the working size 64,
    saved as 8-bit, shrunk by PIL BICUBIC / BILINEAR / LANCZOS: loss rise ÷ the rise of the same attack at the
    working size (target ≥ 0.8), next to the old path (--working-size); and the extra cost of a native step

GPU (``--device cuda --sd15``): ``--model sd15-shaped`` (SD 1.5's architecture, random weights) at 512², bf16:
  * seconds per image for 100 adm+ steps, batched (``--batch``, default 4)              (goal ≤ 3 s/img)
  * peak memory of one image with gradient checkpointing on                             (goal ≤ 8 GB)
  * sds step vs adm step at that size, and their parts (VAE-encoder fwd+bwd, UNet forward) (goal ≤ 0.6×)
  * batch 1 and 2×batch, and two knobs left off by default (cudnn.benchmark, channels-last), side by side
Figures from one H100: bench/gpu-h100.md.

Usage:  python bench/poison.py [--device cpu|cuda] [--sd15] [--size 64] [--repeats 20] [--batch 4] [--steps 100]
                              [--aspl] [--native [--native-steps 20]]
Ratios are printed as the median and range over the repeats of calls timed side by side (round-robin).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from cloaklab.ops import diffusion
from cloaklab.ops.attacks import engine, sds


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(functions, repeats: int, device: torch.device) -> list[float]:
    """Best (minimum) seconds per call of each function — the figure least disturbed by other processes on a shared
    machine (as ``timeit`` advises) — from :func:`timed_samples`."""
    return [min(values) for values in timed_samples(functions, repeats, device)]


def timed_samples(functions, repeats: int, device: torch.device) -> list[list[float]]:
    """Seconds per call of each function, ``repeats`` samples each, interleaved round-robin after two warm-ups."""
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
    return samples


def ratio_text(numerator: list[float], denominator: list[float]) -> str:
    """Median and range of the per-repeat ratios of two side-by-side series."""
    ratios = sorted(a / b for a, b in zip(numerator, denominator))
    return f"median {statistics.median(ratios):.3f} (range {ratios[0]:.3f}–{ratios[-1]:.3f}, n={len(ratios)})"


def bare_vs_adm(models: engine.AttackModels, size: int, repeats: int, batch: int, device: torch.device) -> None:
    """adm+ step ÷ the irreducible encoder + UNet forward/backward (plain diffusers calls), at ``batch``."""
    x = torch.rand(batch, 3, size, size, device=device)
    gens = [torch.Generator().manual_seed(i) for i in range(batch)]
    clean = x.clone()
    embeddings = models.text_embeddings(batch).to(models.dtype)
    vae, unet, scheduler = models.vae, models.unet, models.scheduler

    def bare() -> None:
        xi = x.detach().requires_grad_(True)
        z = vae.encode(xi * 2 - 1).latent_dist.mean * vae.config.scaling_factor
        t = torch.full((batch,), 500, device=device)
        noise = torch.randn_like(z)
        pred = unet(scheduler.add_noise(z, noise, t), t, encoder_hidden_states=embeddings).sample
        ((pred.float() - noise) ** 2).mean().backward()

    def adm_step() -> None:
        grad, _ = engine.loss_gradient(x, models.denoise_loss, gens)
        engine.pgd_step(x, grad, clean, eps=16, step_size=1)

    t_bare, t_adm = timed_samples([bare, adm_step], repeats, device)
    print(f"batch {batch}: bare {statistics.median(t_bare) * 1e3:.2f} ms, adm+ step "
          f"{statistics.median(t_adm) * 1e3:.2f} ms; adm/bare {ratio_text(t_adm, t_bare)}  (goal <= 1.05)")


def cpu_ratios(models: engine.AttackModels, size: int, repeats: int, batch: int, device: torch.device) -> None:
    for b in (1, batch):
        bare_vs_adm(models, size, repeats, b, device)
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


def aspl_figures(pipe, size: int, repeats: int, images: int, device: torch.device) -> None:
    """aspl's PGD (pgd_over_set, default minibatch and --batch-size 1) vs Anti-DreamBooth's loop, per image-step."""
    import torch.nn.functional as F

    from cloaklab.ops.attacks.setlevel import attack_models, base_surrogate, pgd_over_set, start_run

    photos = [torch.rand(3, size, size) for _ in range(images)]
    gens = [torch.Generator().manual_seed(i) for i in range(images)]
    run = start_run(photos, pipe=pipe, generators=gens, prior_weight=0.0)
    surrogate = base_surrogate(pipe)
    models = attack_models(surrogate, run)
    clean = torch.stack(photos).to(device)
    ids = pipe.tokenizer([run.dreambooth.instance_prompt] * images, padding="max_length", truncation=True,
                         max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids.to(device)
    vae, unet, text_encoder, scheduler = surrogate.vae, surrogate.unet, surrogate.text_encoder, pipe.scheduler
    state = {"x": clean.clone()}

    def reference_step() -> None:  # Anti-DreamBooth attacks/aspl.py pgd_attack, one step, all images in one batch
        x = state["x"].detach().requires_grad_(True)
        latents = vae.encode(x * 2 - 1).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (images,), device=device)
        pred = unet(scheduler.add_noise(latents, noise, t), t, text_encoder(ids)[0]).sample
        F.mse_loss(pred.float(), noise.float(), reduction="mean").backward()
        step = x + 0.6375 / 255 * x.grad.sign()
        state["x"] = (clean + (step - clean).clamp(-6.375 / 255, 6.375 / 255)).clamp(0, 1).detach()

    def ours(batch):
        def step() -> None:
            run.batch_size = batch
            pgd_over_set(run, models, 1, eps=6.375, step_size=0.6375)
        return step

    t_ref, t_default, t_one = timed_samples([reference_step, ours(None), ours(1)], repeats, device)
    print(f"aspl PGD, {images} images at {size}²: reference {statistics.median(t_ref) / images * 1e3:.2f} ms per "
          f"image-step; ours (default, whole set) / reference {ratio_text(t_default, t_ref)} (goal <= 1.0); "
          f"--batch-size 1 / reference {ratio_text(t_one, t_ref)}")


def native_figures(pipe, steps: int, repeats: int, factors=(2.5, 8.0), work: int = 64) -> None:
    """Native-size protection: loss rise after the mimic's PIL resize ÷ the rise at the working size."""
    import numpy as np
    from PIL import Image
    from skimage import data

    from cloaklab.ops.attacks import adm
    from cloaklab.ops.attacks.native import to_native
    from cloaklab.ops.attacks.resample import NativeView

    models = engine.AttackModels(pipe)
    names = ("astronaut", "chelsea", "coffee", "rocket")
    filters = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "lanczos": Image.LANCZOS}

    def tensor(array) -> torch.Tensor:
        return torch.from_numpy(np.asarray(array, dtype=np.float32) / 255).permute(2, 0, 1)

    def stored(x: torch.Tensor) -> np.ndarray:
        return (x.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()

    def loss(batch: torch.Tensor) -> torch.Tensor:  # fixed draws, per image
        gens = [torch.Generator().manual_seed(1000 + i) for i in range(len(batch))]
        with torch.no_grad():
            return torch.stack([models.denoise_loss(batch, gens) for _ in range(32)]).mean(0)

    def gens() -> list[torch.Generator]:
        return [torch.Generator().manual_seed(i) for i in range(len(names))]

    for factor in factors:
        side = int(round(work * factor))
        photos = [np.asarray(Image.fromarray(getattr(data, n)()).convert("RGB").resize((side, side), Image.LANCZOS))
                  for n in names]
        clean_work = torch.stack([tensor(Image.fromarray(p).resize((work, work), Image.BICUBIC)) for p in photos])
        result = adm.attack(clean_work, models=models, generators=gens(), eps=8, step_size=1, steps=steps,
                            eval_draws=0)
        adv_work = torch.stack([tensor(stored(x)) for x in result.images])
        rise_work = loss(adv_work) - loss(clean_work)
        old = [stored(to_native(adv_work[i], clean_work[i], tensor(p))) for i, p in enumerate(photos)]
        clean_native = torch.stack([tensor(p) for p in photos])
        models.view = NativeView((work, work), generators=[torch.Generator().manual_seed(99 + i)
                                                           for i in range(len(names))])
        result = adm.attack(clean_native, models=models, generators=gens(), eps=8, step_size=1, steps=steps,
                            eval_draws=0)
        models.view = None
        new = [stored(x) for x in result.images]
        linf = max(int(np.abs(a.astype(int) - b.astype(int)).max()) for a, b in zip(new, photos))
        print(f"{side}² photos ({factor}× the working {work}), adm+ eps 8, {steps} steps; rise at {work}: "
              f"{float(rise_work.mean()):.4f}; saved L∞ {linf}/255")
        for name, flag in filters.items():
            clean_seen = loss(torch.stack([tensor(Image.fromarray(p).resize((work, work), flag)) for p in photos]))

            def kept(arrays) -> str:
                seen = torch.stack([tensor(Image.fromarray(a).resize((work, work), flag)) for a in arrays])
                per_image = (loss(seen) - clean_seen) / rise_work
                mean = float((loss(seen) - clean_seen).mean() / rise_work.mean())
                return f"{mean:.3f} (per photo {float(per_image.min()):.2f}–{float(per_image.max()):.2f})"

            print(f"  {name:8s}: native {kept(new)}   old path (--working-size) {kept(old)}   (target >= 0.8)")
        one_native, one_work = clean_native[:1], clean_work[:1]
        g1 = [torch.Generator().manual_seed(0)]

        def native_step() -> None:
            models.view = NativeView((work, work), generators=[torch.Generator().manual_seed(1)])
            engine.loss_gradient(one_native, models.denoise_loss, g1)
            models.view = None

        def work_step() -> None:
            engine.loss_gradient(one_work, models.denoise_loss, g1)

        t_native, t_work = timed_samples([native_step, work_step], repeats, torch.device("cpu"))
        print(f"  step cost, one photo: native {statistics.median(t_native) * 1e3:.1f} ms vs working "
              f"{statistics.median(t_work) * 1e3:.1f} ms; native/working {ratio_text(t_native, t_work)}")


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
    parser.add_argument("--aspl", action="store_true", help="aspl PGD vs Anti-DreamBooth's batched loop")
    parser.add_argument("--native", action="store_true", help="native-size protection ratios and step cost")
    parser.add_argument("--native-steps", type=int, default=20)
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
    if args.native:
        native_figures(pipe, args.native_steps, max(3, args.repeats // 4))
        return
    if args.aspl:
        aspl_figures(pipe, args.size, args.repeats, args.batch, device)
        return
    cpu_ratios(engine.AttackModels(pipe), args.size, args.repeats, args.batch, device)


if __name__ == "__main__":
    main()
