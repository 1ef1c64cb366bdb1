"""The shared diffusion math against diffusers' own schedulers, and the timestep samplers of paper 000 App. H."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from cloaklab.ops import diffusion


def _sd_scheduler(cls, **extra):
    return cls(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", **extra)


def test_add_noise_matches_diffusers():
    from diffusers import DDPMScheduler

    scheduler = _sd_scheduler(DDPMScheduler)
    generator = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(5, 4, 8, 8, generator=generator), torch.randn(5, 4, 8, 8, generator=generator)
    timesteps = torch.tensor([0, 1, 250, 700, 999])
    ours = diffusion.add_noise(scheduler, latents, noise, timesteps)
    torch.testing.assert_close(ours, scheduler.add_noise(latents, noise, timesteps), rtol=1e-5, atol=1e-5)


def test_v_prediction_target_matches_get_velocity():
    from diffusers import DDPMScheduler

    scheduler = _sd_scheduler(DDPMScheduler, prediction_type="v_prediction")
    latents, noise = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    timesteps = torch.tensor([3, 300, 600, 998])
    target = diffusion.training_target(scheduler, latents, noise, timesteps)
    torch.testing.assert_close(target, scheduler.get_velocity(latents, noise, timesteps), rtol=1e-5, atol=1e-5)
    assert diffusion.prediction_type(scheduler) == "v_prediction"


def test_epsilon_and_flow_targets():
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    timesteps = torch.tensor([100, 900])
    eps = _sd_scheduler(DDIMScheduler)
    assert torch.equal(diffusion.training_target(eps, latents, noise, timesteps), noise)
    flow = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
    assert diffusion.prediction_type(flow) == "flow"
    noisy = diffusion.add_noise(flow, latents, noise, timesteps)
    sigma = (timesteps / 1000.0).view(-1, 1, 1, 1)
    torch.testing.assert_close(noisy, (1 - sigma) * latents + sigma * noise)
    torch.testing.assert_close(diffusion.training_target(flow, latents, noise, timesteps), noise - latents)


def test_shared_math_moves_inputs_to_the_models_device(tiny_pipe):
    """encode_images / denoise_prediction / masked_mse take inputs from anywhere: here the models sit on the meta
    device (a stand-in for a GPU on this CPU machine) and the images, latents, masks and timesteps on the CPU."""
    import copy

    vae, unet = copy.deepcopy(tiny_pipe.vae).to("meta"), copy.deepcopy(tiny_pipe.unet).to("meta")
    assert diffusion.encode_images(vae, torch.rand(1, 3, 64, 64)).device.type == "meta"
    z = torch.randn(1, 4, 8, 8)
    text = torch.randn(1, 77, unet.config.cross_attention_dim)
    prediction, target = diffusion.denoise_prediction(unet, tiny_pipe.scheduler, z, text, torch.tensor([10]),
                                                      torch.randn_like(z), input_mask=torch.ones(1, 1, 8, 8))
    assert prediction.device.type == target.device.type == "meta"
    assert diffusion.masked_mse(prediction, target, torch.ones(1, 1, 8, 8)).device.type == "meta"


def test_masked_mse_weights_by_the_mask_and_is_per_sample():
    prediction, target = torch.zeros(2, 4, 4, 4), torch.ones(2, 4, 4, 4)
    mask = torch.zeros(2, 1, 4, 4)
    mask[0, :, :2] = 1
    loss = diffusion.masked_mse(prediction, target, mask)
    assert loss.shape == (2,)
    assert loss[0].item() == pytest.approx(0.5) and loss[1].item() == 0
    assert diffusion.masked_mse(prediction, target).tolist() == [1.0, 1.0]


def test_latent_mask_is_area_weighted():
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., :32, :] = 1
    mask[..., 32:40, :8] = 1
    small = diffusion.latent_mask(mask, (8, 8))
    assert small.shape == (1, 1, 8, 8)
    assert torch.all(small[..., :4, :] == 1) and small[0, 0, 4, 0] == 1 and small[0, 0, 5, 0] == 0



def test_latent_mask_averages_the_pixels_of_each_cell():
    """By hand: a 16² mask with a 4×4 block on in the top-left 8×8 cell → that latent cell is 16/64 = 0.25 (area),
    a block covering half of the bottom-right cell → 0.5; nearest or max pooling would give 0/1."""
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 2:6, 2:6] = 1
    mask[..., 8:16, 12:16] = 1
    expected = torch.tensor([[0.25, 0.0], [0.0, 0.5]])
    assert torch.allclose(diffusion.latent_mask(mask, (2, 2))[0, 0], expected)


def test_encode_images_feeds_the_vae_minus_one_to_one_and_scales_the_mean():
    """A stand-in VAE whose posterior mean is its input: encode(x) = s · (2x − 1 − shift), typed out."""
    from types import SimpleNamespace

    class Posterior:
        def __init__(self, x):
            self.mean = x

        def sample(self, generator=None):
            return self.mean

    vae = SimpleNamespace(config=SimpleNamespace(scaling_factor=0.5, shift_factor=0.25),
                          encode=lambda x: SimpleNamespace(latent_dist=Posterior(x)))
    x = torch.linspace(0, 1, 2 * 3 * 4 * 4).reshape(2, 3, 4, 4)
    out = diffusion.encode_images(vae, x, device=torch.device("cpu"), dtype=torch.float32)
    assert torch.allclose(out, 0.5 * (2 * x - 1 - 0.25))

@pytest.mark.parametrize("sampler,rho,low,high", [
    ("uniform", None, 0.0, 1.0), ("threshold-high", 0.6, 0.6, 1.0), ("threshold-low", 0.4, 0.0, 0.4),
    ("power", 2.0, 0.0, 1.0), ("power", 0.5, 0.0, 1.0), ("tanh", 3.0, 0.0, 1.0), ("tanh", 10.0, 0.0, 1.0),
])
def test_samplers_follow_their_density(sampler, rho, low, high):
    draws = diffusion.sample_unit_times(20000, sampler, rho, torch.Generator().manual_seed(1)).numpy()
    assert draws.min() >= low and draws.max() < high
    grid = torch.linspace(0, 1, 4001, dtype=torch.float64)
    density = diffusion.timestep_density(sampler, rho, grid)
    cdf = np.concatenate([[0.0], np.cumsum(((density[1:] + density[:-1]) / 2 * (grid[1] - grid[0])).numpy())])
    assert cdf[-1] == pytest.approx(1.0, abs=1e-3)
    result = stats.kstest(draws, lambda x: np.interp(x, grid.numpy(), cdf))
    assert result.pvalue > 0.001, result
    # a wrong sampler must fail the same test (the test has power): compare against the uniform CDF
    if sampler not in ("uniform",):
        assert stats.kstest(draws, "uniform").pvalue < 1e-6


def _closed_form_cdf(sampler, rho):
    """Paper 000 App. H's distributions, integrated by hand (independent of ``timestep_density``)."""
    if sampler == "uniform":
        return lambda t: np.clip(t, 0, 1)
    if sampler == "threshold-high":  # U(ρ, 1)
        return lambda t: np.clip((t - rho) / (1 - rho), 0, 1)
    if sampler == "threshold-low":  # U(0, ρ)
        return lambda t: np.clip(t / rho, 0, 1)
    if sampler == "power":  # p ∝ t^ρ → F = t^(ρ+1)
        return lambda t: np.clip(t, 0, 1) ** (rho + 1)
    # tanh: p ∝ tanh(ρ(t − ½))/2 + ½; ∫ = t/2 + ln cosh(ρ(t − ½))/(2ρ) + c, total mass ½ on [0, 1] → F below
    def cdf(t):
        t = np.clip(t, 0, 1)
        return t + (np.log(np.cosh(rho * (t - 0.5))) - np.log(np.cosh(rho / 2))) / rho
    return cdf


@pytest.mark.parametrize("sampler,rho", [("uniform", None), ("threshold-high", 0.6), ("threshold-low", 0.4),
                                         ("power", 2.0), ("power", 0.5), ("tanh", 3.0), ("tanh", 10.0)])
def test_samplers_match_the_closed_form_cdfs_of_app_h(sampler, rho):
    draws = diffusion.sample_unit_times(20000, sampler, rho, torch.Generator().manual_seed(5)).numpy()
    assert stats.kstest(draws, _closed_form_cdf(sampler, rho)).pvalue > 0.001
    if sampler == "power":  # E[t] = (ρ+1)/(ρ+2), a reversed exponent (t^{1/ρ}) or ρ instead of ρ+1 misses it
        assert draws.mean() == pytest.approx((rho + 1) / (rho + 2), abs=0.01)
    if sampler == "tanh":  # increasing ρ favours high t: the mean is above ½
        assert draws.mean() > 0.5 + 0.02
    steps = diffusion.sample_timesteps(20000, sampler, rho, generator=torch.Generator().manual_seed(6)).numpy()
    # integer steps are floor(1000 t): P(step <= k) = F((k + 1)/1000)
    assert stats.kstest((steps + 1) / 1000, _closed_form_cdf(sampler, rho)).statistic < 0.0125


def test_sample_timesteps_scales_to_the_schedule_and_respects_t_range():
    t = diffusion.sample_timesteps(5000, "threshold-high", 0.6, generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and t.min() >= 600 and t.max() <= 999
    t = diffusion.sample_timesteps(5000, t_range=(100, 200), generator=torch.Generator().manual_seed(0))
    assert t.min() >= 100 and t.max() < 200 and len(t.unique()) == 100
    with pytest.raises(ValueError, match="rho"):
        diffusion.sample_timesteps(4, "power")
    with pytest.raises(ValueError, match="0 < rho < 1"):
        diffusion.sample_timesteps(4, "threshold-high", 600)


def test_encode_decode_roundtrip_shapes(tiny_pipe):
    images = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        latents = diffusion.encode_images(tiny_pipe.vae, images)
        decoded = diffusion.decode_latents(tiny_pipe.vae, latents)
    assert latents.shape == (2, 4, 8, 12) and decoded.shape == images.shape
    assert decoded.min() >= 0 and decoded.max() <= 1
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        diffusion.encode_images(tiny_pipe.vae, torch.rand(3, 64, 64))


@pytest.mark.parametrize("mode", ["none", "lm", "lim", "zm", "im"])
def test_mask_mode_losses_equal_app_i_typed_out(mode):
    """Paper 000 App. I on a stand-in identity denoiser (ε_θ(z) = z), SD's betas typed here, binary M_z:
    none/im ‖z_t − ε‖², LM/LIM (Eq. 12) ‖(z_t − ε) ⊙ M‖², ZM ‖z_t ⊙ M − ε‖² — each averaged over C·h·w
    (our normalization: a constant factor on the paper's sum). IM/LIM differ from none/LM only in which latents
    they are given (those of x ⊙ M_x, tested in test_train_loop)."""
    from types import SimpleNamespace

    from cloaklab.ops.models.shaped import sd15_scheduler
    from cloaklab.ops.train.loop import masked_step_loss

    class Identity(torch.nn.Module):
        dtype = torch.float32
        device = torch.device("cpu")

        def forward(self, z, t, encoder_hidden_states):
            return SimpleNamespace(sample=z)

    generator = torch.Generator().manual_seed(4)
    latents = torch.randn(2, 4, 6, 6, generator=generator, dtype=torch.float64)
    noise = torch.randn(2, 4, 6, 6, generator=generator, dtype=torch.float64)
    mask = torch.zeros(2, 1, 6, 6, dtype=torch.float64)
    mask[0, :, 1:4, 2:6] = 1
    mask[1, :, 3:, :] = 1
    t = 400
    beta = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alpha_bar = torch.cumprod(1 - beta, 0)[t]
    z_t = alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise
    expected = {"none": (z_t - noise) ** 2, "im": (z_t - noise) ** 2, "lm": ((z_t - noise) * mask) ** 2,
                "lim": ((z_t - noise) * mask) ** 2, "zm": (z_t * mask - noise) ** 2}[mode].sum((1, 2, 3)) / (4 * 36)
    loss, _, _ = masked_step_loss(Identity(), sd15_scheduler(), latents.float(), torch.zeros(2, 3, 8),
                                  torch.tensor([t, t]), noise.float(), mode, mask.float())
    torch.testing.assert_close(loss.double(), expected, atol=1e-6, rtol=1e-5)
