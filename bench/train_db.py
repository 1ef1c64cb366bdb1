"""Benchmark ``cloak train-db`` and ``cloak generate`` (a plain script, not a test): ratios measured side by side.

CPU, tiny model (default)::

    .venv/bin/python bench/train_db.py

  * DreamBooth step (instance + prior term, shared loop, AdamW) and LoRA step vs a bare UNet forward/backward on the
    same batch — the overhead of the loop itself (a DB step with prior preservation runs two UNet passes: ~2× is
    the floor);
  * generation images/s: ``ops.commands.generate.generate_folder`` (seeding, PNG writes, manifest) vs diffusers' own
    pipeline call with the same prompts and steps (goal: ratio ≤ 1.05).

GPU (when one is lent)::

    python bench/train_db.py --device cuda --model sd15-shaped --resolution 512 \
        --train-steps 1000 --train-text-encoder --use-8bit-adam --gradient-checkpointing --mixed-precision bf16

  prints wall time and peak GPU memory of full DreamBooth (goal ≤ 16 GB with 8-bit Adam + checkpointing) and of
  LoRA rank 4 (goal ≤ 8 GB).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path, PurePosixPath

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _instances(folder: Path, resolution: int) -> list:
    from cloaklab.ops.io import InputItem
    from cloaklab.tests.conftest import photo

    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for name in ("astronaut", "chelsea", "coffee", "rocket"):
        path = folder / f"{name}.png"
        photo(name, resolution).save(path)
        items.append(InputItem(path, PurePosixPath(path.name)))
    return items


def bare_step(pipe, batch: int, resolution: int, repeats: int, device: torch.device) -> float:
    """Seconds per bare UNet forward + backward (no optimizer) on a random latent batch."""
    latent = resolution // 8
    pipe.unet.train()
    z = torch.randn(batch, 4, latent, latent, device=device)
    text = torch.randn(batch, 77, pipe.text_encoder.config.hidden_size, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    for _ in range(2):
        pipe.unet(z, t, encoder_hidden_states=text).sample.square().mean().backward()
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        pipe.unet(z, t, encoder_hidden_states=text).sample.square().mean().backward()
    _sync(device)
    return (time.perf_counter() - start) / repeats


def train_run(args, lora: int | None, prior: float, out: Path, items) -> tuple[float, float, int]:
    """(seconds per step, peak GPU GiB, steps) of a train-db run (class images generated before timing)."""
    from cloaklab.ops.commands.train_db import train_dreambooth
    from cloaklab.ops.models import load_pipeline, model_info
    from cloaklab.ops.train.dreambooth_model import DreamBoothSettings
    from cloaklab.ops.train.loop import TrainConfig

    device = torch.device(args.device)
    pipe = load_pipeline(args.model, device)
    settings = DreamBoothSettings(lora_rank=lora, prior_weight=prior, num_class_images=args.class_images,
                                  class_steps=args.class_steps, train_text_encoder=args.train_text_encoder,
                                  gradient_checkpointing=args.gradient_checkpointing,
                                  mixed_precision=args.mixed_precision)
    config = TrainConfig(steps=args.train_steps, batch_size=args.batch, lr=1e-4 if lora else 5e-7,
                         weight_decay=1e-2, max_grad_norm=1.0, checkpoint_every=0, snapshot_every=0,
                         optimizer="adamw8bit" if args.use_8bit_adam else "adamw")
    record = model_info(args.model).as_dict()
    # warm-up run (and class-image generation) outside the timed region
    train_dreambooth(pipe, items, out / "warm", settings, TrainConfig(**{**config.__dict__, "steps": 2}),
                     model_record=record, class_dir=out / "classes", overwrite=True)
    pipe = load_pipeline(args.model, device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = train_dreambooth(pipe, items, out / "run", settings, config, model_record=record,
                              class_dir=out / "classes", overwrite=True)
    _sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return seconds / result.steps_done, peak, result.steps_done


def generation(args, out: Path) -> tuple[float, float]:
    """(images/s through generate_folder, images/s through the bare pipeline call)."""
    from cloaklab.ops.commands.generate import generate_folder
    from cloaklab.ops.generate import image_seed, plan_jobs, set_scheduler
    from cloaklab.ops.manifest import Manifest
    from cloaklab.ops.models import load_pipeline
    from cloaklab.ops.prompts import OBJECT_PROMPTS_24

    device = torch.device(args.device)
    pipe = load_pipeline(args.model, device)
    set_scheduler(pipe, "ddim")
    jobs = plan_jobs(OBJECT_PROMPTS_24[: args.gen_prompts], "sks", args.gen_per_prompt, 0)
    settings = {"steps": args.gen_steps, "guidance": 7.5, "height": None, "width": None, "eta": 0.0,
                "lora_scale": None}
    pipe(prompt=["warm up"], num_inference_steps=2)  # first-call costs outside both timings
    timings = {"ours": [], "bare": []}
    def ours(repeat: int) -> None:
        manifest = Manifest(out / f"gen{repeat}", "generate", {"bench": True}, seed=0)
        generate_folder(pipe, jobs, out / f"gen{repeat}", manifest, settings=settings, batch_size=args.gen_batch)

    def bare(repeat: int) -> None:
        for index in range(0, len(jobs), args.gen_batch):
            chunk = jobs[index:index + args.gen_batch]
            pipe(prompt=[job.prompt for job in chunk], num_inference_steps=args.gen_steps, guidance_scale=7.5,
                 generator=[torch.Generator().manual_seed(image_seed(0, j.prompt_index, j.image_index))
                            for j in chunk], output_type="pil")

    for repeat in range(args.repeats):  # alternate the order so drift on a shared machine hits both alike
        for name in (("ours", "bare") if repeat % 2 == 0 else ("bare", "ours")):
            _sync(device)
            start = time.perf_counter()
            (ours if name == "ours" else bare)(repeat)
            _sync(device)
            timings[name].append(time.perf_counter() - start)
    n = len(jobs)
    return n / min(timings["ours"]), n / min(timings["bare"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--class-images", type=int, default=4)
    parser.add_argument("--class-steps", type=int, default=5)
    parser.add_argument("--train-text-encoder", action="store_true")
    parser.add_argument("--use-8bit-adam", action="store_true")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"])
    parser.add_argument("--gen-prompts", type=int, default=4)
    parser.add_argument("--gen-per-prompt", type=int, default=2)
    parser.add_argument("--gen-steps", type=int, default=10)
    parser.add_argument("--gen-batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-generation", action="store_true")
    parser.add_argument("--skip-training", action="store_true")
    args = parser.parse_args()

    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as temp:
        out = Path(temp)
        items = _instances(out / "instances", args.resolution)
        if not args.skip_training:
            training(args, device, out, items)
        if not args.skip_generation:
            ours, plain = generation(args, out)
            print(f"generation: cloak {ours:.2f} img/s, diffusers pipeline {plain:.2f} img/s, "
                  f"time ratio {plain / ours:.3f}x (goal <= 1.05)")


def training(args, device: torch.device, out: Path, items) -> None:
    from cloaklab.ops.models import load_pipeline

    bare = bare_step(load_pipeline(args.model, device), args.batch, args.resolution, max(3, args.train_steps // 2),
                     device)
    db_step, db_peak, db_steps = train_run(args, None, 1.0, out / "db", items)
    lora_step, lora_peak, _ = train_run(args, 4, 0.0, out / "lora", items)
    print(f"device {device}, model {args.model}, {args.resolution}px, batch {args.batch}, {db_steps} steps, "
          f"TE {'on' if args.train_text_encoder else 'off'}, 8-bit Adam {args.use_8bit_adam}, "
          f"checkpointing {args.gradient_checkpointing}, mixed precision {args.mixed_precision}")
    print(f"bare UNet fwd+bwd        {bare * 1e3:9.1f} ms")
    print(f"DreamBooth step (+prior) {db_step * 1e3:9.1f} ms  ratio {db_step / bare:5.2f}x  "
          f"peak {db_peak:.2f} GiB  ({db_step * 1000 / 60:.1f} min per 1000 steps)")
    print(f"LoRA r4 step             {lora_step * 1e3:9.1f} ms  ratio {lora_step / bare:5.2f}x  "
          f"peak {lora_peak:.2f} GiB")


if __name__ == "__main__":
    main()
