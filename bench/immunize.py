"""Benchmark: cost of IMMA immunization vs the plain adaptation it defends against, per method (ti, db, lora).

Paper 003 A4 says immunization costs about as much as the adaptation itself. For each method this times N steps of
``ops.train.immunize.immunize`` (alternating inner/outer) and N steps of the same adaptation through the shared
training loop (``ops.train.loop.train``), in the same run on the same model and images, and prints the seconds per
step and their ratio, plus peak GPU memory on CUDA. Not a test.

    python bench/immunize.py                       # tiny model, CPU
    python bench/immunize.py --device cuda --model sd15-shaped --resolution 512
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--methods", default="ti,db,lora")
    args = parser.parse_args()

    import torch

    from cloaklab.ops.models import load_pipeline
    from cloaklab.ops.train import immunize as im
    from cloaklab.ops.train.data import InstanceData
    from cloaklab.ops.train.loop import TrainConfig, train
    from cloaklab.tests.conftest import photo_tensor

    device = torch.device(args.device)
    pipe = load_pipeline(args.model, device)
    size = args.resolution or int(pipe.unet.config.sample_size) * 8
    images = torch.stack([photo_tensor(name, size) for name in ("astronaut", "chelsea", "coffee", "rocket")])
    data = InstanceData(images, None, [f"{i}.png" for i in range(len(images))])

    def timed(function) -> tuple[float, float]:
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        function()
        if device.type == "cuda":
            torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        return (time.perf_counter() - start) / args.steps, peak

    print(f"model {args.model}, {size}px, {args.steps} steps, device {device}")
    print(f"{'method':8} {'adapt s/step':>13} {'IMMA s/step':>12} {'ratio':>7} {'adapt GiB':>10} {'IMMA GiB':>9}")
    with tempfile.TemporaryDirectory() as folder:
        for method in args.methods.split(","):
            config = im.ImmunizeConfig(against=method, steps=args.steps, checkpoint_every=0).resolved()
            token = "<R*>" if method == "ti" else "sks"

            def adapt() -> None:
                work = im.working_copy(pipe)
                adaptation = im.make_adaptation(work, method, token=token, class_word="object",
                                                instance_prompt=None, lora_rank=4, batch_size=1, resolution=size)
                train(work, adaptation.trainable, data, adaptation.prompts,
                      TrainConfig(steps=args.steps, lr=config.lr, checkpoint_every=0, snapshot_every=0),
                      Path(folder) / f"adapt-{method}")

            def defend() -> None:
                im.immunize(pipe, data, config, Path(folder) / f"imma-{method}", token=token)

            adapt()  # warm-up (kernels, allocator)
            plain, plain_peak = timed(adapt)
            imma, imma_peak = timed(defend)
            print(f"{method:8} {plain:13.4f} {imma:12.4f} {imma / plain:7.2f} {plain_peak:10.2f} {imma_peak:9.2f}")


if __name__ == "__main__":
    main()
