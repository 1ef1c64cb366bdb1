"""CAAT — Cross-Attention Adversarial Training ("Perturbing attention gives you more bang for the buck", Xu et al.
CVPR 2024).

Set-level. Only the cross-attention key/value projections of the UNet (``attn2.to_k``, ``attn2.to_v``: the layers
that read the text condition) are trainable in a copy of the base model. Each of ``steps`` steps makes ONE
backward pass of the instance-prompt noise-prediction loss ‖ε_θ(z'_t, t, c_inst) − ε‖² per minibatch and uses it
twice: a sign-ascent PGD step on the images and an AdamW descent step (lr 1e-5) on K/V — the perturbation fights a
model that is simultaneously learning the subject through the layers personalization changes most.

Reference code: CAAT's release (built on Anti-DreamBooth's / diffusers' DreamBooth scripts; the clip and the one
step per iteration are from issue 18's review of it, the repository was not found in our index): per iteration one
backward of the whole batch, the image sign step, ``clip_grad_norm_(K/V, max_grad_norm=1.0)`` and one optimizer
step. Ours: when the set holds images of several shapes the minibatches' losses are accumulated (each group's
loss weighted by its share of the set, so the K/V gradient is the set mean) and K/V take ONE clipped AdamW step per
iteration, after every image has taken its sign step on the same parameters.

Defaults: steps 250, lr 1e-5 (METHODS.md), eps 6.375/255 and step_size 0.6375/255 (CAAT runs on Anti-DreamBooth's
code and units: 0.05 / 0.005 in [-1, 1]), max_grad_norm 1.0. Approximation: no prior-preservation term in the K/V
update.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .engine import AttackModels, PGDResult, pgd_step
from .setlevel import attack_models, base_surrogate, results, start_run

DEFAULTS = {"eps": 6.375, "step_size": 0.6375, "steps": 250, "lr": 1e-5}
MAX_GRAD_NORM = 1.0


def kv_parameters(unet) -> dict[str, torch.nn.Parameter]:
    """The cross-attention key/value weights (and biases, if any) of a diffusers UNet, by name."""
    return {name: p for name, p in unet.named_parameters()
            if ".attn2.to_k." in f".{name}" or ".attn2.to_v." in f".{name}"}


def attack_set(images: Sequence[torch.Tensor], *, models: AttackModels, generators: Sequence[torch.Generator],
               eps: float = 6.375, step_size: float = 0.6375, steps: int = 250, lr: float = 1e-5, progress=None,
               **params: Any) -> list[PGDResult]:
    """Protect the set ``images`` ``[(3, H, W)]`` in [0, 1]; one result per image, in order."""
    run = start_run(images, pipe=models.pipe, generators=generators, progress=progress, prior_weight=0.0,
                    **{k: v for k, v in params.items() if k != "prior_weight"})
    surrogate = base_surrogate(models.pipe)
    frozen = attack_models(surrogate, run)  # freezes everything ...
    kv = kv_parameters(surrogate.unet)
    if not kv:
        raise ValueError("the UNet has no cross-attention (attn2.to_k / to_v) layers for CAAT to train")
    for p in kv.values():  # ... then K/V alone become trainable
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(list(kv.values()), lr=lr)
    pset, report_every = run.pset, max(1, steps // 10)
    total = len(pset)
    for index in range(steps):
        losses = []
        optimizer.zero_grad(set_to_none=True)
        for group in pset.groups(run.batch_size):
            clean, adv, mask = pset.gather(group)
            gens = [run.generators[i] for i in group]
            x = adv.detach().requires_grad_(True)
            loss = frozen.denoise_loss(run.eot(x, gens) if run.eot is not None else x, gens, mask)
            (loss.sum() / total).backward()  # K/V gradients accumulate to the set mean
            pset.scatter(group, pgd_step(x.detach(), x.grad, clean, eps=eps, step_size=step_size, mask=mask,
                                         grad_transform=run.grad_transform,
                                         delta_transform=run.delta_transform))
            losses.append(loss.detach().float().cpu())
        torch.nn.utils.clip_grad_norm_(list(kv.values()), MAX_GRAD_NORM)
        optimizer.step()
        if (index + 1) % report_every == 0 or index + 1 == steps:
            run.report("caat", index + 1, steps, loss=float(torch.cat(losses).mean()))
    optimizer.zero_grad(set_to_none=True)
    for p in kv.values():
        p.requires_grad_(False)
    return results(run, frozen, eps, surrogate="K/V-trained copy")
