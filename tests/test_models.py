"""Model loading: the calibrated tiny pipeline, the real from_pretrained path, and one-line errors."""

from __future__ import annotations

import pytest
import torch

from cloaklab.ops import diffusion
from cloaklab.ops.errors import ModelNotFoundError, UsageError
from cloaklab.ops.models import load_pipeline
from cloaklab.tests.conftest import photo_tensor


def test_tiny_is_deterministic_and_sd_shaped():
    first, second = load_pipeline("tiny"), load_pipeline("tiny")
    for a, b in zip(first.unet.parameters(), second.unet.parameters()):
        assert torch.equal(a, b)
    assert len(first.vae.config.block_out_channels) == 4  # three downsamplings: 8×
    assert first.unet.config.cross_attention_dim == first.text_encoder.config.hidden_size
    assert first.text_encoder.config.num_hidden_layers == 2 and len(first.tokenizer) == 49408


def test_sd15_shaped_has_stable_diffusion_15s_parameter_counts():
    """``--model sd15-shaped`` (random weights, for GPU timing) must have SD 1.5's shapes: UNet 859.5 M, VAE 83.7 M,
    CLIP ViT-L/14 text encoder 123.1 M parameters. Built on the meta device: no memory, no initialisation cost."""
    from cloaklab.ops.models import model_info

    pipe = load_pipeline("sd15-shaped", "meta", torch.bfloat16)
    assert pipe.unet.device.type == "meta" and pipe.unet.dtype == pipe.text_encoder.dtype == torch.bfloat16
    counts = {name: sum(p.numel() for p in getattr(pipe, name).parameters()) for name in ("unet", "vae",
                                                                                          "text_encoder")}
    assert counts == {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}
    assert pipe.vae.config.scaling_factor == 0.18215 and pipe.scheduler.config.beta_schedule == "scaled_linear"
    assert model_info("sd15-shaped").kind == "builtin"


def test_cast_changes_the_dtype_without_diffusers_warning_on_every_cast():
    import logging

    from diffusers.utils import logging as diffusers_logging

    from cloaklab.ops.models import cast

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    root = diffusers_logging.get_logger("diffusers")
    root.addHandler(handler)
    try:
        level = diffusers_logging.get_verbosity()
        load_pipeline("tiny").unet.to(dtype=torch.bfloat16)
        assert any("float32" in r.getMessage() for r in records), "a plain cast warns (else this test proves nothing)"
        records.clear()
        unet = cast(load_pipeline("tiny").unet, torch.bfloat16)
        assert unet.dtype == torch.bfloat16 and records == []
        assert diffusers_logging.get_verbosity() == level
    finally:
        root.removeHandler(handler)


def test_tiny_uses_the_real_clip_tokenizer(tiny_pipe):
    # ids of Stable Diffusion 1.x's tokenizer for this prompt
    assert tiny_pipe.tokenizer("a photo of a dog").input_ids == [49406, 320, 1125, 539, 320, 1929, 49407]


def test_tiny_latents_are_calibrated_to_unit_std(tiny_pipe):
    # photos at another resolution than the calibration's: std close to 1 as with SD's VAE
    images = torch.stack([photo_tensor(name, 96) for name in ("rocket", "coffee", "chelsea")])
    with torch.no_grad():
        latents = diffusion.encode_images(tiny_pipe.vae, images)
    assert 0.6 < latents.std().item() < 1.6
    unscaled = latents / tiny_pipe.vae.config.scaling_factor
    assert unscaled.std().item() < 0.5, "without calibration the random VAE's latents are small"


def test_calibration_makes_the_image_matter_to_the_denoiser(tiny_pipe):
    """With unit-std latents the noise prediction at t=200 depends strongly on the photo; with the random VAE's raw
    latents (scaling factor 1, std ≈ 0.25) the two photos are much closer together for the UNet."""
    images = torch.stack([photo_tensor("astronaut"), photo_tensor("coffee")])
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)).expand(2, -1, -1, -1)
    timesteps = torch.full((2,), 200)

    def prediction_gap(scale: float) -> float:
        with torch.no_grad():
            latents = diffusion.encode_images(tiny_pipe.vae, images) / tiny_pipe.vae.config.scaling_factor * scale
            noisy = diffusion.add_noise(tiny_pipe.scheduler, latents, noise, timesteps)
            text = diffusion.encode_prompts(tiny_pipe, ["a photo"] * 2)
            prediction = tiny_pipe.unet(noisy, timesteps, encoder_hidden_states=text).sample
        return ((prediction[0] - prediction[1]).std() / prediction.std()).item()

    calibrated = prediction_gap(tiny_pipe.vae.config.scaling_factor)
    assert calibrated > 0.3
    assert calibrated > 1.4 * prediction_gap(1.0)


def test_tiny_round_trips_through_from_pretrained(tmp_path, tiny_pipe):
    tiny_pipe.save_pretrained(tmp_path / "tiny")
    reloaded = load_pipeline(str(tmp_path / "tiny"), tiny_pipe.device)
    assert type(reloaded).__name__ == "StableDiffusionPipeline"
    assert reloaded.vae.config.scaling_factor == pytest.approx(tiny_pipe.vae.config.scaling_factor)
    run = dict(prompt="a photo of a dog", num_inference_steps=3, height=64, width=64, output_type="pt")
    a = tiny_pipe(**run, generator=torch.Generator().manual_seed(0)).images
    b = reloaded(**run, generator=torch.Generator().manual_seed(0)).images
    torch.testing.assert_close(a, b)


def test_missing_weights_give_one_clear_line(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelNotFoundError) as error:
        load_pipeline("someone/not-a-real-model")
    message = str(error.value)
    assert "\n" not in message and "someone/not-a-real-model" in message and "--model toy" in message
    with pytest.raises(ModelNotFoundError, match="not a diffusers pipeline"):
        load_pipeline(str(tmp_path))


def test_pickle_checkpoints_need_trust(tmp_path):
    checkpoint = tmp_path / "model.ckpt"
    checkpoint.write_bytes(b"\x80\x04")
    with pytest.raises(UsageError, match="--trust-pickle"):
        load_pipeline(str(checkpoint))
