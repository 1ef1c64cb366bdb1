"""``--model tiny``: a tiny random Stable-Diffusion-architecture pipeline built in code, for tests, demos and CI.

Architecture as SD 1.x, scaled down: an ``AutoencoderKL`` with four blocks (8× downsampling, 4 latent channels), a
two-level ``UNet2DConditionModel`` with cross-attention, a 2-layer ``CLIPTextModel`` (hidden size 32) and the real
CLIP tokenizer. Weights are random but deterministic for a seed.

Calibration: a random VAE maps photos to latents of std ≈ 0.05, which would make the image almost irrelevant to
the diffusion loss. As SD does (scaling factor 0.18215 for its VAE), we set ``vae.config.scaling_factor`` so that
latents of natural photos (scikit-image's sample photos at 64 px) have unit standard deviation.
"""

from __future__ import annotations

import copy
from functools import lru_cache

import torch

TINY_RESOLUTION = 64
CALIBRATION_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field")


def _calibration_batch(resolution: int) -> torch.Tensor:
    import numpy as np
    from PIL import Image
    from skimage import data

    tensors = []
    for name in CALIBRATION_PHOTOS:
        photo = Image.fromarray(getattr(data, name)()).convert("RGB").resize((resolution, resolution), Image.BICUBIC)
        tensors.append(torch.from_numpy(np.asarray(photo, dtype=np.float32) / 255.0).permute(2, 0, 1))
    return torch.stack(tensors)


@torch.no_grad()
def calibrated_scaling_factor(vae, resolution: int = TINY_RESOLUTION) -> float:
    """1 / std of the VAE posterior means of natural photos (what makes SD's latents unit-variance)."""
    images = _calibration_batch(resolution).to(vae.device, vae.dtype)
    latents = vae.encode(images * 2 - 1).latent_dist.mean
    return float(1.0 / latents.float().std())


@lru_cache(maxsize=4)
def _build(seed: int):
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from .shaped import sd15_scheduler
    from .tokenizer import VOCAB_SIZE, clip_tokenizer

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8, sample_size=TINY_RESOLUTION,
    )
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(
        sample_size=TINY_RESOLUTION // 8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
        norm_num_groups=8,
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, projection_dim=32, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    ))
    scheduler = sd15_scheduler()  # Stable Diffusion 1.x's noise schedule
    vae.register_to_config(scaling_factor=calibrated_scaling_factor(vae))
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(), unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    for module in (vae, unet, text_encoder):
        module.eval()
    return pipe


def build_tiny_pipeline(seed: int = 0):
    """A fresh tiny ``StableDiffusionPipeline`` in fp32 on the CPU (a copy: callers may train it)."""
    pipe = _build(seed)
    fresh = copy.deepcopy(pipe)
    fresh.set_progress_bar_config(disable=True)
    return fresh
