"""The toy world's judge: a small CNN trained on the dataset's ground truth — this world's DINOv2 and CLIP.

Two nets, both on ``(B,3,64,64)`` images in [0, 1]:

* ``ShapeNet`` — predicts the shape (all ten, named and unnamed) and the texture. It is trained on colour-scrambled
  inputs (random channel permutation, random grayscale, random per-channel gain), so its pooled features carry the
  shape and not the colour: ``toy-sim`` (cosine of these features) cannot be faked by the right colour alone.
* ``ColourNet`` — predicts the colour name (a few convolutions and a global pool).

Augmentation also adds noise and blur so the judge keeps working on imperfect generated images. Weights are
``ops/toy/classifier.safetensors`` (≈ 0.9 MB); ``python -m cloaklab.ops.toy.classifier`` retrains them (~2-4 min on
2 CPU cores).
"""

from __future__ import annotations

import argparse
import time
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import dataset

WEIGHTS = Path(__file__).parent / "classifier.safetensors"
FEATURE_DIM = 96


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.MaxPool2d(2))


class ShapeNet(nn.Module):
    """64 → 32 → 16 → 8 → 4 conv trunk, global average pool → ``FEATURE_DIM`` features; shape + texture heads."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(_block(3, 16), _block(16, 32), _block(32, 64), _block(64, FEATURE_DIM))
        self.shape_head = nn.Linear(FEATURE_DIM, len(dataset.ALL_SHAPES))
        self.texture_head = nn.Linear(FEATURE_DIM, len(dataset.TEXTURES))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Shape features ``(B, FEATURE_DIM)`` of ``(B,3,64,64)`` images in [0, 1]."""
        return self.trunk(images * 2 - 1).mean((2, 3))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.features(images)
        return self.shape_head(feats), self.texture_head(feats)


class ColourNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                 nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                 nn.Conv2d(32, 32, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(64, len(dataset.COLOUR_NAMES))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.net(images * 2 - 1)
        return self.head(torch.cat([x.mean((2, 3)), x.amax((2, 3))], 1))


class ToyJudge(nn.Module):
    """Both nets; ``predict`` returns label names, ``features`` the colour-blind shape features."""

    def __init__(self) -> None:
        super().__init__()
        self.shape_net, self.colour_net = ShapeNet(), ColourNet()

    @staticmethod
    def _prepare(images: torch.Tensor) -> torch.Tensor:
        if images.shape[-2:] != (dataset.RESOLUTION, dataset.RESOLUTION):
            images = F.interpolate(images.float(), size=(dataset.RESOLUTION,) * 2, mode="bilinear", antialias=True,
                                   align_corners=False)
        return images.float().clamp(0, 1)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.shape_net.features(self._prepare(images))

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> list[dict[str, str]]:
        images = self._prepare(images)
        shape_logits, texture_logits = self.shape_net(images)
        colours = self.colour_net(images).argmax(1)
        return [{"shape": dataset.ALL_SHAPES[s], "texture": dataset.TEXTURES[t], "colour": dataset.COLOUR_NAMES[c]}
                for s, t, c in zip(shape_logits.argmax(1).tolist(), texture_logits.argmax(1).tolist(),
                                   colours.tolist())]


@lru_cache(maxsize=2)
def load_judge(path: str | None = None, device: str = "cpu") -> ToyJudge:
    """The trained judge in eval mode (one line to stderr-free error when the weights are missing)."""
    from safetensors.torch import load_file

    from ..errors import ModelNotFoundError

    path = Path(path) if path else WEIGHTS
    if not path.exists():
        raise ModelNotFoundError(f"toy classifier weights not found at {path}: run "
                                 "`python -m cloaklab.ops.toy.classifier` to train them (a few minutes on CPU)")
    judge = ToyJudge()
    judge.load_state_dict(load_file(str(path)))
    return judge.eval().to(device)


def scramble_colour(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random channel permutation, gain and grayscale per image: what makes shape features colour-blind."""
    out = []
    for image in images:
        image = image[torch.randperm(3, generator=generator)]
        image = image * (0.6 + 0.8 * torch.rand(3, 1, 1, generator=generator))
        if torch.rand((), generator=generator) < 0.3:
            image = image.mean(0, keepdim=True).expand(3, -1, -1)
        out.append(image)
    return torch.stack(out).clamp(0, 1)


def degrade(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Noise and blur like a small generator's outputs."""
    sigma = 0.06 * torch.rand(len(images), 1, 1, 1, generator=generator)
    images = images + sigma * torch.randn(images.shape, generator=generator)
    blur = torch.rand(len(images), generator=generator) < 0.4
    if blur.any():
        kernel = torch.tensor([1.0, 2.0, 1.0])
        kernel = (kernel[:, None] * kernel[None, :] / 16).expand(3, 1, 3, 3)
        images[blur] = F.conv2d(F.pad(images[blur], (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    return images.clamp(0, 1)


def train(num_images: int = 3000, epochs: int = 4, seed: int = 1, batch_size: int = 64) -> ToyJudge:
    """Train on a dataset seed different from the diffusion model's (seed 0), uniform over all ten shapes."""
    items = dataset.generate(num_images, seed=seed, novel_fraction=0.4)
    images = torch.from_numpy(dataset.as_arrays(items)[0]).permute(0, 3, 1, 2).float() / 255
    shapes = torch.tensor([dataset.ALL_SHAPES.index(it.shape) for it in items])
    colours = torch.tensor([dataset.COLOUR_NAMES.index(it.colour) for it in items])
    textures = torch.tensor([dataset.TEXTURES.index(it.texture) for it in items])
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    judge = ToyJudge().train()
    optimizer = torch.optim.AdamW(judge.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = epochs * (num_images // batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)
    for step in range(steps):
        idx = torch.randint(num_images, (batch_size,), generator=generator)
        batch = degrade(images[idx], generator)
        shape_logits, texture_logits = judge.shape_net(scramble_colour(batch, generator))
        loss = (F.cross_entropy(shape_logits, shapes[idx]) + 0.5 * F.cross_entropy(texture_logits, textures[idx])
                + F.cross_entropy(judge.colour_net(batch), colours[idx]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step % 50 == 0:
            print(f"[{time.strftime('%H:%M:%S')}] classifier step {step}/{steps} loss {loss.item():.3f}", flush=True)
    return judge.eval()


@torch.no_grad()
def accuracy(judge: ToyJudge, items: list[dataset.ToyItem]) -> dict[str, float]:
    images = torch.from_numpy(dataset.as_arrays(items)[0]).permute(0, 3, 1, 2).float() / 255
    predictions = judge.predict(images)
    return {key: sum(p[key] == getattr(it, key) for p, it in zip(predictions, items)) / len(items)
            for key in ("shape", "colour", "texture")}


def main(argv: list[str] | None = None) -> None:
    from safetensors.torch import save_file

    parser = argparse.ArgumentParser(description="Train the toy world's classifier (toy-acc / toy-sim).")
    parser.add_argument("--out", default=str(WEIGHTS))
    parser.add_argument("--num-images", type=int, default=3000)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    judge = train(args.num_images, args.epochs)
    save_file({k: v.contiguous() for k, v in judge.state_dict().items()}, args.out)
    print("held-out accuracy (seed 2):", accuracy(judge, dataset.generate(600, seed=2, novel_fraction=0.4)))


if __name__ == "__main__":
    main()
