"""Benchmark the set-level poisons against their bare parts, side by side in one run (not a test).

Prints, for the same device, model and image size:
  * one ASPL round (clone f → f′, 3 + 3 DreamBooth steps, 6 PGD steps over the set) vs the sum of its bare parts
    (3 + 3 plain UNet+prior fwd/bwd/AdamW steps, 6 plain VAE+UNet fwd/bwd passes per image) — the machinery overhead;
  * an InMark self-influence step per image (identity, cg with 5 HVPs) vs an LF-PGD step per image;
  * class images: first generation vs a cached rerun.

    python bench/poison_setlevel.py                                  # CPU, tiny model, 64 px
    python bench/poison_setlevel.py --device cuda --sd-shaped --resolution 512 --dtype bf16
      (SD 1.5-shaped random UNet/VAE/text encoder: random weights are fine for speed and memory)
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch


def timed(device: torch.device, fn, repeats: int = 1) -> float:
    fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--sd-shaped", action="store_true")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    from cloaklab.ops import diffusion
    from cloaklab.ops.attacks import aspl, inmark
    from cloaklab.ops.attacks.engine import AttackModels
    from cloaklab.ops.attacks.lowfreq import lowpass
    from cloaklab.ops.attacks.setlevel import base_surrogate, class_images, model_fingerprint, start_run
    from cloaklab.ops.models import load_pipeline
    from cloaklab.tests.conftest import photo_tensor

    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    pipe = load_pipeline("sd15-shaped" if args.sd_shaped else "tiny", device, dtype)
    models = AttackModels(pipe, prompt="a photo of sks person")
    names = ["astronaut", "chelsea", "coffee", "rocket"]
    images = [photo_tensor(names[i % 4], args.resolution).to(device) for i in range(args.images)]
    gens = [torch.Generator().manual_seed(i) for i in range(args.images)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    with tempfile.TemporaryDirectory() as cache:
        first = time.perf_counter()
        class_images(pipe, "a photo of person", 2, cache_dir=cache, model_id=model_fingerprint(pipe),
                     resolution=args.resolution, steps=5)
        first = time.perf_counter() - first
        again = timed(device, lambda: class_images(pipe, "a photo of person", 2, cache_dir=cache,
                                                   model_id=model_fingerprint(pipe), resolution=args.resolution,
                                                   steps=5))
        run = start_run(images, pipe=pipe, generators=gens, num_class_images=2, class_steps=5, class_dir=cache,
                        batch_size=args.images)
        f = base_surrogate(pipe)
        round_time = timed(device, lambda: aspl.aspl_round(run, f, eps=6.375, step_size=0.6375, surrogate_steps=3,
                                                           pgd_steps=6), args.repeats)

    # bare parts: plain UNet(+prior) training steps on a copy, plain VAE+UNet fwd/bwd w.r.t. the pixels
    bare = base_surrogate(pipe)
    bare.unet.requires_grad_(True)
    bare.text_encoder.requires_grad_(True)
    optimizer = torch.optim.AdamW(list(bare.unet.parameters()) + list(bare.text_encoder.parameters()), lr=5e-7)
    batch = torch.stack(images[:1] * 2)

    def train_step() -> None:
        with torch.no_grad():
            z = diffusion.encode_images(pipe.vae, batch).float()
        text = diffusion.encode_prompts(bare, ["a photo of sks person", "a photo of person"], device)
        t = torch.randint(0, 1000, (2,), device=device)
        loss = diffusion.diffusion_loss(bare.unet, pipe.scheduler, z, text, t, torch.randn_like(z)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def pgd_pass() -> None:
        x = torch.stack(images).requires_grad_(True)
        models.denoise_loss(x, gens).sum().backward()

    bare_train, bare_pgd = timed(device, train_step, args.repeats), timed(device, pgd_pass, args.repeats)
    bare_round = 6 * bare_train + 6 * bare_pgd

    theta = base_surrogate(pipe)
    frozen = AttackModels(theta, prompt="a photo of sks person")
    subset = inmark.influence_parameters(theta.unet, "attn2.to_k,attn2.to_v")
    for p in subset:
        p.requires_grad_(True)
    one = images[0][None]
    hvp = inmark.hessian_operator(frozen, one, subset, [0])

    def influence(solver: str) -> None:
        inmark.self_influence(frozen, one, torch.Generator().manual_seed(1), subset, hvp, solver=solver, steps=5,
                              damping=0.01, scale=10.0)

    def lf_step() -> None:
        x = one.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(frozen.denoise_loss(x, [torch.Generator().manual_seed(1)]).sum(), x)
        lowpass(grad, 0.25)

    lf = timed(device, lf_step, args.repeats)
    identity, cg = timed(device, lambda: influence("identity"), args.repeats), timed(device, lambda: influence("cg"),
                                                                                    args.repeats)
    shape = "SD1.5-shaped" if args.sd_shaped else "tiny"
    print(f"device {device}, {shape}, {args.dtype}, {args.images} images at {args.resolution}px")
    print(f"ASPL round            {round_time:8.3f} s   bare parts {bare_round:8.3f} s   ratio "
          f"{round_time / bare_round:5.2f}x")
    print(f"InMark influence step identity {identity * 1e3:8.1f} ms  ratio {identity / lf:5.2f}x of an LF-PGD step "
          f"({lf * 1e3:.1f} ms); cg(5 HVPs) {cg * 1e3:8.1f} ms  ratio {cg / lf:5.2f}x")
    print(f"class images (2)      first {first:7.3f} s   cached rerun {again:7.4f} s   ratio {again / first:6.4f}x")
    if device.type == "cuda":
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
