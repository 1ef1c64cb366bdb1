"""``--model sd15-shaped``: Stable Diffusion 1.5's architecture with random weights, for timing and memory only.

No SD weights can be downloaded on the project machines, but speed and memory depend on shapes, not weights: this
pipeline has SD 1.5's UNet (320-640-1280-1280, cross-attention 768, 860 M parameters), its 8× VAE
(128-256-512-512, 84 M) and a CLIP ViT-L/14-sized text encoder (12 layers, width 768, 123 M) with the real CLIP
tokenizer and SD's scaled-linear DDIM schedule. Its images are noise; use it for benchmarks and GPU smoke runs.
"""

from __future__ import annotations

import torch

SD15_RESOLUTION = 512
SD15_SCALING_FACTOR = 0.18215

UNET_CONFIG = dict(sample_size=SD15_RESOLUTION // 8, cross_attention_dim=768, attention_head_dim=8)
VAE_CONFIG = dict(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                  block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                  sample_size=SD15_RESOLUTION, scaling_factor=SD15_SCALING_FACTOR)
TEXT_CONFIG = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768, bos_token_id=49406,
                   eos_token_id=49407, pad_token_id=49407)


def sd15_scheduler():
    """Stable Diffusion 1.x's noise schedule as a ``DDIMScheduler`` (scaled-linear betas 0.00085 → 0.012 over 1000
    steps, ε-prediction): the schedule of every model cloaklab builds in code (tiny, toy, sd15-shaped)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")


def build_sd15_shaped_pipeline(seed: int = 0, device: torch.device | str = "cpu"):
    """A fresh SD 1.5-shaped ``StableDiffusionPipeline`` with random weights, built directly on ``device`` (fp32)."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from .tokenizer import VOCAB_SIZE, clip_tokenizer

    torch.manual_seed(seed)
    with torch.device(device):  # initialise on the GPU when there is one: 1 G parameters take seconds on a CPU
        unet = UNet2DConditionModel(**UNET_CONFIG)
        vae = AutoencoderKL(**VAE_CONFIG)
        text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=VOCAB_SIZE, **TEXT_CONFIG))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(), unet=unet,
                                   scheduler=sd15_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    for module in (vae, unet, text_encoder):
        module.eval()
    return pipe
