"""The shared training core (ops.train.loop / ops.train.data): masks where paper 000 App. I puts them, timestep
samplers that follow their densities (App. H), JPEG equal to Pillow's, seeded runs and bit-exact resume."""

from __future__ import annotations

import io
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from cloaklab.ops import diffusion
from cloaklab.ops.errors import UsageError
from cloaklab.ops.train.data import OBJECT_TEMPLATES, InstanceData, fill_templates, jpeg_compress, load_templates
from cloaklab.ops.train.loop import TrainConfig, masked_step_loss, train
from cloaklab.ops.train.textual_inversion import TextualInversion
from cloaklab.tests.conftest import photo_tensor


def _data(masked_background: float | None = None) -> InstanceData:
    images = torch.stack([photo_tensor("astronaut", 64), photo_tensor("coffee", 64)])
    masks = torch.zeros(2, 1, 64, 64)
    masks[:, :, 16:48, 24:56] = 1
    if masked_background is not None:  # change only pixels outside the mask
        images = images * masks + masked_background * (1 - masks)
    return InstanceData(images, masks, ["astronaut.png", "coffee.png"])


def _ti(pipe) -> TextualInversion:
    return TextualInversion(pipe, "<R*>", "object")


class PointwiseDenoiser(torch.nn.Module):
    """A denoiser whose output at a latent pixel depends only on that pixel (and the text): with it, loss masking
    must make the embedding gradient blind to everything outside the mask."""

    def __init__(self, text_dim: int = 32):
        super().__init__()
        torch.manual_seed(0)
        self.mix = torch.nn.Conv2d(4, 4, 1)
        self.gain = torch.nn.Linear(text_dim, 4)

    @property
    def dtype(self):
        return torch.float32

    def forward(self, latents, timesteps, encoder_hidden_states):
        gain = self.gain(encoder_hidden_states.mean(1))[..., None, None]
        return SimpleNamespace(sample=self.mix(latents) * gain)


def _embedding_grad(pipe, ti, unet, latents, noise, mode, latent_masks):
    ti.parameters()[0].grad = None
    text, kwargs = ti.condition(["a photo of a <R*>"])
    loss, _, _ = masked_step_loss(unet, pipe.scheduler, latents, text, torch.tensor([700]), noise, mode,
                                  latent_masks, **kwargs)
    loss.sum().backward()
    return ti.parameters()[0].grad.clone()


def test_loss_mask_makes_gradient_blind_outside_the_mask(fresh_tiny_pipe):
    ti = _ti(fresh_tiny_pipe)
    unet = PointwiseDenoiser()
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    noise = torch.randn(1, 4, 8, 8, generator=generator)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:6, 3:7] = 1
    other = latents + 3 * torch.randn(1, 4, 8, 8, generator=generator) * (1 - mask)  # differs only outside
    other_noise = noise + torch.randn(1, 4, 8, 8, generator=generator) * (1 - mask)
    lm_a = _embedding_grad(fresh_tiny_pipe, ti, unet, latents, noise, "lm", mask)
    lm_b = _embedding_grad(fresh_tiny_pipe, ti, unet, other, other_noise, "lm", mask)
    assert lm_a.abs().sum() > 0
    torch.testing.assert_close(lm_a, lm_b, rtol=1e-5, atol=1e-9)
    plain_a = _embedding_grad(fresh_tiny_pipe, ti, unet, latents, noise, "none", None)
    plain_b = _embedding_grad(fresh_tiny_pipe, ti, unet, other, other_noise, "none", None)
    assert not torch.allclose(plain_a, plain_b, rtol=1e-3)  # control: without LM the outside matters


def test_loss_mask_zeroes_the_prediction_gradient_outside(tiny_pipe):
    """Real tiny UNet: LM/LIM weight the error by M_z, so d loss / d prediction vanishes where M_z = 0."""
    generator = torch.Generator().manual_seed(1)
    prediction = torch.randn(1, 4, 8, 8, generator=generator, requires_grad=True)
    target = torch.randn(1, 4, 8, 8, generator=generator)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4, :] = 1
    diffusion.masked_mse(prediction, target, mask).sum().backward()
    assert prediction.grad[..., 4:, :].abs().max() == 0
    assert prediction.grad[..., :4, :].abs().min() > 0


def test_zm_masks_the_denoiser_input(tiny_pipe):
    """ZM (App. I): ε_θ(z_t ⊙ M_z) — latents that differ only where M_z = 0 give the same prediction."""
    generator = torch.Generator().manual_seed(2)
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    noise = torch.randn(1, 4, 8, 8, generator=generator)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 1:7, 2:6] = 1
    other = latents + torch.randn(1, 4, 8, 8, generator=generator) * (1 - mask)
    text = diffusion.encode_prompts(tiny_pipe, ["a photo"])
    with torch.no_grad():
        runs = [masked_step_loss(tiny_pipe.unet, tiny_pipe.scheduler, z, text, torch.tensor([400]), noise, mode,
                                 mask)[1] for mode in ("zm", "none") for z in (latents, other)]
    torch.testing.assert_close(runs[0], runs[1])
    assert not torch.allclose(runs[2], runs[3])


@pytest.mark.parametrize("mode,same", [("im", True), ("lim", True), ("lm", False)])
def test_input_masking_hides_the_background_from_training(mode, same):
    """IM/LIM encode x ⊙ M_x: a run on images that differ only outside the mask learns the same embedding; LM keeps
    the background in the forward pass, so there it changes the result."""
    from cloaklab.ops.models import load_pipeline

    learned = []
    for background in (0.0, 1.0):
        pipe = load_pipeline("tiny")
        ti = _ti(pipe)
        config = TrainConfig(steps=2, mask_mode=mode, checkpoint_every=0, snapshot_every=0, seed=3)
        train(pipe, ti, _data(background), fill_templates(OBJECT_TEMPLATES, "<R*>"), config, _tmp_dir())
        learned.append(ti.parameters()[0].detach().clone())
    assert torch.equal(learned[0], learned[1]) is same


def _tmp_dir():
    import tempfile
    from pathlib import Path

    return Path(tempfile.mkdtemp(prefix="cloak-loop-"))


# ------------------------------------------------------------------------------------------ timestep sampling
SAMPLERS = [("uniform", None), ("threshold-high", 0.6), ("threshold-high", 0.5), ("threshold-low", 0.3),
            ("power", 2.0), ("power", 0.5), ("tanh", 8.0), ("tanh", 3.0)]


@pytest.mark.parametrize("sampler,rho", SAMPLERS)
def test_timestep_sampler_follows_its_density(sampler, rho):
    from scipy import stats

    steps = diffusion.sample_timesteps(20000, sampler, rho, num_timesteps=1000,
                                       generator=torch.Generator().manual_seed(0))
    assert steps.dtype == torch.long and steps.min() >= 0 and steps.max() <= 999
    if sampler == "threshold-high":
        assert steps.min() >= round(rho * 1000)
    if sampler == "threshold-low":
        assert steps.max() < round(rho * 1000)
    grid = torch.linspace(0, 1, 100001, dtype=torch.float64)
    density = diffusion.timestep_density(sampler, rho, grid)
    cdf = torch.cat([torch.zeros(1, dtype=torch.float64),
                     torch.cumsum((density[1:] + density[:-1]) / 2 * (grid[1] - grid[0]), 0)]).numpy()
    cdf /= cdf[-1]
    # integer steps are floor(1000 t): compare at the bin's upper edge so the discrete CDF matches
    result = stats.kstest((steps.numpy() + 1) / 1000, lambda x: np.interp(x, grid.numpy(), cdf))
    assert result.statistic < 0.0125, result  # ~ discretization (1e-3) + 1.3 / sqrt(n) at n = 20000


def test_training_uses_the_configured_sampler(tmp_path, fresh_tiny_pipe):
    config = TrainConfig(steps=6, t_sampler="threshold-high", t_param=0.5, checkpoint_every=0, snapshot_every=0)
    result = train(fresh_tiny_pipe, _ti(fresh_tiny_pipe), _data(), ["a photo of <R*>"], config, tmp_path)
    steps = [t for record in result.log for t in record["t"]]
    assert len(steps) == 6 and min(steps) >= 500


# ------------------------------------------------------------------------------------------------------ JPEG
def test_templates_from_a_named_set_or_a_file(tmp_path):
    assert load_templates("object") == OBJECT_TEMPLATES
    good = tmp_path / "t.txt"
    good.write_text("# a model's own caption words\na {}\n\na striped {token}\n")
    assert fill_templates(load_templates(str(good)), "<R*>") == ["a <R*>", "a striped <R*>"]
    bad = tmp_path / "bad.txt"
    bad.write_text("a {}\na photo\n")
    with pytest.raises(UsageError, match="'a photo' has no"):
        load_templates(str(bad))
    with pytest.raises(UsageError, match="--templates 'objects': not a template set"):
        load_templates("objects")


def test_jpeg_preprocessing_equals_pillow():
    rgb = photo_tensor("chelsea", 72)[:, :, :64]
    array = np.rint(rgb.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=25)
    expected = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"), dtype=np.float32) / 255
    ours = jpeg_compress(rgb, 25).permute(1, 2, 0).numpy()
    assert np.array_equal(ours, expected)
    assert not np.array_equal(ours, array / 255.0)  # q25 really changed the image


# --------------------------------------------------------------------------------------- resume, seeds, logs
def _run(out, steps, stop_after=None, resume=False, seed=0):
    from cloaklab.ops.models import load_pipeline

    pipe = load_pipeline("tiny")
    ti = _ti(pipe)
    config = TrainConfig(steps=steps, seed=seed, mask_mode="lm", t_sampler="threshold-high", t_param=0.5,
                         checkpoint_every=2, snapshot_every=0, log_grad_by_t=True)
    result = train(pipe, ti, _data(), fill_templates(OBJECT_TEMPLATES, "<R*>"), config, out, resume=resume,
                   stop_after=stop_after)
    return ti.parameters()[0].detach().clone(), result


def test_resume_is_bit_exact(tmp_path):
    full, full_result = _run(tmp_path / "full", 5)
    _run(tmp_path / "split", 5, stop_after=3)
    resumed, resumed_result = _run(tmp_path / "split", 5, resume=True)
    assert resumed_result.resumed_from == 3
    assert torch.equal(full, resumed)
    log_full = (tmp_path / "full" / "train_log.jsonl").read_text().splitlines()
    log_split = (tmp_path / "split" / "train_log.jsonl").read_text().splitlines()
    assert log_full == log_split and len(log_full) == 5
    first = json.loads(log_full[0])
    assert {"step", "t", "loss", "loss_inside", "loss_outside", "grad_norm"} <= set(first)
    grad = json.loads((tmp_path / "split" / "grad_by_t.json").read_text())
    assert sum(grad["count"]) == 5 and grad["count"][:5] == [0] * 5  # t >= 500 only
    other, _ = _run(tmp_path / "seed1", 5, seed=1)
    assert not torch.equal(full, other)


def test_instance_loading_jpegs_then_dilates_masks_at_512_scale(tmp_path):
    from pathlib import PurePosixPath

    from cloaklab.ops.io import InputItem
    from cloaklab.ops.train.data import load_instance_images
    from cloaklab.tests.conftest import photo

    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    path = tmp_path / "images" / "rocket.png"
    photo("rocket", 128).save(path)
    mask = np.zeros((128, 128), np.uint8)
    mask[40:80, 50:70] = 255
    Image.fromarray(mask).save(tmp_path / "masks" / "rocket.png")
    item = [InputItem(path, PurePosixPath("rocket.png"))]
    data = load_instance_images(item, 128, jpeg_quality=25, mask_dir=tmp_path / "masks", dilate=16)
    radius = 4  # 16 px at 512² → 4 px at 128²
    assert data.masks[0, 0].sum() == (40 + 2 * radius) * (20 + 2 * radius)
    assert torch.equal(data.images[0], jpeg_compress(torch.from_numpy(
        np.asarray(Image.open(path), dtype=np.float32) / 255).permute(2, 0, 1), 25))
    half = load_instance_images(item, 64, mask_dir=tmp_path / "masks")
    assert half.images.shape == (1, 3, 64, 64) and half.masks[0, 0].sum() == 20 * 10


@pytest.mark.parametrize("width,height", [(384, 256), (256, 384)])
def test_mask_dilation_is_the_same_at_training_resolution_on_non_square_images(tmp_path, width, height):
    """Hand-computed: 16 px at 512 = 4 px at a 128 training resolution, on 3:2 and 2:3 images alike.

    One on-pixel at native (x, y) = (W/2 + 1, H/2 + 1); the short side 256 → 128 halves the image, and Pillow's
    nearest resize samples source 2i + 1 for target i, so a native square of radius 8 around 2k + 1 covers targets
    k − 4 … k + 4; the centre crop then puts k at 64. Expected: exactly rows and columns 60..68 on (9 × 9).
    Scaling the radius by max(W, H) instead gives radius 12 native → a 13 × 13 square.
    """
    from pathlib import PurePosixPath

    from cloaklab.ops.io import InputItem
    from cloaklab.ops.train.data import load_instance_images

    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    Image.new("RGB", (width, height), (90, 120, 150)).save(tmp_path / "images" / "a.png")
    mask = np.zeros((height, width), np.uint8)
    mask[height // 2 + 1, width // 2 + 1] = 255
    Image.fromarray(mask).save(tmp_path / "masks" / "a.png")
    item = [InputItem(tmp_path / "images" / "a.png", PurePosixPath("a.png"))]
    data = load_instance_images(item, 128, mask_dir=tmp_path / "masks", dilate=16)
    expected = torch.zeros(128, 128)
    expected[60:69, 60:69] = 1
    assert torch.equal(data.masks[0, 0], expected)


def test_interrupt_checkpoints_the_last_step_and_resume_matches(tmp_path):
    from cloaklab.ops.models import load_pipeline

    def run(out, on_progress=None, resume=False):
        pipe = load_pipeline("tiny")
        ti = _ti(pipe)
        config = TrainConfig(steps=5, checkpoint_every=0, snapshot_every=0, seed=7)
        train(pipe, ti, _data(), fill_templates(OBJECT_TEMPLATES, "<R*>"), config, out, resume=resume,
              on_progress=on_progress)
        return ti.parameters()[0].detach().clone()

    def ctrl_c(step, total, record):
        if step == 3:
            raise KeyboardInterrupt

    full = run(tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", ctrl_c)
    assert (tmp_path / "cut" / "checkpoints" / "step-000003.pt").exists()
    assert torch.equal(run(tmp_path / "cut", resume=True), full)


def test_micro_batch_loss_is_the_batch_mean_and_a_rows_share_is_its_sum_over_the_batch(fresh_tiny_pipe):
    """One process: mean over the batch of ‖ε̂ − ε‖² (mean over C, H, W) + the extra loss; a data-parallel
    process's rows: Σ over its rows ÷ the batch + the rows' extra share; the backward divides by the accumulation
    steps. Expected values by hand: q(z_t | z_0) and the UNet call written out in plain torch."""
    from cloaklab.ops.train import loop

    pipe = fresh_tiny_pipe
    unet, scheduler = pipe.unet, loop.training_scheduler(pipe)
    unet.requires_grad_(False)
    make = torch.Generator().manual_seed(11)
    latents, noise = torch.randn(2, 4, 8, 8, generator=make), torch.randn(2, 4, 8, 8, generator=make)
    embeddings = {"p0": torch.randn(1, 77, 32, generator=make), "p1": torch.randn(1, 77, 32, generator=make)}
    timesteps = torch.tensor([123, 801])

    class Stub:
        def __init__(self):
            self.delta = torch.zeros((), requires_grad=True)

        def condition(self, prompts):
            return torch.cat([embeddings[p] for p in prompts]) + self.delta, {}

        def extra_loss(self, generator, rows=None):
            return torch.tensor(0.25) if rows is None else torch.tensor(0.25 * (rows.stop - rows.start) / 2)

    def run(part, accumulation=1):
        stub = Stub()
        config = TrainConfig(batch_size=2, grad_accumulation=accumulation)
        batch = loop.Batch(latents, None, timesteps, noise, ["p0", "p1"], [])
        value = loop.micro_batch_backward(unet, scheduler, stub, batch, config, torch.Generator(), part)
        return float(value[0]), float(stub.delta.grad)

    with torch.no_grad():
        abar = scheduler.alphas_cumprod[timesteps].float().view(-1, 1, 1, 1)
        text = torch.cat([embeddings["p0"], embeddings["p1"]])
        prediction = unet(abar.sqrt() * latents + (1 - abar).sqrt() * noise, timesteps,
                          encoder_hidden_states=text).sample
        per_sample = (prediction - noise).pow(2).mean((1, 2, 3))
    full, full_grad = run(None)
    assert full == pytest.approx(float(per_sample.mean()) + 0.25, rel=1e-5)
    second, _ = run(slice(1, 2))
    assert second == pytest.approx(float(per_sample[1]) / 2 + 0.125, rel=1e-5)
    _, half_grad = run(None, accumulation=2)
    assert half_grad == pytest.approx(full_grad / 2, rel=1e-5) and abs(full_grad) > 1e-6


def test_checkpoint_pruning_keeps_the_last_two_and_never_deletes_a_file_cloak_did_not_name(tmp_path):
    from cloaklab.ops.train.loop import CHECKPOINT_DIR, latest_checkpoint, write_checkpoint

    folder = tmp_path / CHECKPOINT_DIR
    folder.mkdir()
    (folder / "step-mine.pt").write_text("a user's file")
    for step in (1, 2, 3):
        write_checkpoint(tmp_path, step, {"step": step})
    assert sorted(p.name for p in folder.iterdir()) == ["step-000002.pt", "step-000003.pt", "step-mine.pt"]
    assert latest_checkpoint(tmp_path) == folder / "step-000003.pt"  # the user's file is not resumed from


def test_checkpoints_are_ordered_by_step_number_past_six_digits(tmp_path):
    from cloaklab.ops.train.loop import CHECKPOINT_DIR, latest_checkpoint, write_checkpoint

    for step in (999_998, 999_999, 1_000_000):
        write_checkpoint(tmp_path, step, {"step": step})
    folder = tmp_path / CHECKPOINT_DIR
    assert sorted(p.name for p in folder.iterdir()) == ["step-1000000.pt", "step-999999.pt"]  # the last two kept
    assert latest_checkpoint(tmp_path) == folder / "step-1000000.pt"
