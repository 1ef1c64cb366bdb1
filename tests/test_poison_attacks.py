"""The PGD engine and the single-image attacks, on the calibrated tiny model and real 64-px photos."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from cloaklab.ops.attacks import adm, da, ea, engine, get_attack, lowfreq, mist, robust, sds
from cloaklab.ops.metrics.basic import psnr
from cloaklab.tests.conftest import photo, photo_tensor


@pytest.fixture(scope="module")
def photos(device):
    return torch.stack([photo_tensor("astronaut"), photo_tensor("chelsea")]).to(device)


@pytest.fixture(scope="module")
def small(device):
    """32-px photos for tests of mechanics (4×4 latents: fast)."""
    return torch.stack([photo_tensor("astronaut", 32), photo_tensor("coffee", 32)]).to(device)


@pytest.fixture
def models(tiny_pipe):
    return engine.AttackModels(tiny_pipe)


def gens(n: int, base: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(base + i) for i in range(n)]


def fixed_draw_loss(models, images, draws: int = 8) -> torch.Tensor:
    """Mean diffusion loss over the same fixed (t, ε) draws for any images (independent of the attack's)."""
    generators = gens(images.shape[0], 999)
    with torch.no_grad():
        return torch.stack([models.denoise_loss(images, generators) for _ in range(draws)]).mean()


def test_adm_plus_raises_the_loss_and_adm_minus_ends_below(models, photos):
    clean = fixed_draw_loss(models, photos)
    up = adm.attack(photos, models=models, generators=gens(2), steps=8, step_size=2)
    down = adm.attack(photos, models=models, generators=gens(2), steps=8, step_size=2, ascent=False)
    loss_up, loss_down = fixed_draw_loss(models, up.images), fixed_draw_loss(models, down.images)
    assert loss_up > clean
    assert loss_down < loss_up
    assert (up.images - photos).abs().max() <= 16 / 255 + 1e-6
    assert bool((up.loss_end > up.loss_start).all())  # the engine's own fixed-draw record agrees


def test_sds_never_runs_a_backward_pass_through_the_unet(models, small):
    seen = {"unet_grad": [], "unet_backward": 0, "encoder_backward": 0}
    unet = models.unet
    hooks = [unet.conv_in.register_forward_hook(lambda m, i, o: seen["unet_grad"].append(
                 torch.is_grad_enabled() or o.requires_grad)),
             unet.conv_out.register_forward_hook(lambda m, i, o: seen["unet_grad"].append(o.requires_grad)),
             unet.conv_in.register_full_backward_hook(lambda *a: seen.__setitem__("unet_backward", 1)),
             unet.conv_out.register_full_backward_hook(lambda *a: seen.__setitem__("unet_backward", 1)),
             models.vae.encoder.conv_in.register_full_backward_hook(
                 lambda *a: seen.__setitem__("encoder_backward", seen["encoder_backward"] + 1))]
    try:
        result = sds.attack(small, models=models, generators=gens(2), steps=3, eval_draws=1)
        adm.attack(small, models=models, generators=gens(2), steps=1, eval_draws=1)  # the control: AdvDM does
    finally:
        for hook in hooks:
            hook.remove()
    assert seen["unet_grad"] and not any(seen["unet_grad"][: 2 * (3 + 2)])  # sds: 3 steps + 2 evaluations
    assert seen["unet_backward"] == 1  # only from the AdvDM control step
    assert seen["encoder_backward"] == 3 + 1
    assert (result.images - small).abs().max() > 0  # the encoder gradient did move the pixels


def test_ea_pulls_the_encoding_to_the_target(models, photos):
    target = ea.make_target("pattern", 64, 64)[None].expand(2, -1, -1, -1).to(photos.device)
    result = ea.attack(photos, models=models, generators=gens(2), targets=target, steps=8, step_size=2)
    assert bool((result.loss_end < 0.5 * result.loss_start).all())
    with torch.no_grad():
        z_target = models.encode(target)
        assert bool((ea.encoder_distance(models, result.images, z_target)
                     < ea.encoder_distance(models, photos, z_target)).all())


def test_contrast_pattern_is_high_contrast_and_periodic():
    pattern = ea.contrast_pattern(64, 96)
    assert pattern.shape == (3, 64, 96) and set(pattern.unique().tolist()) == {0.0, 1.0}
    assert 0.3 < float(pattern.mean()) < 0.7
    assert not torch.equal(pattern[0], pattern[1])  # channels differ: saturated colours
    assert ea.make_target("gray", 8, 8).unique().tolist() == [0.5]


def test_mist_descends_its_fused_objective(models, small):
    target = ea.make_target("pattern", 32, 32)[None].expand(2, -1, -1, -1)
    result = mist.attack(small, models=models, generators=gens(2), targets=target, steps=4, step_size=2,
                         fused_weight=1.0,
                         eval_draws=2)
    assert bool((result.loss_end < result.loss_start).all())


def test_da_keeps_both_budgets_and_moves_the_output(models, small):
    target = ea.make_target("gray", 32, 32)[None]
    result = da.attack(small[:1], models=models, generators=gens(1), targets=target, steps=2, grad_samples=1,
                       l2_eps=2.0, eps=8)
    delta = result.images - small[:1]
    assert delta.abs().max() <= 8 / 255 + 1e-6
    assert delta.flatten().norm() <= 1.0 + 1e-4  # l2_eps 2 in [-1,1] units = 1 on [0,1]
    assert delta.abs().max() > 0


def test_batching_and_seeds_do_not_change_an_image(models, small):
    batch = adm.attack(small, models=models, generators=gens(2), steps=3, eval_draws=1)
    again = adm.attack(small, models=models, generators=gens(2), steps=3, eval_draws=1)
    alone = adm.attack(small[1:], models=models, generators=gens(1, 1), steps=3, eval_draws=1)
    assert torch.equal(batch.images, again.images)
    assert (alone.images[0] - batch.images[1]).abs().max() < 1e-5 or \
        ((alone.images[0] - batch.images[1]).abs() > 1e-5).float().mean() < 0.01
    other = adm.attack(small, models=models, generators=gens(2, 50), steps=3, eval_draws=1)
    assert not torch.equal(other.images, batch.images)


def test_mask_zeroes_the_perturbation_outside(models, small):
    mask = torch.zeros(2, 1, 32, 32, device=small.device)
    mask[..., 8:24, 4:20] = 1
    result = adm.attack(small, models=models, generators=gens(2), steps=3, random_start=True, mask=mask,
                         eval_draws=1)
    delta = (result.images - small).abs()
    assert torch.equal(delta * (1 - mask), torch.zeros_like(delta))
    assert delta[..., 8:24, 4:20].mean() > 0


def test_project_linf_and_random_start_stay_in_the_ball():
    clean = torch.rand(3, 3, 16, 16)
    start = engine.random_start(clean, 8, gens(3))
    assert (start - clean).abs().max() <= 8 / 255 + 1e-7 and start.min() >= 0 and start.max() <= 1
    far = engine.project_linf(clean + 1.0, clean, 4)
    assert torch.allclose((far - clean).clamp(min=0).max(), torch.tensor(min(4 / 255, float((1 - clean).max()))))



def test_random_start_is_a_symmetric_uniform_draw_from_each_images_generator():
    # expected: clean + (U[0,1) · 2 − 1) · ε/255 from a fresh generator with the same seed (torchattacks' rand_init)
    clean = torch.full((2, 3, 8, 8), 0.5)
    start = engine.random_start(clean, 8, gens(2, 40))
    for i in range(2):
        expected = 0.5 + (torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(40 + i)) * 2 - 1) * 8 / 255
        assert torch.allclose(start[i], expected, atol=1e-7)
    assert (start < 0.5).any() and (start > 0.5).any()


def test_eot_gradient_and_loss_are_averages_over_the_draws():
    # EoT transform x ↦ x + c_k (c_k = 0, 1, 2 on the k-th draw), loss Σ (x + c_k)²: by hand the mean gradient is
    # 2 (x + 1) and the mean loss Σ over pixels of mean_k (x + c_k)²
    x = torch.linspace(0, 1, 2 * 3 * 2 * 2).reshape(2, 3, 2, 2)
    calls = []

    def eot(images, generators):
        calls.append(len(calls))
        return images + float(calls[-1])

    def loss_fn(images, generators):
        return images.pow(2).flatten(1).sum(1)

    grad, loss = engine.loss_gradient(x, loss_fn, gens(2), eot=eot, eot_samples=3)
    assert torch.allclose(grad, 2 * (x + 1), atol=1e-6)
    expected = torch.stack([(x + c).pow(2).flatten(1).sum(1) for c in (0.0, 1.0, 2.0)]).mean(0)
    assert torch.allclose(loss, expected, atol=1e-5)


def test_library_defaults_equal_the_registrys():
    """An attack called from Python runs the registry's (published, tested) defaults: every keyword default of a
    module's ``attack``/``attack_set`` (and of da's differentiable sampler) equals the registry's value."""
    import importlib
    import inspect

    from cloaklab.ops.attacks import ATTACKS

    checked = 0
    for name, spec in ATTACKS.items():
        module = importlib.import_module(f"cloaklab.ops.attacks.{spec.module}")
        functions = [module.attack_set if spec.set_level else module.attack] + ([module.sample] if name == "da" else [])
        for function in functions:
            parameters = inspect.signature(function).parameters
            for key, value in spec.defaults.items():
                if key in parameters and parameters[key].default is not inspect.Parameter.empty:
                    assert parameters[key].default == value, (name, function.__name__, key)
                    checked += 1
    assert checked >= 90

def test_dct_is_orthonormal_and_lowpass_keeps_the_block():
    x = torch.randn(2, 3, 24, 40, dtype=torch.float64)
    assert torch.allclose(lowfreq.idct2(lowfreq.dct2(x)), x, atol=1e-10)
    assert torch.allclose(lowfreq.dct2(x).pow(2).sum(), x.pow(2).sum())  # Parseval
    low = lowfreq.lowpass(x, 0.25)
    assert torch.allclose(lowfreq.lowpass(low, 0.25), low, atol=1e-10)
    coefficients = lowfreq.dct2(low)
    assert coefficients[..., 6:, :].abs().max() < 1e-10 and coefficients[..., :, 10:].abs().max() < 1e-10
    assert float(lowfreq.highfreq_energy(low, 0.25).max()) < 1e-12


def test_lowfreq_block_rounds_eta_times_the_side_up():
    """m_η keeps the top-left ⌈ηH⌉ × ⌈ηW⌉ coefficients (paper 004 §3: ηd × ηd; our sizes need not make ηd whole):
    η 0.25 on 10 × 13 keeps 3 × 4, typed here."""
    expected = torch.zeros(10, 13)
    expected[:3, :4] = 1
    assert torch.equal(lowfreq.lowfreq_mask(10, 13, 0.25), expected)


def test_lf_attack_perturbation_lives_in_the_low_frequency_block(models, small):
    spec = get_attack("lf-adm+")
    assert spec.base == "adm+" and spec.defaults["lf_ratio"] == 0.25
    # Eq. 8 alone (the default) masks the gradient before the sign: δ is mostly, not purely, low-frequency
    eq8 = spec.load().attack(small, models=models, generators=gens(2), steps=4, step_size=2, eval_draws=1,
                             random_start=False, **spec.fixed, lf_ratio=0.25)
    # lf_project (our option) also projects δ: it stays in the block up to the ε clip
    result = spec.load().attack(small, models=models, generators=gens(2), steps=4, step_size=2, eval_draws=1,
                                random_start=False, **spec.fixed, lf_ratio=0.25, lf_project=True)
    delta = (result.images - small).double()
    assert delta.abs().max() > 1 / 255
    assert float(lowfreq.highfreq_energy(delta, 0.25).max()) < 0.02
    plain = adm.attack(small, models=models, generators=gens(2), steps=4, step_size=2, eval_draws=1,
                       random_start=False)
    plain_energy = lowfreq.highfreq_energy((plain.images - small).double(), 0.25)
    assert float(plain_energy.min()) > 0.5
    assert bool((lowfreq.highfreq_energy((eq8.images - small).double(), 0.25) < plain_energy).all())


@pytest.mark.parametrize("name,quality", [("astronaut", 75), ("coffee", 50), ("chelsea", 90)])
def test_differentiable_jpeg_stays_close_to_pillow(name, quality):
    image = photo(name, 96)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    reference = torch.from_numpy(np.asarray(Image.open(buffer).convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None].requires_grad_(True)
    approx = robust.diff_jpeg(x, quality)
    assert psnr(approx[0].detach(), reference) > 38  # measured 41-46 dB on these photos
    assert psnr(approx[0].detach(), reference) > psnr(x[0].detach(), reference) + 5  # it models JPEG, not identity
    approx.sum().backward()
    assert x.grad.abs().mean() > 0.05  # gradients pass the rounding


def test_eot_draws_are_per_image_and_parse_robust_validates():
    eot = robust.make_eot(["jpeg", "resize", "blur"])
    x = torch.rand(2, 3, 32, 32)
    a, b = eot(x, gens(2)), eot(x, gens(2))
    assert torch.equal(a, b) and a.shape == x.shape
    single = eot(x[1:], gens(1, 1))
    assert torch.allclose(single[0], a[1], atol=1e-6)
    assert robust.parse_robust("jpeg, resize,jpeg") == ["jpeg", "resize"] and robust.parse_robust("none") == []
    with pytest.raises(Exception, match="unknown transform"):
        robust.parse_robust("jpeg,sharpen")


def test_robust_adm_runs_through_the_jpeg_approximation(models, small):
    calls = []
    eot = robust.make_eot(["jpeg"])

    def counting(x, g):
        calls.append(1)
        return eot(x, g)

    result = adm.attack(small, models=models, generators=gens(2), steps=2, eot=counting, eot_samples=2,
                        eval_draws=1)
    assert len(calls) == 4 and (result.images - small).abs().max() > 0



def test_sdxl_conditioning_reaches_the_unet(tiny_pipe):
    """An SDXL-style UNet (text_time added conditioning) runs under the engine with pooled embeds and size ids."""
    from types import SimpleNamespace

    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(sample_size=4, layers_per_block=1, block_out_channels=(32, 64),
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=4, addition_embed_type="text_time", addition_time_embed_dim=8,
                                projection_class_embeddings_input_dim=16 + 6 * 8, norm_num_groups=8)
    pipe = SimpleNamespace(vae=tiny_pipe.vae, unet=unet.to(tiny_pipe.device), scheduler=tiny_pipe.scheduler,
                           text_encoder=None, text_encoder_2=torch.nn.Linear(1, 1))
    models = engine.AttackModels(pipe)
    assert models.is_sdxl
    device = tiny_pipe.device
    models._embeddings[models.prompt] = (torch.randn(1, 77, 32, device=device),
                                         {"text_embeds": torch.randn(1, 16, device=device)})
    kwargs = models.unet_kwargs(2, (32, 32))["added_cond_kwargs"]
    assert kwargs["time_ids"].tolist() == [[32, 32, 0, 0, 32, 32]] * 2 and kwargs["text_embeds"].shape == (2, 16)
    x = torch.rand(2, 3, 32, 32, device=tiny_pipe.device)
    result = adm.attack(x, models=models, generators=gens(2), steps=2, eval_draws=1)
    assert (result.images - x).abs().max() > 0
