"""Benchmark: images/s of each backbone metric of ``cloak score`` vs the bare forward of its backbone.

Two baselines: the bare forward on already-preprocessed tensors, and the forward plus the resize/crop/normalize
any implementation must do. Goal ≤ 1.2× against the second (preprocessing and bookkeeping must not dominate;
reference features are computed once in ``prepare``, outside the timed loop, as in a real run). Tiny backbones built
in code by default (offline); on a GPU
machine: ``python bench/score.py --device cuda``. Real weights: ``--real`` (needs them cached).

    python bench/score.py [--images 32] [--batch 8] [--device cpu|cuda] [--size 256]
"""

from __future__ import annotations

import argparse
import time

import torch


def _best_times(functions, repeats: int, sync) -> list[float]:
    """Fastest of ``repeats`` runs of each function, interleaved (robust to load from other processes)."""
    for function in functions:
        function()  # warm-up (fills caches: prompt embeddings, cuDNN plans)
    best = [float("inf")] * len(functions)
    for _ in range(repeats):
        for index, function in enumerate(functions):
            sync()
            start = time.perf_counter()
            function()
            sync()
            best[index] = min(best[index], time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--real", action="store_true", help="use the default real weights instead of tiny")
    args = parser.parse_args()

    from cloaklab.ops.metrics import METRICS
    from cloaklab.ops.metrics.base import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, ImageContext, preprocess

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    generator = torch.Generator().manual_seed(0)
    images = [torch.rand(3, args.size, args.size, generator=generator) for _ in range(args.images)]
    refs = [torch.rand(3, args.size, args.size, generator=generator) for _ in range(8)]
    contexts = [ImageContext(f"{i}.png", "c", refs[i % len(refs)], "a photo of a dog", "dog")
                for i in range(args.images)]
    weights = {} if args.real else {"dinov2_model": "tiny", "clip_model": "tiny", "lpips_net": "tiny",
                                    "fid_features": "tiny"}
    print(f"device {device}, {args.images} images of {args.size}², batch {args.batch}, "
          f"{'real' if args.real else 'tiny'} backbones")
    print(f"{'metric':<10} {'images/s':>10} {'bare img/s':>11} {'ratio':>7} {'+prep img/s':>12} {'ratio':>7}")
    for name in ("dinov2", "clip", "clip-iqa", "liqe", "lpips", "fid"):
        metric = METRICS[name].build(device=device, **weights)
        metric.prepare({"c": refs})
        batches = [(images[i:i + args.batch], contexts[i:i + args.batch]) for i in range(0, args.images,
                                                                                        args.batch)]

        def run_metric():
            for batch, ctx in batches:
                # distinct keys per pass so the CLIP memo cannot skip work across repeats
                metric.score(batch, [ImageContext(f"{time.perf_counter()}-{c.rel}", c.concept, c.reference, c.prompt,
                                                  c.class_name) for c in ctx])

        if name == "dinov2":
            model = metric.model
            inputs = [preprocess(b, 256, 224, IMAGENET_MEAN, IMAGENET_STD, device) for b, _ in batches]
            bare = lambda: [model(pixel_values=x) for x in inputs]  # noqa: E731
            with_prep = lambda: [model(pixel_values=preprocess(b, 256, 224, IMAGENET_MEAN, IMAGENET_STD, device))  # noqa: E731
                                 for b, _ in batches]
        elif name in ("clip", "clip-iqa", "liqe"):
            model = metric.clip.model
            inputs = [preprocess(b, 224, 224, CLIP_MEAN, CLIP_STD, device) for b, _ in batches]
            bare = lambda: [model.get_image_features(pixel_values=x) for x in inputs]  # noqa: E731
            with_prep = lambda: [model.get_image_features(pixel_values=preprocess(  # noqa: E731
                b, 224, 224, CLIP_MEAN, CLIP_STD, device)) for b, _ in batches]
        elif name == "lpips":
            model = metric.model
            pairs = [(torch.stack(b).to(device) * 2 - 1, torch.stack([c.reference for c in ctx]).to(device) * 2 - 1)
                     for b, ctx in batches]
            bare = lambda: [model(a, r) for a, r in pairs]  # noqa: E731
            with_prep = bare
        else:  # fid
            extractor = metric.extractor
            inputs = [torch.stack(b).to(device) for b, _ in batches]
            bare = lambda: [extractor(x.to(next(extractor.parameters()).dtype)) for x in inputs]  # noqa: E731
            with_prep = bare
        with torch.no_grad():
            metric_seconds, bare_seconds, prep_seconds = _best_times([run_metric, bare, with_prep], args.repeats,
                                                                     sync)
        print(f"{name:<10} {args.images / metric_seconds:>10.1f} {args.images / bare_seconds:>11.1f} "
              f"{metric_seconds / bare_seconds:>7.2f} {args.images / prep_seconds:>12.1f} "
              f"{metric_seconds / prep_seconds:>7.2f}")


if __name__ == "__main__":
    main()
