"""The extra networks of the model-based purifiers, each loaded by name (a Hub id, a local folder, a file, or ``tiny``).

Defaults (documented in docs/purify.md):
  * pixel diffusion model (diffpure-pixel, ddspure, gridpure): ``google/ddpm-ema-celebahq-256`` — a diffusers
    ``UNet2DModel`` + DDPM schedule at 256². Paper 001 used guided-diffusion's ImageNet ``256x256_diffusion_uncond``;
    convert it to a diffusers folder and pass the folder (learned-σ models with 6 output channels are fine: the first
    three are ε).
  * x4 upscaler (pdm-pure, codeformer-sr, noisy-upscale): ``stabilityai/stable-diffusion-x4-upscaler``.
  * pixel stage II (pdm-pure): ``DeepFloyd/IF-II-L-v1.0`` (``IFImg2ImgSuperResolutionPipeline``; gated on the Hub).
  * LPIPS (impress): ``vgg`` — torchmetrics' LPIPS linear heads on torchvision's ImageNet VGG-16 (weights from the
    torch hub cache); ``alex`` / ``squeeze`` also work.
  * face restorer (codeformer-sr): ``codeformer`` — a TorchScript export of CodeFormer at ``$CLOAK_CODEFORMER``
    (``forward(x, w)`` on ``(B,3,512,512)`` in [-1, 1]); any TorchScript file with that interface; ``none`` skips.
``tiny`` builds a small random stand-in in code for each (tests, demos). Missing weights raise
:class:`ModelNotFoundError` with one line.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..errors import ModelNotFoundError, UsageError
from ..metrics.lpips import TinyLPIPS, load_lpips  # noqa: F401  (impress loads LPIPS here)
from ..models import cast, quiet_loading
from . import PIXEL_MODEL, STAGE2_MODEL, UPSCALER_MODEL  # noqa: F401  (defaults, kept in the stdlib registry)


@dataclass
class PurifierModels:
    """Networks a purifier needs, loaded once per run (fields a method does not use stay ``None``)."""

    pipe: Any = None  # Stable Diffusion pipeline (VAE, UNet, text encoder)
    pixel: PixelDiffusion | None = None
    stage2: Any = None  # PixelDiffusion (tiny) or an IF stage-II img2img pipeline
    upscaler: Any = None  # StableDiffusionUpscalePipeline
    lpips: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    face: Callable[[torch.Tensor, float], torch.Tensor] | None = None
    detect_faces: Callable[[torch.Tensor], list[bool]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def place_on(module, device: Any, dtype: Any):
    """Move a model or pipeline to ``device`` and, when given, ``dtype``."""
    module = module.to(device)
    return cast(module, dtype) if dtype is not None else module


def _missing(kind: str, name: str, flag: str) -> ModelNotFoundError:
    offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True") else ""
    return ModelNotFoundError(f"{kind} {name!r} not found locally or on the Hub{offline}: download it into the "
                              f"Hugging Face cache (HF_HOME), pass a local folder with {flag}, or {flag} tiny "
                              "for a demo")


# ------------------------------------------------------------------------------------------ pixel diffusion
@dataclass
class PixelDiffusion:
    """An unconditional pixel-space ε-prediction model on [-1, 1] images with its 1000-step DDPM schedule."""

    unet: Any
    scheduler: Any
    resolution: int
    name: str = ""

    def predict(self, images: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Model output for ``images`` ``(B, 3, r, r)`` in [-1, 1] (first three channels: learned-σ models give 6)."""
        out = self.unet(images.to(self.unet.dtype), timesteps.to(images.device)).sample
        return out[:, :3].float()


def build_tiny_pixel_model(resolution: int = 32, seed: int = 0) -> PixelDiffusion:
    """A small random ``UNet2DModel`` (channels 32/64) with the linear DDPM schedule (β 1e-4 → 0.02, 1000 steps)
    of DDPM / guided-diffusion — a stand-in with the real model's interface, not a denoiser."""
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(sample_size=resolution, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(32, 64), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8).eval()
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    return PixelDiffusion(unet, scheduler, resolution, "tiny")


def load_pixel_model(name: str, device: Any = "cpu", dtype: Any = None) -> PixelDiffusion:
    """``tiny``, a diffusers folder or Hub id holding a ``UNet2DModel`` and a DDPM-type scheduler."""
    if name == "tiny":
        model = build_tiny_pixel_model()
    else:
        from diffusers import DiffusionPipeline

        try:
            with quiet_loading():
                pipe = DiffusionPipeline.from_pretrained(name, torch_dtype=dtype or torch.float32)
        except (OSError, ValueError):
            raise _missing("pixel diffusion model", name, "--pixel-model") from None
        model = PixelDiffusion(pipe.unet, pipe.scheduler, int(pipe.unet.config.sample_size), name)
    model.unet = place_on(model.unet, device, dtype)
    return model


# ----------------------------------------------------------------------------------------------- upscaler
def build_tiny_upscaler(seed: int = 0):
    """A tiny random ``StableDiffusionUpscalePipeline``: 4×-downsampling VAE (scaling 0.08333 as the real one), a
    UNet on [latent ‖ low-res image] (7 channels) with the noise level as class label, the tiny CLIP text encoder."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        DDPMScheduler,
        StableDiffusionUpscalePipeline,
        UNet2DConditionModel,
    )

    from ..models.tiny import build_tiny_pipeline

    base = build_tiny_pipeline(seed)
    torch.manual_seed(seed + 10)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8,
                        scaling_factor=0.08333)
    torch.manual_seed(seed + 11)
    unet = UNet2DConditionModel(sample_size=16, in_channels=7, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=8, num_class_embeds=1000)
    pipe = StableDiffusionUpscalePipeline(
        vae=vae.eval(), text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=unet.eval(),
        low_res_scheduler=DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear",
                                        beta_start=0.0001, beta_end=0.02),
        scheduler=DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.0001,
                                beta_end=0.02, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                prediction_type="v_prediction"),
        max_noise_level=350)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_upscaler(name: str, device: Any = "cpu", dtype: Any = None):
    if name == "tiny":
        pipe = build_tiny_upscaler()
    else:
        from diffusers import StableDiffusionUpscalePipeline

        try:
            with quiet_loading():
                pipe = StableDiffusionUpscalePipeline.from_pretrained(name, torch_dtype=dtype or torch.float32)
        except (OSError, ValueError):
            raise _missing("x4 upscaler", name, "--upscaler-model") from None
    pipe = place_on(pipe, device, dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_stage2(name: str, device: Any = "cpu", dtype: Any = None):
    """DeepFloyd IF stage II as an img2img super-resolution pipeline, or (``tiny``) the tiny pixel model at 32²."""
    if name == "tiny":
        return load_pixel_model("tiny", device, dtype)
    from diffusers import IFImg2ImgSuperResolutionPipeline

    try:
        with quiet_loading():
            pipe = IFImg2ImgSuperResolutionPipeline.from_pretrained(name, torch_dtype=dtype or torch.float32,
                                                                    safety_checker=None, watermarker=None)
    except (OSError, ValueError):
        raise _missing("IF stage II model", name, "--stage2-model") from None
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ------------------------------------------------------------------------------------------ face restorer
class TinyFaceRestorer(nn.Module):
    """A stand-in with CodeFormer's interface ``f(x, w)`` on ``(B,3,H,W)`` in [-1, 1]: a small random residual conv
    net whose correction is scaled by ``1 − w`` (w = fidelity: 1 keeps the input, as CodeFormer's w trades quality
    for fidelity)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 3, 3, padding=1))
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor, w: float) -> torch.Tensor:
        return (x + (1 - w) * 0.1 * torch.tanh(self.body(x))).clamp(-1, 1)


def load_face_restorer(name: str, device: Any = "cpu", trust_pickle: bool = False):
    """``none`` (skip restoration), ``tiny``, ``codeformer`` (TorchScript at ``$CLOAK_CODEFORMER``) or a path to a
    TorchScript restorer ``f(x, w)`` (pickle-based: needs ``--trust-pickle``)."""
    if name == "none":
        return None
    if name == "tiny":
        return TinyFaceRestorer().to(device).eval()
    path = os.environ.get("CLOAK_CODEFORMER", "") if name == "codeformer" else name
    if not path or not Path(path).is_file():
        raise ModelNotFoundError(
            f"face restorer {name!r} not found{' (set CLOAK_CODEFORMER)' if name == 'codeformer' else ''}: export "
            "CodeFormer (sczhou/CodeFormer v0.1.0) to TorchScript with forward(x, w) and pass --face-model PATH "
            "--trust-pickle, or --face-model none to skip face restoration, or --face-model tiny for a demo")
    if not trust_pickle:
        raise UsageError(f"{path} is a TorchScript file, which is loaded with pickle: pass --trust-pickle if you "
                         "trust its source")
    return torch.jit.load(path, map_location=device).eval()


def haar_face_detector(min_fraction: float = 0.1) -> Callable[[torch.Tensor], list[bool]]:
    """``detect(images (B,3,H,W) in [0,1]) -> [has_face]`` with OpenCV's bundled frontal-face Haar cascade (offline;
    CodeFormer itself uses RetinaFace from facexlib — an approximation, documented)."""
    import cv2
    import numpy as np

    cascade = cv2.CascadeClassifier(os.path.join(cv2.data.haarcascades, "haarcascade_frontalface_default.xml"))

    def detect(images: torch.Tensor) -> list[bool]:
        found = []
        for image in images:
            gray = (image.float().mean(0).clamp(0, 1).cpu().numpy() * 255).astype(np.uint8)
            side = max(16, int(min(gray.shape) * min_fraction))
            found.append(len(cascade.detectMultiScale(gray, 1.1, 4, minSize=(side, side))) > 0)
        return found

    return detect
