"""InMark — Influence Watermarks (paper 004: "Countering Personalized Text-to-Image Generation with Influence
Watermarks", Alg. 1, Eq. 5–11). No public code exists; this is our reading of the paper.

Set-level. Starting from x̃ = x0 and a trainable copy θ of the base model, for epochs j = 0 … ``epochs``−1:

  1. update θ by ``surrogate_steps`` DreamBooth steps on the current x̃ (Alg. 1 line 4; UNet + text encoder,
     lr 5e-7, prior loss 1.0 with class images, as ASPL);
  2. even j — ``iterations`` LF-PGD steps: x̃ ← Π_γ(x̃ + α·SGN(IDCT(DCT(∇_x SE(x̃)) ⊙ m_η)))  (Eq. 8 in Eq. 4);
     odd j — ``iterations`` self-influence steps: x̃ ← Π_γ(x̃ + α·SGN(I(x̃)))  (Eq. 11 with ψ_j = cos²(πj/2)), with
     I(x) = −∇_θ SE(x)ᵀ H⁻¹ ∇_x∇_θ SE(x)  (Prop. 2), SE = ‖ε_θ(z_t, t, c_inst) − ε‖² (Eq. 1).

What is approximated, exactly:
  * θ in Prop. 2 is restricted to a parameter subset P (``influence_params``, default the cross-attention
    key/value projections ``attn2.to_k``/``attn2.to_v`` — the text-reading layers personalization moves most);
    the rest of the network is held fixed for the influence term;
  * H⁻¹g is solved on P with damped Hessian-vector products (Pearlmutter double backward), H ≈ the Hessian of the
    mean SE of one minibatch of the current x̃ with one fixed (t, ε) draw per image, recomputed once per odd epoch
    (Alg. 1 line 6). ``influence="cg"`` (default): ``hvp_steps`` conjugate-gradient iterations on (H + λI)v = g,
    stopped at negative curvature; ``"lissa"``: LiSSA recursion h ← g + (1−λ)h − Hh/scale; ``"identity"``: H = I
    (the fast option: I(x) = −½∇_x‖∇_θ SE(x)‖², no HVPs);
  * the paper writes I(x0); we evaluate I at the current iterate x̃ (equal to x0 at its first step) with a fresh
    (t, ε) draw per step, so successive sign steps are not one constant direction;
  * the self-influence gradient is per image (each image's own ∇_θ SE), one (t, ε) draw per step.

Defaults: epochs 10, iterations 10, surrogate_steps 3, lf_ratio η 0.25 (paper 004 states none), eps 6.375/255 and
step_size 0.6375/255 (the ASPL budget paper 004 compares against), influence cg, hvp_steps 5, damping 0.01.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .engine import AttackModels, PGDResult, pgd_step
from .lowfreq import lowpass
from .setlevel import attack_models, base_surrogate, pgd_over_set, results, start_run, trainer

DEFAULTS = {"eps": 6.375, "step_size": 0.6375, "epochs": 10, "iterations": 10, "surrogate_steps": 3,
            "lf_ratio": 0.25, "influence": "cg", "hvp_steps": 5, "damping": 0.01, "lissa_scale": 10.0,
            "influence_params": "attn2.to_k,attn2.to_v"}
SOLVERS = ("cg", "lissa", "identity")


def twice_differentiable():
    """Attention through the math kernel: fused SDPA kernels have no double backward (needed for HVPs)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def influence_parameters(unet, patterns: str) -> list[torch.nn.Parameter]:
    """UNet parameters whose name contains one of the comma-separated ``patterns``."""
    wanted = [p.strip() for p in patterns.split(",") if p.strip()]
    params = [p for name, p in unet.named_parameters() if any(w in name for w in wanted)]
    if not params:
        raise ValueError(f"no UNet parameter matches --influence-params {patterns!r}")
    return params


def _dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    return sum((x * y).sum() for x, y in zip(a, b))


def inverse_hvp(hvp: Callable[[list[torch.Tensor]], list[torch.Tensor]], g: list[torch.Tensor], *, solver: str,
                steps: int, damping: float, scale: float = 10.0) -> list[torch.Tensor]:
    """Approximate ``(H + λI)⁻¹ g`` (``cg``), ``H⁻¹ g`` by LiSSA (``lissa``), or ``g`` (``identity``)."""
    if solver == "identity" or steps <= 0:
        return [t.clone() for t in g]
    if solver == "lissa":
        h = [t.clone() for t in g]
        for _ in range(steps):
            hv = hvp(h)
            h = [gi + (1 - damping) * hi - hvi / scale for gi, hi, hvi in zip(g, h, hv)]
        return [hi / scale for hi in h]
    if solver != "cg":
        raise ValueError(f"unknown influence solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    x = [torch.zeros_like(t) for t in g]
    r = [t.clone() for t in g]
    p = [t.clone() for t in g]
    rs = _dot(r, r)
    for _ in range(steps):
        ap = [hv + damping * pi for hv, pi in zip(hvp(p), p)]
        curvature = _dot(p, ap)
        if curvature <= 0:  # negative curvature: H is not positive definite here; keep what we have
            break
        alpha = rs / curvature
        x = [xi + alpha * pi for xi, pi in zip(x, p)]
        r = [ri - alpha * api for ri, api in zip(r, ap)]
        new_rs = _dot(r, r)
        if new_rs.sqrt() <= 1e-6 * _dot(g, g).sqrt():
            break
        p = [ri + (new_rs / rs) * pi for ri, pi in zip(r, p)]
        rs = new_rs
    return x if any(bool(xi.abs().sum() > 0) for xi in x) else [t.clone() for t in g]


def hessian_operator(models: AttackModels, images: torch.Tensor, params: list[torch.nn.Parameter],
                     seeds: list[int]) -> Callable[[list[torch.Tensor]], list[torch.Tensor]]:
    """``v ↦ H v`` for the Hessian on ``params`` of the mean SE of ``images`` under fixed draws from ``seeds``."""
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    with twice_differentiable():
        loss = models.denoise_loss(images.detach(), generators).mean()
    grads = torch.autograd.grad(loss, params, create_graph=True)

    def hvp(vector: list[torch.Tensor]) -> list[torch.Tensor]:
        return [h.detach() for h in torch.autograd.grad(_dot(grads, vector), params, retain_graph=True)]

    return hvp


def self_influence(models: AttackModels, image: torch.Tensor, generator: torch.Generator,
                   params: list[torch.nn.Parameter], hvp, *, solver: str, steps: int, damping: float,
                   scale: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """I(x) = −∇_θ SE(x)ᵀ H⁻¹ ∇_x∇_θ SE(x) for one image ``(1, 3, H, W)`` (Prop. 2), same shape."""
    x = image.detach().requires_grad_(True)
    with twice_differentiable():
        se = models.denoise_loss(x, [generator], mask).sum()
    g = torch.autograd.grad(se, params, create_graph=True)
    v = inverse_hvp(hvp, [t.detach() for t in g], solver=solver, steps=steps, damping=damping, scale=scale)
    (mixed,) = torch.autograd.grad(_dot(g, v), x)
    return -mixed


def attack_set(images: Sequence[torch.Tensor], *, models: AttackModels, generators: Sequence[torch.Generator],
               eps: float = 6.375, step_size: float = 0.6375, epochs: int = 10, iterations: int = 10,
               surrogate_steps: int = 3, lf_ratio: float = 0.25, influence: str = "cg", hvp_steps: int = 5,
               damping: float = 0.01, lissa_scale: float = 10.0, influence_params: str = "attn2.to_k,attn2.to_v",
               progress=None, **params: Any) -> list[PGDResult]:
    """Protect the set ``images`` ``[(3, H, W)]`` in [0, 1]; one result per image, in order."""
    if influence not in SOLVERS:
        raise ValueError(f"unknown influence solver {influence!r}; choose one of {', '.join(SOLVERS)}")
    for option in ("grad_transform", "delta_transform"):  # InMark's low-pass (gradient only, Eq. 8) is built in
        params.pop(option, None)
    run = start_run(images, pipe=models.pipe, generators=generators, progress=progress,
                    grad_transform=lambda grad: lowpass(grad, lf_ratio), **params)
    theta = base_surrogate(models.pipe)
    pset = run.pset
    for epoch in range(epochs):
        trainer(run, theta).train(pset.squares(run.resolution), surrogate_steps)
        frozen = attack_models(theta, run)
        if epoch % 2 == 0:
            loss = pgd_over_set(run, frozen, iterations, eps=eps, step_size=step_size)
            run.report("inmark", epoch + 1, epochs, lf_loss=loss)
            continue
        subset = influence_parameters(theta.unet, influence_params)
        for p in subset:
            p.requires_grad_(True)
        first = pset.groups(run.batch_size or 1)[0]  # Hessian minibatch: one image unless --batch-size says
        seeds = [run.generator.initial_seed() + 7919 * epoch + i for i in first]
        hvp = hessian_operator(frozen, pset.gather(first)[1], subset, seeds) if influence != "identity" else None
        for _ in range(iterations):
            for i in range(len(pset)):
                clean, adv, mask = pset.gather([i])
                direction = self_influence(frozen, adv, run.generators[i], subset, hvp, solver=influence,
                                           steps=hvp_steps, damping=damping, scale=lissa_scale, mask=mask)
                pset.scatter([i], pgd_step(adv, direction, clean, eps=eps, step_size=step_size, mask=mask))
        del hvp
        for p in subset:
            p.requires_grad_(False)
        run.report("inmark", epoch + 1, epochs, influence_steps=iterations)
    return results(run, attack_models(theta, run), eps, surrogate="final θ", lf_ratio=lf_ratio,
                   influence=influence)
