"""Benchmark: seconds per toy-model training step (UNet + text encoder, batch 64) by UNet attention heads.

The toy UNet's attention layers are 32 and 64 channels wide. With diffusers' usual 8 heads (width 4 and 8) PyTorch's
CPU attention kernel took 56 % of a training step; ``ops.toy.train`` therefore builds 2 heads. This times
``ops.toy.train.train_unet`` (the recipe's own loop: AdamW, clipping, EMA) for each head count, in alternating
rounds in the same run, and prints seconds per step and the ratio to 8 heads. The parameter count is the same for
every head count. Not a test.

    python bench/toy_train.py                      # 2 CPU threads
    python bench/toy_train.py --device cuda --threads 4
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--heads", default="8,2,1")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    import torch

    from cloaklab.ops.toy import dataset
    from cloaklab.ops.toy.train import build_components, train_unet

    torch.set_num_threads(args.threads)
    captions = [item.caption for item in dataset.generate(256, seed=0)]
    means, stds = torch.randn(256, 4, 16, 16), torch.full((256, 4, 16, 16), 0.1)
    heads = [int(h) for h in args.heads.split(",")]
    timings: dict[int, list[float]] = {h: [] for h in heads}
    for _ in range(args.rounds):
        for h in heads:
            _, unet, text_encoder, tokenizer, scheduler = build_components(0, attention_heads=h)
            kwargs = dict(minutes=60, batch_size=64, device=torch.device(args.device), seed=0)
            train_unet(unet, text_encoder, tokenizer, scheduler, means, stds, captions, max_steps=2, **kwargs)  # warm
            start = time.perf_counter()
            train_unet(unet, text_encoder, tokenizer, scheduler, means, stds, captions, max_steps=args.steps, **kwargs)
            timings[h].append((time.perf_counter() - start) / args.steps)
    base = min(timings[heads[0]])
    print(f"toy training step, batch 64, {args.device} ({args.threads} threads), best of {args.rounds} rounds")
    for h in heads:
        best = min(timings[h])
        print(f"  {h} heads: {best:.3f} s/step   ({base / best:.2f}x the speed of {heads[0]} heads)")


if __name__ == "__main__":
    main()
