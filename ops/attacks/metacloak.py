"""MetaCloak — meta-learned, transformation-robust poisoning (Liu et al. CVPR 2024; paper 001 App. C.2).

Reference code: liuyixin-louis/MetaCloak (its pool generation, EoT transform list and unrolled loop; the facts used
here — Resize + CenterCrop, rotation in [0, θ], pool trained on the protected images — are from issue 18's review of
that release, not re-read here). Set-level. (1) Surrogate pool: DreamBooth-train a copy of the base model on the
clean protected images themselves (as the release does; ``--clean-dir`` is not used here) for ``pool_steps``
steps, keeping snapshots after 0, ``pool_interval``, 2·``pool_interval`` … steps (defaults 1000 / 200: the 0, 199,
…, 999 checkpoints of METHODS.md). (2) For each of ``trials`` trials and
each snapshot θ_k: load θ_k, then ``inner_iterations`` times do [``pgd_steps`` EoT-PGD ascent steps on the whole set
against θ_k, then ``unroll_steps`` DreamBooth steps of θ_k on the perturbed set] — the perturbation is learned
against models at every stage of a DreamBooth run, each one unrolled on the current poison.

EoT (inside every PGD step, per image, from its own generator), the release's list: Resize + CenterCrop to the
working size (the identity on our working-size images, so no crop is drawn) → Gaussian blur with kernel 7 (σ ~
U(0.1, 2.0), torchvision's range) → horizontal flip with probability 0.5 → rotation by an angle in [0, θ] degrees
(``rotation`` θ, 0 by default: off). A ``--robust`` transform, when given, is applied after it.

Defaults: eps 11/255, step_size 1.1/255, pgd_steps 6, unroll_steps 2 (METHODS.md); trials 4 and
inner_iterations 100 (= interval 200 // 2 training steps) as MetaCloak's released configuration
(total_trail_num 4, interval 200, advance_steps 2, total_train_steps 1000). That is 4 × 6 × 100 × (6 + 2) steps:
MetaCloak is the most expensive attack here; ``-p inner_iterations=10`` is a tenth of it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .engine import AttackModels, PGDResult
from .setlevel import attack_models, base_surrogate, pgd_over_set, results, start_run, trainer

DEFAULTS = {"eps": 11.0, "step_size": 1.1, "pgd_steps": 6, "unroll_steps": 2, "trials": 4, "inner_iterations": 100,
            "pool_steps": 1000, "pool_interval": 200, "rotation": 0.0}


def _gaussian_kernel(sigma: float, size: int = 7) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    kernel = torch.exp(-coords**2 / (2 * sigma**2))
    return kernel / kernel.sum()


def metacloak_transform(x: torch.Tensor, generators: Sequence[torch.Generator], *, rotation: float = 0.0,
                        sigma: tuple[float, float] = (0.1, 2.0), kernel: int = 7) -> torch.Tensor:
    """Differentiable blur (k 7, random σ) → h-flip (p 0.5) → rotation in [0, ``rotation``]° of ``x``
    ``(B, 3, H, W)`` (Resize + CenterCrop to the working size is the identity here)."""
    out = []
    for image, g in zip(x, generators):
        u = torch.rand(3, generator=g).tolist()
        y = image[None]
        k = _gaussian_kernel(sigma[0] + (sigma[1] - sigma[0]) * u[0], kernel).to(x.device, x.dtype)
        pad = kernel // 2
        y = F.pad(y, (pad, pad, pad, pad), mode="reflect")
        y = F.conv2d(y, k.view(1, 1, 1, -1).expand(3, 1, 1, kernel), groups=3)
        y = F.conv2d(y, k.view(1, 1, -1, 1).expand(3, 1, kernel, 1), groups=3)
        if u[1] < 0.5:
            y = y.flip(-1)
        if rotation:
            angle = math.radians(u[2] * rotation)
            theta = torch.tensor([[math.cos(angle), -math.sin(angle), 0], [math.sin(angle), math.cos(angle), 0]],
                                 dtype=x.dtype, device=x.device)[None]
            grid = F.affine_grid(theta, list(y.shape), align_corners=False)
            y = F.grid_sample(y, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        out.append(y[0])
    return torch.stack(out)


def surrogate_pool(run, surrogate, pool_steps: int, pool_interval: int) -> list[dict[str, dict]]:
    """CPU snapshots ``{"unet": …, "text_encoder": …}`` of a DreamBooth run on the clean protected images."""
    def snapshot() -> dict[str, dict]:
        return {part: {k: v.detach().cpu().clone() for k, v in getattr(surrogate, part).state_dict().items()}
                for part in ("unet", "text_encoder")}

    pool = [snapshot()]
    db = trainer(run, surrogate)
    protected = run.pset.squares(run.resolution, clean=True)
    for step in range(1, pool_steps + 1):
        db.step(protected)
        if step % pool_interval == 0:
            pool.append(snapshot())
            run.progress(f"metacloak: surrogate pool {len(pool)} snapshots (DreamBooth step {step}/{pool_steps})")
    return pool


def attack_set(images: Sequence[torch.Tensor], *, models: AttackModels, generators: Sequence[torch.Generator],
               eps: float = 11.0, step_size: float = 1.1, pgd_steps: int = 6, unroll_steps: int = 2,
               trials: int = 4, inner_iterations: int = 100, pool_steps: int = 1000, pool_interval: int = 200,
               rotation: float = 0.0, progress=None, **params: Any) -> list[PGDResult]:
    """Protect the set ``images`` ``[(3, H, W)]`` in [0, 1]; one result per image, in order."""
    run = start_run(images, pipe=models.pipe, generators=generators, progress=progress, **params)
    robust = run.eot

    def eot(x: torch.Tensor, gens: Sequence[torch.Generator]) -> torch.Tensor:
        y = metacloak_transform(x, gens, rotation=rotation)
        return robust(y, gens) if robust is not None else y

    run.eot = eot
    surrogate = base_surrogate(models.pipe)
    pool = surrogate_pool(run, surrogate, pool_steps, max(1, pool_interval))
    total, done = trials * len(pool), 0
    for _ in range(trials):
        for state in pool:
            surrogate.unet.load_state_dict(state["unet"])
            surrogate.text_encoder.load_state_dict(state["text_encoder"])
            loss = 0.0
            for _ in range(inner_iterations):
                loss = pgd_over_set(run, attack_models(surrogate, run), pgd_steps, eps=eps, step_size=step_size)
                trainer(run, surrogate).train(run.pset.squares(run.resolution), unroll_steps)
            done += 1
            run.report("metacloak", done, total, loss=loss)
    run.eot = robust
    return results(run, attack_models(surrogate, run), eps, surrogate="last pool model, unrolled")
