"""E-ASPL — ensemble ASPL over several base models (Anti-DreamBooth, Le et al. ICCV 2023; paper 001 App. C.2).

The model trainer's base model is unknown, so ASPL runs against an ensemble: the ``--model`` plus every model in
``ensemble`` (comma-separated names for :func:`ops.models.load_pipeline`; default the other two of Anti-DreamBooth's
three, SD 1.4 and SD 2.1-base). Each member keeps its own surrogate f_m and its own class images. Every round, each
member in turn runs one ASPL round (:func:`.aspl.aspl_round`: train f′_m on clean A, ``pgd_steps`` PGD steps, train
f_m on its perturbed B) starting from the shared current images; the perturbations of the members are then
averaged (METHODS.md: "average the perturbations") and projected. One member is active at a time, as paper 001
does to bound GPU memory (all surrogates stay resident, though).

Defaults as ASPL: rounds 50, surrogate_steps 3, pgd_steps 6, eps 6.375/255, step_size 0.6375/255.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from .aspl import aspl_round
from .engine import AttackModels, PGDResult, project_linf
from .setlevel import attack_models, base_surrogate, prior_images, results, start_run

DEFAULT_ENSEMBLE = "CompVis/stable-diffusion-v1-4,stabilityai/stable-diffusion-2-1-base"
DEFAULTS = {"eps": 6.375, "step_size": 0.6375, "rounds": 50, "surrogate_steps": 3, "pgd_steps": 6,
            "ensemble": DEFAULT_ENSEMBLE}


def load_ensemble(names: str, like) -> list[Any]:
    """Pipelines for the comma-separated ``names`` on ``like``'s device and dtype."""
    from ..models import load_pipeline

    return [load_pipeline(name.strip(), device=like.unet.device, dtype=like.unet.dtype)
            for name in names.split(",") if name.strip()]


def attack_set(images: Sequence[torch.Tensor], *, models: AttackModels, generators: Sequence[torch.Generator],
               eps: float = 6.375, step_size: float = 0.6375, rounds: int = 50, surrogate_steps: int = 3,
               pgd_steps: int = 6, ensemble: str = DEFAULT_ENSEMBLE, progress=None,
               **params: Any) -> list[PGDResult]:
    """Protect the set ``images`` ``[(3, H, W)]`` in [0, 1] against the ensemble; one result per image."""
    run = start_run(images, pipe=models.pipe, generators=generators, progress=progress, **params)
    pipes = [models.pipe] + load_ensemble(ensemble, models.pipe)
    members = [(run, base_surrogate(models.pipe))]
    for pipe in pipes[1:]:
        prior = prior_images(pipe, run.resolution, run.extra["class_settings"], run.progress)
        members.append((replace(run, class_images=prior), base_surrogate(pipe)))
    pset = run.pset
    for index in range(rounds):
        start = [image.clone() for image in pset.adv]
        outcomes, losses = [], []
        for member_run, f in members:
            pset.adv = [image.clone() for image in start]
            losses.append(aspl_round(member_run, f, eps=eps, step_size=step_size,
                                     surrogate_steps=surrogate_steps, pgd_steps=pgd_steps))
            outcomes.append(pset.adv)
        pset.adv = [torch.stack(versions).mean(0) for versions in zip(*outcomes)]
        for group in pset.groups(run.batch_size):
            clean, adv, mask = pset.gather(group)
            pset.scatter(group, project_linf(adv, clean, eps, mask))
        run.report("e-aspl", index + 1, rounds, loss=sum(losses) / len(losses))
    return results(run, attack_models(members[0][1], run), eps, surrogate="final f of --model",
                   ensemble=len(members))
