"""Each single-image attack's first PGD step against an expected step computed independently in plain torch.

The attack's (t, ε) draws are pinned (``models.draw`` patched to return fixed tensors), so the test can compute
the paper's loss on the same draws with the VAE, scheduler and UNet called directly, take its gradient with
``torch.autograd``, and require that the attack's step equal ``x ± α·sign(∇)``. A flipped sign, a no-op, a reversed
gradient, a wrong reduction or a missing term changes the step on most pixels, so these tests fail on them."""

from __future__ import annotations

import pytest
import torch

from cloaklab.ops.attacks import adm, da, ea, engine, get_attack, mist, sds
from cloaklab.tests.conftest import photo_tensor

ALPHA = 2.0  # step in /255


@pytest.fixture(scope="module")
def images(device):
    return torch.stack([photo_tensor("astronaut", 32), photo_tensor("coffee", 32)]).to(device)


@pytest.fixture
def pinned(tiny_pipe, images):
    """AttackModels whose every (t, ε) draw is one fixed pair, plus that pair."""
    models = engine.AttackModels(tiny_pipe)
    shape = (images.shape[0], 4, images.shape[-2] // 8, images.shape[-1] // 8)
    g = torch.Generator().manual_seed(1234)
    t = torch.tensor([300, 700])
    noise = torch.randn(shape, generator=g).to(images.device)
    models.draw = lambda latents, generators: (t.to(latents.device), noise.to(latents))
    return models, t, noise


def gens(n: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(i) for i in range(n)]


# ------------------------------------------------------------------------- the paper's losses, in plain torch
def latents_of(pipe, x):
    return pipe.vae.encode(x * 2 - 1).latent_dist.mean * pipe.vae.config.scaling_factor


def eps_mse(pipe, models, x, t, noise):
    """Per-image mean ‖ε_θ(√ᾱ z + √(1−ᾱ) ε, t, c) − ε‖² (AdvDM; LDM p_losses: mean over the latent)."""
    z = latents_of(pipe, x)
    abar = pipe.scheduler.alphas_cumprod.to(z.device)[t].view(-1, 1, 1, 1)
    noisy = abar.sqrt() * z + (1 - abar).sqrt() * noise
    text = models.text_embeddings(x.shape[0])
    prediction = pipe.unet(noisy, t.to(z.device), encoder_hidden_states=text).sample
    return (prediction - noise).pow(2).flatten(1).mean(1)


def grad_of(loss_fn, x):
    x = x.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(loss_fn(x).sum(), x)
    return g


def expected_step(x, grad, sign=+1, eps=16.0):
    stepped = x + sign * ALPHA / 255 * grad.sign()
    return (x + (stepped - x).clamp(-eps / 255, eps / 255)).clamp(0, 1)


def agree(a, b) -> float:
    """Fraction of pixels where two one-step results are equal (sign ties at ~0 gradient may differ)."""
    return float(((a - b).abs() < 1e-6).float().mean())


def one_step(module, x, models, **kw):
    return module.attack(x, models=models, generators=gens(x.shape[0]), steps=1, step_size=ALPHA,
                         random_start=False, eval_draws=0, **kw).images


def test_adm_plus_and_minus_step_along_the_sign_of_the_eps_mse_gradient(tiny_pipe, pinned, images):
    models, t, noise = pinned
    grad = grad_of(lambda x: eps_mse(tiny_pipe, models, x, t, noise), images)
    assert agree(one_step(adm, images, models), expected_step(images, grad, +1)) > 0.99
    assert agree(one_step(adm, images, models, ascent=False), expected_step(images, grad, -1)) > 0.99
    spec = get_attack("adm-")  # the registered adm- really descends
    out = spec.load().attack(images, models=models, generators=gens(2), steps=1, step_size=ALPHA,
                             random_start=False, eval_draws=0, **spec.fixed).images
    assert agree(out, expected_step(images, grad, -1)) > 0.99


def test_sds_steps_along_the_encoder_jacobian_times_the_detached_residual(tiny_pipe, pinned, images):
    """SDS (Diff-Protect diff_mist.py, mode 'sds'): ∇ = (∂z/∂x)ᵀ (ε_θ(z_t) − ε), residual held constant."""
    models, t, noise = pinned
    with torch.no_grad():
        z = latents_of(tiny_pipe, images)
        abar = tiny_pipe.scheduler.alphas_cumprod.to(z.device)[t].view(-1, 1, 1, 1)
        noisy = abar.sqrt() * z + (1 - abar).sqrt() * noise
        residual = tiny_pipe.unet(noisy, t, encoder_hidden_states=models.text_embeddings(2)).sample - noise
    grad = grad_of(lambda x: (latents_of(tiny_pipe, x) * residual).flatten(1).sum(1), images)
    assert agree(one_step(sds, images, models), expected_step(images, grad, +1)) > 0.99
    assert agree(one_step(sds, images, models, ascent=False), expected_step(images, grad, -1)) > 0.99


def test_ea_descends_the_latent_distance_to_the_target(tiny_pipe, pinned, images):
    models, _, _ = pinned
    target = ea.make_target("pattern", 32, 32)[None].expand(2, -1, -1, -1).to(images.device)
    with torch.no_grad():
        z_target = latents_of(tiny_pipe, target)
    grad = grad_of(lambda x: (latents_of(tiny_pipe, x) - z_target).pow(2).flatten(1).sum(1), images)
    assert agree(one_step(ea, images, models, targets=target), expected_step(images, grad, -1)) > 0.99


@pytest.mark.parametrize("weight", [1e4, 3.0])
def test_mist_descends_summed_encoder_distance_minus_weighted_mean_eps_mse(tiny_pipe, pinned, images, weight):
    """Mist v1 mist_v3.py target_model.forward mode 2: MSELoss(reduction="sum")(z, z_target) − rate · mean ε-MSE."""
    models, t, noise = pinned
    target = ea.make_target("pattern", 32, 32)[None].expand(2, -1, -1, -1).to(images.device)
    with torch.no_grad():
        z_target = latents_of(tiny_pipe, target)

    def loss(x):
        distance = (latents_of(tiny_pipe, x) - z_target).pow(2).flatten(1).sum(1)
        return distance - weight * eps_mse(tiny_pipe, models, x, t, noise)

    grad = grad_of(loss, images)
    # 1e4 is Mist's ``rate = 10**(1+3)``: left to the attack's default, so a changed default fails here
    out = one_step(mist, images, models, targets=target, **({} if weight == 1e4 else {"fused_weight": weight}))
    assert agree(out, expected_step(images, grad, -1)) > 0.99



def test_ace_target_loss_is_the_mean_squared_distance_of_the_prediction_to_the_target_latent(tiny_pipe, pinned,
                                                                                             images):
    """ACE (paper 004): ‖ε_θ(z'_t, t, c) − z_target‖², mean over the latent, on the same pinned (t, ε)."""
    from cloaklab.ops.attacks import ace

    models, t, noise = pinned
    target = ea.make_target("pattern", 32, 32)[None].to(images.device)
    with torch.no_grad():
        z_target = latents_of(tiny_pipe, target)
        got = ace.target_loss(models, {(32, 32): z_target})(images, gens(2))
        z = latents_of(tiny_pipe, images)
        abar = tiny_pipe.scheduler.alphas_cumprod.to(z.device)[t].view(-1, 1, 1, 1)
        prediction = tiny_pipe.unet(abar.sqrt() * z + (1 - abar).sqrt() * noise, t.to(z.device),
                                    encoder_hidden_states=models.text_embeddings(2)).sample
        expected = (prediction - z_target).pow(2).flatten(1).mean(1)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-6)

def test_mist_target_changes_the_perturbation(tiny_pipe, images):
    """At the default weight 1e4 the summed encoder term competes with AdvDM's: --target matters."""
    models = engine.AttackModels(tiny_pipe)
    outs = []
    for kind in ("pattern", "zero"):
        target = ea.make_target(kind, 32, 32)[None].expand(2, -1, -1, -1).to(images.device)
        outs.append(mist.attack(images, models=models, generators=gens(2), targets=target, steps=3,
                                step_size=ALPHA, eval_draws=0).images)
    assert agree(outs[0], outs[1]) < 0.97  # 32 px: 64 latent elements; at 512² the sum is 256× larger still


def test_lf_step_is_the_sign_of_the_lowpassed_gradient_without_delta_projection(tiny_pipe, pinned, images):
    """Paper 004 Eq. 8 in Eq. 4: x + α·sign(IDCT(DCT(∇) ⊙ m_η)); the DCT written out here with torch.fft-free
    matrices built from the definition (orthonormal DCT-II)."""
    import math

    models, t, noise = pinned
    grad = grad_of(lambda x: eps_mse(tiny_pipe, models, x, t, noise), images).double()
    n = images.shape[-1]
    k = torch.arange(n, dtype=torch.float64)
    basis = torch.cos(math.pi * (k[None, :] + 0.5) * k[:, None] / n) * math.sqrt(2 / n)
    basis[0] /= math.sqrt(2)
    keep = torch.zeros(n, n, dtype=torch.float64)
    keep[:8, :8] = 1  # η = 0.25 of 32
    low = basis.T @ ((basis @ grad.cpu() @ basis.T) * keep) @ basis
    spec = get_attack("lf-adm+")
    assert spec.defaults["random_start"] is False and spec.defaults["lf_project"] is False
    out = spec.load().attack(images, models=models, generators=gens(2), steps=1, step_size=ALPHA,
                             random_start=False, eval_draws=0, **spec.fixed, lf_ratio=0.25).images
    assert agree(out, expected_step(images, low.float().to(images.device), +1)) > 0.99


def test_da_step_pulls_the_sampler_output_toward_mid_grey(monkeypatch, pinned, images):
    """PhotoGuard super_l2: x ← Π(x − step·∇/‖∇‖) on ‖sample(x) − target‖₂ in [-1, 1] units; the sampler is
    replaced by an identity map (2x − 1) so the expected step has a closed form: toward the target, 0 = grey."""
    models, _, _ = pinned
    seen = {}

    def fake_sample(models_, x, generators, **kw):
        seen.update(kw)
        return x * 2 - 1

    monkeypatch.setattr(da, "sample", fake_sample)
    spec = get_attack("da")
    target = ea.make_target(spec.defaults["target"], 32, 32)[None].expand(2, -1, -1, -1).to(images.device)
    params = {k: v for k, v in spec.defaults.items() if k not in ("target",)}
    params.update(steps=1, grad_samples=1, eval_draws=0)
    out = da.attack(images, models=models, generators=gens(2), targets=target, **params).images
    assert seen == {"sampling_steps": 4, "guidance": 7.5, "strength": 1.0, "eta": 1.0, "prompt": ""}
    direction = (images - 0.5) / (images - 0.5).flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    expected = (images - 0.5 * direction).clamp(images - 16 / 255, images + 16 / 255).clamp(0, 1)  # l2_step 1 → 0.5
    assert torch.allclose(out, expected, atol=1e-5)


def test_da_sampler_keeps_gradients_on_saturated_pixels(monkeypatch, tiny_pipe, images):
    """No clamp on the decoder output (PhotoGuard attack_forward decodes without one): with a decoder whose output
    saturates, the sampler still returns values beyond [-1, 1] and the loss has gradient through them."""
    from types import SimpleNamespace

    models = engine.AttackModels(tiny_pipe)
    decode = tiny_pipe.vae.decode
    monkeypatch.setattr(tiny_pipe.vae, "decode", lambda z, *a, **k: SimpleNamespace(sample=decode(z).sample * 10))
    x = images[:1].clone().requires_grad_(True)
    out = da.sample(models, x, gens(1), sampling_steps=2)
    outside = out.abs() > 1
    assert float(outside.float().mean()) > 0.2
    (grad,) = torch.autograd.grad(out[outside].sum(), x)
    assert grad.abs().sum() > 0


def test_da_l2_projection_radius_is_half_l2_eps_on_the_unit_range(monkeypatch, pinned, images):
    """l2_eps is in PhotoGuard's [-1, 1] units: ‖δ‖₂ ≤ l2_eps/2 on [0, 1]. With the identity sampler the direction is
    toward grey; one step of l2_step 2 (1.0 on [0, 1]) overshoots the radius l2_eps 1 → 0.5, so δ = −0.5·d."""
    models, _, _ = pinned
    monkeypatch.setattr(da, "sample", lambda models_, x, generators, **kw: x * 2 - 1)
    grey = torch.full_like(images, 0.5)
    out = da.attack(images, models=models, generators=gens(2), targets=grey, eps=255.0, l2_eps=1.0, l2_step=2.0,
                    steps=1, grad_samples=1, eval_draws=0).images
    direction = (images - 0.5) / (images - 0.5).flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    assert torch.allclose(out, (images - 0.5 * direction).clamp(0, 1), atol=1e-5)


def test_da_sampler_is_ddim_with_eta_one_typed_out(monkeypatch):
    """PhotoGuard's 4-step DDIM run with η = 1, typed out with a UNet that predicts ε̂ = 0 (so x̂0 = z_t/√ᾱ_t) and an
    identity encoder/decoder: z ← √ᾱ_751 z0 + √(1−ᾱ_751) n₀, then z ← √ᾱ_prev·z/√ᾱ_t + σ_t n_k at t = 751, 501,
    251, 1 (SD's steps_offset 1, ᾱ_prev of the last step = ᾱ_0), σ_t² = (1−ᾱ_prev)/(1−ᾱ_t)·(1 − ᾱ_t/ᾱ_prev),
    n from the image's generator in draw order. SD's scaled-linear betas typed here."""
    from types import SimpleNamespace

    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                              clip_sample=False, set_alpha_to_one=False)
    fake = SimpleNamespace(
        scheduler=scheduler, dtype=torch.float32, vae=None, encode=lambda x: x,
        text_embeddings=lambda batch, prompt="": torch.zeros(batch, 1, 1),
        unet=lambda z, t, encoder_hidden_states=None: SimpleNamespace(sample=torch.zeros_like(z)))
    monkeypatch.setattr(da.diffusion, "decode_latents", lambda vae, z, clamp=True: (z + 1) / 2)
    x = torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(7))
    out = da.sample(fake, x, [torch.Generator().manual_seed(5)], sampling_steps=4, strength=1.0, eta=1.0)

    beta = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - beta, 0)
    g = torch.Generator().manual_seed(5)
    z = abar[751].sqrt() * x.double() + (1 - abar[751]).sqrt() * torch.randn(3, 4, 4, generator=g).double()
    for t in (751, 501, 251, 1):
        prev = abar[t - 250] if t > 250 else abar[0]
        sigma = ((1 - prev) / (1 - abar[t]) * (1 - abar[t] / prev)).sqrt()
        z = prev.sqrt() * z / abar[t].sqrt() + sigma * torch.randn(3, 4, 4, generator=g).double()
    torch.testing.assert_close(out.double(), z, atol=1e-4, rtol=1e-4)


def test_latent_sample_encodes_a_draw_from_the_vae_posterior(tiny_pipe, images):
    """``latent_sample``: s·(μ + σ·n) with μ, σ from diffusers' own ``vae.encode`` and n each image's first draw
    (typed from fresh generators of the same seeds); without it, s·μ."""
    models = engine.AttackModels(tiny_pipe, latent_sample=True)
    with torch.no_grad():
        got = models.encode(images, gens(2))
        posterior = tiny_pipe.vae.encode(images * 2 - 1).latent_dist
    n = torch.stack([torch.randn(tuple(posterior.mean.shape[1:]), generator=g) for g in gens(2)]).to(images.device)
    scale = tiny_pipe.vae.config.scaling_factor
    assert float(posterior.std.min()) > 1e-3
    torch.testing.assert_close(got, (posterior.mean + posterior.std * n) * scale, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(engine.AttackModels(tiny_pipe).encode(images, gens(2)), posterior.mean * scale)
