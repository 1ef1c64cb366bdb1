"""FSMG — Fully-trained Surrogate Model Guidance (Anti-DreamBooth, Le et al. ICCV 2023; paper 001 App. C.2).

Set-level: DreamBooth-train a surrogate θ_clean on the clean set A (``--clean-dir``; the protected set's clean
images when not given) for ``surrogate_steps`` steps (1000: the full DreamBooth run of papers 001/004 — UNet + text
encoder, lr 5e-7, prior loss 1.0 with 200 class images), then run ``steps`` L∞ PGD ascent steps on every image of
the protected set against that fixed model: ``δ* = argmax L_cond(θ_clean, x + δ)`` with the instance prompt.

Defaults: surrogate_steps 1000, steps 100, eps 6.375/255, step_size 0.6375/255 (Anti-DreamBooth's 0.05 / 0.005
in [-1, 1] units). The surrogate's DreamBooth batch is 2 instance + 2 class images a step (``db_batch_size`` 2):
Anti-DreamBooth's ``scripts/attack_with_fsmg.sh`` trains it with ``train_dreambooth.py --train_batch_size=2`` and
prior preservation (VinAIResearch/Anti-DreamBooth ``train_dreambooth.py``, ``collate_fn`` concatenates the instance
and class halves; the loss is the instance mean + prior_loss_weight × class mean, as ours).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .engine import AttackModels, PGDResult
from .setlevel import attack_models, base_surrogate, pgd_over_set, results, start_run, trainer

DEFAULTS = {"eps": 6.375, "step_size": 0.6375, "steps": 100, "surrogate_steps": 1000, "db_batch_size": 2}


def attack_set(images: Sequence[torch.Tensor], *, models: AttackModels, generators: Sequence[torch.Generator],
               eps: float = 6.375, step_size: float = 0.6375, steps: int = 100, surrogate_steps: int = 1000,
               db_batch_size: int = 2, progress=None, **params: Any) -> list[PGDResult]:
    """Protect the set ``images`` ``[(3, H, W)]`` in [0, 1]; returns one result per image, in order."""
    run = start_run(images, pipe=models.pipe, generators=generators, progress=progress, db_batch_size=db_batch_size,
                    **params)
    surrogate = base_surrogate(models.pipe)
    db = trainer(run, surrogate)
    chunk = max(1, surrogate_steps // 10)
    done = 0
    while done < surrogate_steps:
        count = min(chunk, surrogate_steps - done)
        losses = db.train(run.clean_squares, count)
        done += count
        run.progress(f"fsmg: surrogate DreamBooth step {done}/{surrogate_steps} loss {losses[-1]:.4g}")
    fixed = attack_models(surrogate, run)
    chunk = max(1, steps // 10)
    done = 0
    while done < steps:
        count = min(chunk, steps - done)
        loss = pgd_over_set(run, fixed, count, eps=eps, step_size=step_size)
        done += count
        run.report("fsmg", done, steps, loss=loss)
    return results(run, fixed, eps, surrogate="DreamBooth on set A")
