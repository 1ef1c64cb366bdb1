"""Model-based purifiers (issue 4): regen, diffpure-latent/-pixel, ddspure, gridpure, pdm-pure, impress, codeformer-sr,
noisy-upscale — on tiny stand-in networks built in code, offline."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from cloaklab.ops.purify import PURIFIERS, get_purifier
from cloaklab.ops.purify import sdedit as sdedit_module
from cloaklab.ops.purify.models import PurifierModels, TinyLPIPS, build_tiny_pixel_model, build_tiny_upscaler
from cloaklab.tests.conftest import photo, photo_tensor

MODEL_METHODS = ("regen", "diffpure-latent", "diffpure-pixel", "ddspure", "gridpure", "pdm-pure", "impress",
                 "codeformer-sr", "noisy-upscale")


@pytest.fixture(scope="module")
def pixel_model():
    return build_tiny_pixel_model()


@pytest.fixture(scope="module")
def upscaler():
    return build_tiny_upscaler()


class SpyDenoiser:
    """Wraps a denoiser (UNet or ``PixelDiffusion.predict``) and records the timesteps it is called with."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []
        self.dtype = getattr(inner, "dtype", torch.float32)

    def __call__(self, x, t, *args, **kwargs):
        self.calls.append((int(t.reshape(-1)[0]), x.shape[0]))
        return self.inner(x, t, *args, **kwargs)


def spy_add_noise(monkeypatch) -> list[int]:
    seen: list[int] = []
    original = sdedit_module.add_noise

    def add_noise(scheduler, latents, noise, timesteps):
        seen.extend(int(t) for t in timesteps)
        return original(scheduler, latents, noise, timesteps)

    monkeypatch.setattr(sdedit_module, "add_noise", add_noise)
    return seen


def spied_pipe(pipe):
    spy = SpyDenoiser(pipe.unet)
    proxy = SimpleNamespace(vae=pipe.vae, unet=spy, scheduler=pipe.scheduler, tokenizer=pipe.tokenizer,
                            text_encoder=pipe.text_encoder)
    return proxy, spy


def run(name, images, models, seeds=(0, 1), **given):
    spec = get_purifier(name)
    params = spec.resolve(given)
    generators = [torch.Generator().manual_seed(s) for s in seeds[: images.shape[0]]]
    with torch.no_grad():
        return spec.load().purify(images, generators=generators, models=models, **params)


# ------------------------------------------------------------------------------------ the shared sampler
@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_reverse_step_matches_diffusers_ddim_with_eta_0(kind):
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", clip_sample=False, prediction_type=kind)
    scheduler.set_timesteps(50)  # stride 20: DDIM steps 61 → 41
    generator = torch.Generator().manual_seed(0)
    x, output = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 4, 8, 8, generator=generator)
    x0, eps = sdedit_module.clean_estimate(scheduler, output, x, 61)
    ours = sdedit_module.reverse_step(scheduler, x0, eps, 61, 41, eta=0.0, noise=None)
    theirs = scheduler.step(output, 61, x, eta=0.0)
    assert torch.allclose(x0, theirs.pred_original_sample, atol=1e-5)
    assert torch.allclose(ours, theirs.prev_sample, atol=1e-5)


def test_reverse_step_with_eta_1_is_the_ddpm_posterior_sample():
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True)
    scheduler.set_timesteps(1000)
    x, output = torch.randn(1, 3, 16, 16) * 1.5, torch.randn(1, 3, 16, 16)
    x0, eps = sdedit_module.clean_estimate(scheduler, output, x, 40, clip=True)
    noise = sdedit_module.per_image_noise((3, 16, 16), [torch.Generator().manual_seed(7)], x)
    ours = sdedit_module.reverse_step(scheduler, x0, eps, 40, 39, eta=1.0, noise=noise)
    theirs = scheduler.step(output, 40, x, generator=torch.Generator().manual_seed(7)).prev_sample
    assert torch.allclose(ours, theirs, atol=1e-5)


# ------------------------------------------------------------------------------- where denoising starts
def test_schedules_start_at_the_documented_steps():
    regen, latent = get_purifier("regen").defaults, get_purifier("diffpure-latent").defaults
    assert (regen["t"], regen["steps"], regen["guidance"], regen["prompt"]) == (60, 50, 7.5, "")
    assert sdedit_module.denoise_timesteps(regen["t"], 1000, regen["steps"]) == [60, 40, 20, 0]
    assert sdedit_module.denoise_timesteps(latent["t"], 1000, latent["steps"]) == list(range(300, -1, -1))
    assert latent["eta"] == 1.0  # DiffShortcut diffpure_main.py: DDPMScheduler.step on every step 300..0
    grid = get_purifier("gridpure").defaults
    assert sdedit_module.denoise_timesteps(grid["t"], 1000, grid["steps"]) == list(range(10, -1, -1))


def test_regen_noises_to_step_60_and_denoises_from_there(tiny_pipe, monkeypatch):
    seen = spy_add_noise(monkeypatch)
    proxy, spy = spied_pipe(tiny_pipe)
    images = torch.stack([photo_tensor("astronaut", 32)])
    out = run("regen", images, PurifierModels(pipe=proxy))
    assert seen == [60]
    assert [t for t, _ in spy.calls] == [60, 40, 20, 0]
    assert all(batch == 1 for _, batch in spy.calls)  # empty prompt: CFG is the identity, one pass per step
    assert out.shape == images.shape and 0 <= float(out.min()) and float(out.max()) <= 1


def test_diffpure_latent_starts_at_300_with_guidance(tiny_pipe, monkeypatch):
    seen = spy_add_noise(monkeypatch)
    proxy, spy = spied_pipe(tiny_pipe)
    images = torch.stack([photo_tensor("astronaut", 32), photo_tensor("rocket", 32)])
    out, stats = run("diffpure-latent", images, PurifierModels(pipe=proxy), class_name="person", steps=50, eta=0.0)
    assert seen == [300, 300]
    assert [t for t, _ in spy.calls] == list(range(300, -1, -20))  # the DDIM variant: 16 UNet calls
    assert all(batch == 4 for _, batch in spy.calls)  # unconditional + conditional halves
    assert stats[0]["prompt"] == "a photo of a person, clear, high resolution, high quality, noise-free"
    _, stats = run("diffpure-latent", images[:1], PurifierModels(pipe=proxy), steps=10)
    assert stats[0]["prompt"] == ""  # no class name: the paper's LatentDiffPure-∅


def test_diffpure_latent_default_is_diffshortcuts_stochastic_ddpm_on_every_step(tiny_pipe):
    """DiffShortcut ``diffpure_main.py``: DDPM ``step`` on timesteps 300, 299, …, 0 — 301 UNet calls, stochastic."""
    proxy, spy = spied_pipe(tiny_pipe)
    image = torch.stack([photo_tensor("astronaut", 16)])
    first, _ = run("diffpure-latent", image, PurifierModels(pipe=proxy), seeds=(1,))
    assert [t for t, _ in spy.calls] == list(range(300, -1, -1)) and len(spy.calls) == 301
    repeat, _ = run("diffpure-latent", image, PurifierModels(pipe=proxy), seeds=(1,))
    other, _ = run("diffpure-latent", image, PurifierModels(pipe=proxy), seeds=(2,))
    assert torch.equal(first, repeat)
    assert (first - other).abs().max() > 1e-3


def test_diffpure_latent_default_noises_a_posterior_sample_of_the_vae(tiny_pipe, monkeypatch):
    """DiffShortcut ``diffpure_main.py`` encodes with ``latent_dist.sample()``: the latent handed to ``add_noise`` is
    s·(μ + σ·n), μ and σ read here from diffusers' own ``vae.encode`` and n the image generator's first draw (typed
    from a fresh generator of the same seed), not the posterior mean."""
    captured = []
    original = sdedit_module.add_noise

    def add_noise(scheduler, latents, noise, timesteps):
        captured.append(latents.detach().clone())
        return original(scheduler, latents, noise, timesteps)

    monkeypatch.setattr(sdedit_module, "add_noise", add_noise)
    image = torch.stack([photo_tensor("astronaut", 16)])
    run("diffpure-latent", image, PurifierModels(pipe=tiny_pipe), seeds=(3,), steps=50, eta=1.0)
    vae = tiny_pipe.vae
    with torch.no_grad():
        posterior = vae.encode(image * 2 - 1).latent_dist
    n = torch.randn(tuple(posterior.mean.shape[1:]), generator=torch.Generator().manual_seed(3))[None]
    expected = (posterior.mean + posterior.std * n) * vae.config.scaling_factor
    assert float(posterior.std.min()) > 1e-3  # the sample differs measurably from the mean
    torch.testing.assert_close(captured[0], expected.float(), atol=1e-5, rtol=1e-5)


def test_ddpm_posterior_step_typed_out_on_fixed_draws():
    """One η = 1 step from t to t − 1 is DDPM's posterior q(x_{t−1} | x_t, x̂0) (Ho et al. 2020 Eq. 6–7), with SD's
    scaled-linear betas typed here: mean = √ᾱ_{t−1} β_t/(1 − ᾱ_t) x̂0 + √α_t (1 − ᾱ_{t−1})/(1 − ᾱ_t) x_t,
    variance β̃_t = (1 − ᾱ_{t−1})/(1 − ᾱ_t) β_t."""
    from cloaklab.ops.models.shaped import sd15_scheduler

    scheduler = sd15_scheduler()
    generator = torch.Generator().manual_seed(11)
    x_t, eps, z = (torch.randn(1, 4, 6, 6, generator=generator, dtype=torch.float64) for _ in range(3))
    beta = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alpha_bar = torch.cumprod(1 - beta, 0)
    t = 250
    x0 = (x_t - (1 - alpha_bar[t]).sqrt() * eps) / alpha_bar[t].sqrt()
    mean = (alpha_bar[t - 1].sqrt() * beta[t] / (1 - alpha_bar[t]) * x0
            + (1 - beta[t]).sqrt() * (1 - alpha_bar[t - 1]) / (1 - alpha_bar[t]) * x_t)
    variance = (1 - alpha_bar[t - 1]) / (1 - alpha_bar[t]) * beta[t]
    ours_x0, ours_eps = sdedit_module.clean_estimate(scheduler, eps.float(), x_t.float(), t)
    ours = sdedit_module.reverse_step(scheduler, ours_x0, ours_eps, t, t - 1, eta=1.0, noise=z.float())
    torch.testing.assert_close(ours.double(), mean + variance.sqrt() * z, atol=2e-5, rtol=0)


def test_diffpure_pixel_starts_at_100(pixel_model, monkeypatch):
    seen = spy_add_noise(monkeypatch)
    spy = SpyDenoiser(pixel_model.predict)
    model = SimpleNamespace(predict=spy, scheduler=pixel_model.scheduler, resolution=pixel_model.resolution)
    out = run("diffpure-pixel", torch.stack([photo_tensor("rocket", 40)]), PurifierModels(pixel=model), steps=100)
    assert seen == [100] and [t for t, _ in spy.calls] == list(range(100, -1, -10))
    assert out.shape == (1, 3, 40, 40)


# -------------------------------------------------------------------------------------------- ddspure
@pytest.mark.parametrize("betas", ["linear", "scaled_linear"])
def test_ddspure_t_star_is_the_closed_form_in_the_own_schedule(betas):
    from diffusers import DDPMScheduler

    from cloaklab.ops.purify.ddspure import dds_timestep

    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule=betas,
                              beta_start=1e-4 if betas == "linear" else 0.00085,
                              beta_end=0.02 if betas == "linear" else 0.012)
    if betas == "linear":
        beta = np.linspace(1e-4, 0.02, 1000)
    else:
        beta = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    alpha_bar = np.cumprod(1 - beta)
    ratio = (1 - alpha_bar) / alpha_bar
    for sigma in (4.0, 11.0, 16.0, 64.0):
        target = (2 * sigma / 255) ** 2  # σ on the [-1, 1] data scale
        expected = int(np.argmin(np.abs(ratio - target)))
        t_star = dds_timestep(scheduler, sigma)
        assert t_star == expected
        assert ratio[max(t_star - 1, 0)] <= target <= ratio[t_star + 1]
    scheduler.set_timesteps(50)  # a respaced sampling schedule must not change t*
    assert dds_timestep(scheduler, 11.0) == int(np.argmin(np.abs(ratio - (22 / 255) ** 2)))
    assert dds_timestep(scheduler, 1e6) == 999  # clipped to the schedule


def test_ddspure_runs_one_sdedit_from_t_star(pixel_model, monkeypatch):
    from cloaklab.ops.purify.ddspure import dds_timestep

    seen = spy_add_noise(monkeypatch)
    spy = SpyDenoiser(pixel_model.predict)
    model = SimpleNamespace(predict=spy, scheduler=pixel_model.scheduler, resolution=pixel_model.resolution)
    images = torch.stack([photo_tensor("coffee", 48)])
    out, stats = run("ddspure", images, PurifierModels(pixel=model), steps=1)
    t_star = dds_timestep(pixel_model.scheduler, 11.0)
    assert stats[0]["t_star"] == t_star and seen == [t_star] and [t for t, _ in spy.calls] == [t_star]
    assert out.shape == images.shape


# ------------------------------------------------------------------------------------------- gridpure
@pytest.mark.parametrize("size,window,stride", [((64, 64), 32, 16), ((80, 72), 32, 16), ((50, 37), 32, 20),
                                                ((512, 512), 256, 128)])
def test_gridpure_windows_cover_every_pixel(size, window, stride):
    from cloaklab.ops.purify.gridpure import grid_windows

    covered = np.zeros(size, dtype=int)
    for top, left in grid_windows(*size, window, stride):
        assert top + window <= size[0] and left + window <= size[1]
        covered[top:top + window, left:left + window] += 1
    assert covered.min() >= 1
    if size == (512, 512):
        assert len(grid_windows(*size, window, stride)) == 9  # the paper's 3 × 3 grid


def test_gridpure_overlap_averaging_is_exact():
    from cloaklab.ops.purify.gridpure import grid_purify

    images = torch.stack([photo_tensor("astronaut", 64), photo_tensor("chelsea", 64)])
    same = grid_purify(images, lambda w, owner: w, window=32, stride=16, gamma=0.1, iters=3)
    assert torch.allclose(same, images, atol=1e-6)  # identity denoiser → identity purifier
    shifted = grid_purify(images * 0.5, lambda w, owner: w + 0.25, window=32, stride=16, gamma=0.1, iters=1)
    assert torch.allclose(shifted, images * 0.5 + 0.9 * 0.25, atol=1e-6)  # every pixel averaged with weight 1
    # Only the stitched corner window changes (+1): corner pixels are covered by one grid window and the corner
    # patch, so they move by 1/2; the centre (four grid windows, no corner patch) does not move.
    def corner_only(windows, owner):
        out = windows.clone()
        out[-1] += 1
        return out

    marked = grid_purify(torch.zeros(1, 3, 64, 64), corner_only, window=32, stride=16, gamma=0.0, iters=1)[0]
    for rows, cols in ((slice(0, 16), slice(0, 16)), (slice(0, 16), slice(48, 64)), (slice(48, 64), slice(0, 16)),
                       (slice(48, 64), slice(48, 64))):
        assert torch.allclose(marked[:, rows, cols], torch.full_like(marked[:, rows, cols], 0.5))
    assert float(marked[:, 16:48, 16:48].abs().max()) == 0.0


def test_gridpure_keeps_each_images_windows_with_its_generator(pixel_model):
    images = torch.stack([photo_tensor("astronaut", 48), photo_tensor("coffee", 48)])
    params = dict(window=32, stride=16, iters=1, t=3)
    pair = run("gridpure", images, PurifierModels(pixel=pixel_model), seeds=(5, 6), **params)
    alone = run("gridpure", images[1:], PurifierModels(pixel=pixel_model), seeds=(6,), **params)
    assert torch.allclose(pair[1], alone[0], atol=1e-5)  # batching changes nothing


# -------------------------------------------------------------------------------------------- impress
def test_impress_lowers_its_objective_and_respects_the_lpips_hinge(tiny_pipe):
    from cloaklab.ops.purify.impress import objective

    lpips = TinyLPIPS()
    models = PurifierModels(pipe=tiny_pipe, lpips=lpips)
    images = torch.stack([photo_tensor("astronaut", 32), photo_tensor("chelsea", 32)])
    out, stats = run("impress", images, models, iters=12)
    total, _, _ = objective(tiny_pipe.vae, lpips, out, images, 0.1, 0.1)
    start, _, _ = objective(tiny_pipe.vae, lpips, images, images, 0.1, 0.1)
    assert bool((total < start).all())
    assert all(s["objective"] < s["objective_start"] for s in stats)
    # Inactive hinge (LPIPS far below Δ): the LPIPS term has no gradient, the run equals α = 0.
    far, _ = run("impress", images, models, iters=12, lpips_budget=100.0)
    none, stats_none = run("impress", images, models, iters=12, lpips_weight=0.0)
    assert torch.equal(far, none)
    # Active hinge (Δ = 0, large α): the purified image stays perceptually closer to the input.
    tight, stats_tight = run("impress", images, models, iters=12, lpips_weight=50.0, lpips_budget=0.0)
    assert all(a["lpips"] < b["lpips"] for a, b in zip(stats_tight, stats_none))


class _HalvingVAE:
    """A stand-in autoencoder with D(E(y)) = 0.5·y in model units (scaling factor 1), for closed-form checks."""

    device, dtype = torch.device("cpu"), torch.float32
    config = SimpleNamespace(scaling_factor=1.0, shift_factor=None)

    def encode(self, y):
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=y))

    def decode(self, z):
        return SimpleNamespace(sample=0.5 * z)


def test_impress_two_steps_equal_the_releases_adam_typed_out():
    """The release (IMPRESS ``impress()``): y0 = y_ptb + 0.1·n in [-1, 1] units; loss mean((D(E(y)) − y)²) +
    α·max(LPIPS − Δ, 0); Adam(lr, eps 1e-5); cosine lr to eta_min 1e-5; clamp to [-1, 1]. With D(E(y)) = 0.5·y and
    LPIPS(a, b) = 1000·mean((a − b)²) both terms are active; Adam's two updates are typed out below."""
    alpha, delta, lr, eps, floor, beta1, beta2 = 0.1, 0.1, 0.01, 1e-5, 1e-5, 0.9, 0.999
    image = photo_tensor("astronaut", 16)[None].double()
    lpips = lambda a, b: 1000 * (a - b).pow(2).flatten(1).mean(1)  # noqa: E731
    models = SimpleNamespace(pipe=SimpleNamespace(vae=_HalvingVAE()), lpips=lpips)
    out, _ = run("impress", image.float(), models, seeds=(3,), iters=2)

    n = torch.randn((3, 16, 16), generator=torch.Generator().manual_seed(3)).double()[None]
    y = image * 2 - 1 + 0.1 * n
    m = v = torch.zeros_like(y)
    for step, rate in enumerate([lr, floor + (lr - floor) * (1 + np.cos(np.pi / 2)) / 2], start=1):
        leaf = y.clone().requires_grad_(True)
        consistency = (0.5 * leaf - leaf).pow(2).mean()
        loss = consistency + alpha * torch.clamp(lpips((leaf + 1) / 2, image) - delta, min=0).sum()
        (grad,) = torch.autograd.grad(loss, leaf)
        m, v = beta1 * m + (1 - beta1) * grad, beta2 * v + (1 - beta2) * grad**2
        y = (y - rate / (1 - beta1**step) * m / ((v / (1 - beta2**step)).sqrt() + eps)).clamp(-1, 1)
    torch.testing.assert_close(out.double(), ((y + 1) / 2).clamp(0, 1), atol=2e-6, rtol=0)


def test_noisy_upscale_feeds_the_upscaler_quarter_size_plus_seeded_noise(monkeypatch):
    """robust-style-mimicry: x ↓4 (bicubic, antialiased) + N(0, 0.05²) clipped, at noise level 320; typed below."""
    import torch.nn.functional as F

    from cloaklab.ops.purify import noisy_upscale

    seen = {}

    def fake_upscale(upscaler, low, **kwargs):
        seen["low"], seen["kwargs"] = low.clone(), kwargs
        return F.interpolate(low, scale_factor=4, mode="nearest")

    monkeypatch.setattr(noisy_upscale, "upscale_x4", fake_upscale)
    image = photo_tensor("coffee", 64)[None]
    out = run("noisy-upscale", image, SimpleNamespace(upscaler=None), seeds=(4,))
    small = F.interpolate(image, size=(16, 16), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    expected = (small + 0.05 * torch.randn((3, 16, 16), generator=torch.Generator().manual_seed(4))).clamp(0, 1)
    torch.testing.assert_close(seen["low"], expected, atol=1e-6, rtol=0)
    assert seen["kwargs"]["noise_level"] == 320 and seen["kwargs"]["steps"] == 75 and seen["kwargs"]["guidance"] == 9
    assert out.shape == image.shape


# ------------------------------------------------------------------------------------------- pdm-pure
def tiny_if_stage2():
    """A tiny random DeepFloyd-IF-stage-II-shaped img2img SR pipeline (T5 encoder, 6-channel learned-variance UNet
    with text and noise-level embeddings), with the CLIP tokenizer standing in for T5's (offline)."""
    from diffusers import DDPMScheduler, IFImg2ImgSuperResolutionPipeline, UNet2DConditionModel
    from transformers import T5Config, T5EncoderModel

    from cloaklab.ops.models.tokenizer import VOCAB_SIZE, clip_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=32, layers_per_block=[1, 2], block_out_channels=[32, 64], in_channels=6, out_channels=6,
        down_block_types=["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"],
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", up_block_types=["SimpleCrossAttnUpBlock2D",
                                                                        "ResnetUpsampleBlock2D"],
        cross_attention_dim=32, encoder_hid_dim=32, attention_head_dim=8, addition_embed_type="text",
        addition_embed_type_num_heads=2, cross_attention_norm="group_norm", resnet_time_scale_shift="scale_shift",
        act_fn="gelu", class_embed_type="timestep", mid_block_scale_factor=1.414, time_embedding_act_fn="gelu",
        time_embedding_dim=32, norm_num_groups=8)
    text_encoder = T5EncoderModel(T5Config(vocab_size=VOCAB_SIZE, d_model=32, d_kv=8, d_ff=37, num_layers=2,
                                           num_heads=4))
    pipe = IFImg2ImgSuperResolutionPipeline(
        tokenizer=clip_tokenizer(), text_encoder=text_encoder, unet=unet,
        scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2", variance_type="learned_range", thresholding=True,
                                sample_max_value=1.0),
        image_noising_scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2"), safety_checker=None,
        feature_extractor=None, watermarker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_pdm_pure_runs_if_stage2_img2img_then_the_upscaler(upscaler):
    stage2 = tiny_if_stage2()
    spy = SpyDenoiser(stage2.unet.forward)
    stage2.unet.forward = spy
    images = torch.stack([photo_tensor("astronaut", 48), photo_tensor("coffee", 48)])
    out = run("pdm-pure", images, PurifierModels(stage2=stage2, upscaler=upscaler), resolution=32, steps=20,
              upscaler_steps=2)
    assert out.shape == images.shape and 0 <= float(out.min()) and float(out.max()) <= 1
    assert len(spy.calls) == int(20 * 444 / 1000)  # img2img strength t/1000 of a 20-step schedule
    assert all(t <= 444 and batch == 4 for t, batch in spy.calls)  # SDEdit below t; CFG doubles the batch


# -------------------------------------------------------------------------------------- codeformer-sr
def test_codeformer_sr_restores_faces_only(upscaler):
    from cloaklab.ops.purify.models import TinyFaceRestorer

    calls = []
    restorer = TinyFaceRestorer()

    def face(x, w):
        calls.append((x.shape, w))
        return restorer(x, w)

    images = torch.stack([photo_tensor("astronaut", 32), photo_tensor("coffee", 32)])
    models = PurifierModels(upscaler=upscaler, face=face, detect_faces=lambda imgs: [True, False])
    out, stats = run("codeformer-sr", images, models, steps=2)
    assert [s["face_restored"] for s in stats] == [True, False]
    assert calls == [((1, 3, 512, 512), 0.5)]  # only the face image, at CodeFormer's 512², fidelity 0.5
    assert out.shape == images.shape
    calls.clear()
    models.detect_faces = lambda imgs: [False] * len(imgs)
    run("codeformer-sr", images, models, steps=2)
    assert calls == []


# --------------------------------------------------------------------------- end to end through the CLI
@pytest.fixture
def mixed_dir(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    rgba = np.dstack([np.asarray(photo("astronaut", 64)), np.tile(np.linspace(60, 255, 64, dtype=np.uint8), (64, 1))])
    Image.fromarray(rgba, "RGBA").save(folder / "astro.png")
    photo("chelsea").resize((72, 56)).save(folder / "cat.jpg", quality=95)
    return folder


FAST = {
    "regen": ["--model", "tiny"],
    "diffpure-latent": ["--model", "tiny", "--steps", "10", "--class-name", "cat"],
    "diffpure-pixel": ["--pixel-model", "tiny", "--steps", "50"],
    "ddspure": ["--pixel-model", "tiny", "--steps", "10"],
    "gridpure": ["--pixel-model", "tiny", "--window", "32", "--stride", "16", "--iters", "1", "--t", "2"],
    "pdm-pure": ["--stage2-model", "tiny", "--upscaler-model", "tiny", "--t", "100", "--steps", "20",
                 "--upscaler-steps", "2"],
    "impress": ["--model", "tiny", "--lpips-model", "tiny", "--iters", "3"],
    "codeformer-sr": ["--upscaler-model", "tiny", "--face-model", "tiny", "--steps", "2"],
    "noisy-upscale": ["--upscaler-model", "tiny", "--steps", "2"],
}


def test_every_model_method_is_registered_with_fast_flags():
    assert set(MODEL_METHODS) <= set(PURIFIERS) and set(FAST) == set(MODEL_METHODS)


@pytest.mark.parametrize("method", MODEL_METHODS)
def test_model_purifiers_end_to_end_keep_names_sizes_alpha(method, mixed_dir, tmp_path, cli, device):
    out = tmp_path / "out"
    code, stdout, stderr = cli(["purify", mixed_dir, "-o", out, "-m", method, "--batch-size", "2", "--device", device,
                                *FAST[method]])
    assert code == 0, stderr
    assert stdout.strip() == str(out)
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["astro.png", "cat.png",
                                                                                   "cloak.json"]
    with Image.open(out / "astro.png") as image, Image.open(mixed_dir / "astro.png") as source:
        assert image.mode == "RGBA" and image.size == (64, 64)
        assert np.array_equal(np.asarray(image)[..., 3], np.asarray(source)[..., 3])
    with Image.open(out / "cat.png") as image:
        assert image.size == (72, 56)
    manifest = json.loads((out / "cloak.json").read_text())
    for record in manifest["files"].values():
        assert record["status"] == "done" and {"psnr", "ssim"} <= set(record["stats"])
        assert record["seconds"] >= 0


def test_seeded_runs_repeat_exactly_with_batches(photo_dir, tmp_path, cli, device):
    outputs = []
    for name, batch in (("a", "2"), ("b", "2"), ("c", "1")):
        out = tmp_path / name
        code, _, stderr = cli(["purify", photo_dir, "-o", out, "-m", "regen", "--model", "tiny", "--seed", "3",
                               "--batch-size", batch, "--device", device, "--dtype", "fp32"])
        assert code == 0, stderr
        outputs.append({p.name: np.asarray(Image.open(p)) for p in sorted(out.glob("*.png"))})
    assert outputs[0].keys() == outputs[1].keys() == outputs[2].keys() and len(outputs[0]) == 4
    for key in outputs[0]:
        assert np.array_equal(outputs[0][key], outputs[1][key])  # same seed → same bytes
        diff = np.abs(outputs[0][key].astype(int) - outputs[2][key].astype(int)).max()
        assert diff <= 1  # batching only reorders float sums; each image has its own generator


def test_networks_load_once_per_run_and_not_at_all_on_a_rerun(photo_dir, tmp_path, cli, monkeypatch):
    import cloaklab.ops.purify.ddspure as ddspure
    import cloaklab.ops.purify.diffpure_pixel as diffpure_pixel

    loads = []

    def counting(**kwargs):
        loads.append(kwargs["pixel_model"])
        return diffpure_pixel.load_models(**kwargs)

    out = tmp_path / "out"
    args = ["purify", photo_dir, "-o", out, "-m", "ddspure", "--pixel-model", "tiny", "--steps", "10"]
    with monkeypatch.context() as patch:
        patch.setattr(ddspure, "load_models", counting)
        assert cli([*args, "--batch-size", "1"])[0] == 0
    assert loads == ["tiny"] and len(list(out.glob("*.png"))) == 4  # four images, one load

    def refuse(**_):
        raise AssertionError("networks loaded although every output was done")

    monkeypatch.setattr(diffpure_pixel, "load_models", refuse)
    monkeypatch.setattr("cloaklab.ops.purify.ddspure.load_models", refuse)
    code, _, stderr = cli(args)
    assert code == 0, stderr


def test_networks_load_from_local_diffusers_folders(pixel_model, upscaler, tmp_path):
    from diffusers import DDPMPipeline

    from cloaklab.ops.purify.models import load_pixel_model, load_upscaler

    DDPMPipeline(unet=pixel_model.unet, scheduler=pixel_model.scheduler).save_pretrained(tmp_path / "pixel")
    loaded = load_pixel_model(str(tmp_path / "pixel"))
    x, t = torch.randn(1, 3, 32, 32), torch.tensor([10])
    with torch.no_grad():
        assert torch.allclose(loaded.predict(x, t), pixel_model.predict(x, t), atol=1e-6)
    assert loaded.resolution == 32
    assert torch.equal(loaded.scheduler.alphas_cumprod, pixel_model.scheduler.alphas_cumprod)
    upscaler.save_pretrained(tmp_path / "upscaler")
    reloaded = load_upscaler(str(tmp_path / "upscaler"))
    assert reloaded.vae.config.scaling_factor == 0.08333 and reloaded.unet.config.in_channels == 7
    assert all(torch.equal(a, b) for a, b in zip(reloaded.unet.parameters(), upscaler.unet.parameters()))


@pytest.mark.parametrize("args,needle", [
    (["-m", "diffpure-pixel", "--pixel-model", "{tmp}/no-such-model"], "pixel diffusion model"),
    (["-m", "noisy-upscale", "--upscaler-model", "nobody/no-such-upscaler"], "x4 upscaler"),
    (["-m", "pdm-pure", "--stage2-model", "nobody/no-such-if", "--upscaler-model", "tiny"], "IF stage II"),
    (["-m", "codeformer-sr", "--upscaler-model", "tiny", "--face-model", "{tmp}/missing.pt"], "face restorer"),
    (["-m", "regen", "--model", "{tmp}/no-such-sd"], "not found"),
    (["-m", "impress", "--model", "tiny", "--lpips-model", "vgg", "--iters", "1"], "LPIPS backbone"),
])
def test_missing_weights_fail_in_one_line(args, needle, photo_dir, tmp_path, cli, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # no cached torchvision weights there
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    code, stdout, stderr = cli(["purify", photo_dir, "-o", tmp_path / "out", *args])
    assert code == 1 and stdout == ""
    lines = [line for line in stderr.splitlines() if line.startswith("cloak: error")]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in stderr


def test_flags_of_other_methods_are_refused(photo_dir, tmp_path, cli):
    code, _, stderr = cli(["purify", photo_dir, "-o", tmp_path / "out", "-m", "regen", "--window", "64"])
    assert code == 2 and "--window does not apply to --method regen" in stderr
