"""Benchmark ``cloak train-ti`` (a plain script, not a test): per-step times measured side by side in one run.

CPU, tiny model (default)::

    .venv/bin/python bench/train_ti.py

  * TI step (shared loop: data order, t-sampler, posterior sample, prompt draw, hook-placed token rows, AdamW, log)
    vs a bare text-encoder + UNet forward/backward on a fixed batch — goal ratio ≤ 1.10;
  * SZT per-step overhead: LM + threshold-high sampling vs the nominal step — goal ratio ≤ 1.02 (JPEG is a one-off
    preprocessing of the training images, so it costs nothing per step).

GPU (when one is lent; not measured in this project's CPU-only sessions)::

    python bench/train_ti.py --device cuda --model sd15-shaped --resolution 512 --steps 50

  ``sd15-shaped`` is a random-weight pipeline with Stable Diffusion 1.5's architecture (UNet 320-640-1280-1280,
  CLIP-L-sized text encoder, 8× VAE), so timings match SD1.5 without downloading weights; a real model id or
  folder works too. Prints s/step and the extrapolated time for 5000 steps (goal ≤ 5 min; the diffusers TI README
  quotes ~1 h for 3000 steps on a V100).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def load(model: str, device: torch.device, dtype: torch.dtype):
    from cloaklab.ops.models import load_pipeline

    pipe = load_pipeline(model, device, dtype)
    pipe.text_encoder.to(dtype=torch.float32)  # as train-ti does
    return pipe


def bare_step(pipe, resolution: int, repeats: int, device: torch.device) -> float:
    """Seconds per bare text-encoder + UNet forward/backward into the input embeddings (no loop, no optimizer)."""
    from cloaklab.ops import diffusion

    embedding = pipe.text_encoder.get_input_embeddings()
    embedding.weight.requires_grad_(True)
    latent = resolution // 8
    z = torch.randn(1, 4, latent, latent, device=device)
    noise = torch.randn_like(z)
    t = torch.tensor([500], device=device)

    def once():
        text = diffusion.encode_prompts(pipe, ["a photo of a cat"])
        diffusion.diffusion_loss(pipe.unet, pipe.scheduler, z, text, t, noise).mean().backward()
        embedding.weight.grad = None

    for _ in range(3):
        once()
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        once()
    _sync(device)
    embedding.weight.requires_grad_(False)
    return (time.perf_counter() - start) / repeats


def ti_step(model: str, device: torch.device, dtype: torch.dtype, resolution: int, steps: int, **szt) -> float:
    """Seconds per step of the real loop (steps 4..N timed through the progress callback)."""
    from cloaklab.ops.train.data import OBJECT_TEMPLATES, InstanceData, fill_templates
    from cloaklab.ops.train.loop import TrainConfig, train
    from cloaklab.ops.train.textual_inversion import TextualInversion
    from cloaklab.tests.conftest import photo_tensor

    pipe = load(model, device, dtype)
    images = torch.stack([photo_tensor(name, resolution) for name in ("astronaut", "chelsea", "coffee", "rocket")])
    masks = torch.zeros(4, 1, resolution, resolution)
    masks[..., resolution // 4: 3 * resolution // 4, resolution // 4: 3 * resolution // 4] = 1
    data = InstanceData(images, masks, ["a", "b", "c", "d"])
    trainable = TextualInversion(pipe, "<R*>", "object", resolution=resolution)
    stamps: dict[int, float] = {}

    def progress(step, total, record):
        _sync(device)
        stamps[step] = time.perf_counter()

    config = TrainConfig(steps=steps, checkpoint_every=0, snapshot_every=0, **szt)
    with tempfile.TemporaryDirectory() as folder:
        train(pipe, trainable, data, fill_templates(OBJECT_TEMPLATES, "<R*>"), config, Path(folder),
              on_progress=progress)
    return (stamps[steps] - stamps[3]) / (steps - 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the best of each is kept")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1 = steadier on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    szt = {"mask_mode": "lm", "t_sampler": "threshold-high", "t_param": 0.5}
    bare, nominal, masked = [], [], []
    for _ in range(args.rounds):
        pipe = load(args.model, device, dtype)
        bare.append(bare_step(pipe, args.resolution, args.steps, device))
        del pipe
        nominal.append(ti_step(args.model, device, dtype, args.resolution, args.steps))
        masked.append(ti_step(args.model, device, dtype, args.resolution, args.steps, **szt))
    b, n, m = min(bare), min(nominal), min(masked)
    print(f"device {device} model {args.model} {args.resolution}px dtype {args.dtype} threads {args.threads}")
    print(f"bare text-encoder+UNet fwd/bwd : {b * 1e3:8.2f} ms/step")
    print(f"TI step (nominal)              : {n * 1e3:8.2f} ms/step   ratio vs bare {n / b:5.3f}  (goal <= 1.10)")
    print(f"TI step (LM + t>=500)          : {m * 1e3:8.2f} ms/step   ratio vs nominal {m / n:5.3f}  (goal <= 1.02)")
    print(f"5000 steps (nominal) ≈ {5000 * n / 60:.1f} min   (GPU goal at SD1.5/512²: <= 5 min)")


if __name__ == "__main__":
    main()
