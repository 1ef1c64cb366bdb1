"""Benchmark the model-based purifiers: seconds per image, and the same time in units of one UNet forward measured
side by side in this run (so the numbers mean something across machines).

CPU, tiny stand-ins (what CI can run):
    .venv/bin/python bench/purify.py
GPU, SD-shaped random networks at 512² (SD 1.5-shaped UNet/VAE/text encoder, a DDPM-256-shaped pixel UNet, an
x4-upscaler-shaped pipeline, LPIPS on a random VGG-16) — the targets of issue 4 are gridpure ≤ 20 s/img (DiffShortcut
reports 93 s) and impress at 500 iterations ≤ 30 s/img (paper: 141 s at 3000):
    python bench/purify.py --device cuda --dtype fp16 --sd-shaped --methods gridpure impress --set impress.iters=500
Random weights make the outputs meaningless but the timings representative (same shapes, same number of calls).
"""

from __future__ import annotations

import argparse
import time

import torch

from cloaklab.ops.models import load_pipeline
from cloaklab.ops.purify import get_purifier
from cloaklab.ops.purify.models import (
    PurifierModels,
    TinyFaceRestorer,
    TinyLPIPS,
    build_tiny_pixel_model,
    build_tiny_upscaler,
    place_on,
)

METHODS = ("regen", "diffpure-latent", "diffpure-pixel", "ddspure", "gridpure", "pdm-pure", "impress",
           "codeformer-sr", "noisy-upscale")


def tiny_models(device, dtype) -> PurifierModels:
    pixel = build_tiny_pixel_model()
    pixel.unet = place_on(pixel.unet, device, dtype)
    return PurifierModels(pipe=load_pipeline("tiny", device, dtype), pixel=pixel, stage2=pixel,
                          upscaler=place_on(build_tiny_upscaler(), device, dtype), lpips=TinyLPIPS().to(device),
                          face=TinyFaceRestorer().to(device), detect_faces=lambda images: [True] * len(images))


def sd_shaped_models(device, dtype) -> PurifierModels:
    """Random networks with the real models' shapes (no download): ``sd15-shaped`` for the SD pipeline."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        DDPMScheduler,
        StableDiffusionUpscalePipeline,
        UNet2DConditionModel,
        UNet2DModel,
    )
    from torchmetrics.functional.image.lpips import _NoTrainLpips
    from transformers import CLIPTextConfig, CLIPTextModel

    from cloaklab.ops.metrics.lpips import LPIPSNet
    from cloaklab.ops.models.tokenizer import VOCAB_SIZE, clip_tokenizer
    from cloaklab.ops.purify.models import PixelDiffusion

    def text_encoder(hidden: int, layers: int) -> CLIPTextModel:
        return CLIPTextModel(CLIPTextConfig(vocab_size=VOCAB_SIZE, hidden_size=hidden, intermediate_size=4 * hidden,
                                            num_hidden_layers=layers, num_attention_heads=hidden // 64,
                                            max_position_embeddings=77))

    pipe = load_pipeline("sd15-shaped", device, dtype)
    pixel_unet = UNet2DModel(sample_size=256, block_out_channels=(128, 128, 256, 256, 512, 512), layers_per_block=2,
                             down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
                             up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4)
    pixel_unet = place_on(pixel_unet, device, dtype)
    pixel = PixelDiffusion(pixel_unet, DDPMScheduler(num_train_timesteps=1000), 256, "ddpm-256-shaped")
    up_unet = UNet2DConditionModel(sample_size=128, in_channels=7, out_channels=4,
                                   block_out_channels=(256, 512, 512, 1024),
                                   down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 3,
                                   up_block_types=("CrossAttnUpBlock2D",) * 3 + ("UpBlock2D",), layers_per_block=2,
                                   cross_attention_dim=1024, attention_head_dim=8, num_class_embeds=1000)
    up_vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                           block_out_channels=(128, 256, 512), layers_per_block=2, latent_channels=4,
                           scaling_factor=0.08333)
    upscaler = StableDiffusionUpscalePipeline(
        vae=up_vae, text_encoder=text_encoder(1024, 23), tokenizer=clip_tokenizer(), unet=up_unet,
        low_res_scheduler=DDPMScheduler(num_train_timesteps=1000),
        scheduler=DDIMScheduler(num_train_timesteps=1000, prediction_type="v_prediction"), max_noise_level=350,
    )
    upscaler = place_on(upscaler, device, dtype)
    upscaler.set_progress_bar_config(disable=True)
    lpips = LPIPSNet(_NoTrainLpips(net="vgg", pretrained=False, pnet_rand=True).eval()).to(device)
    return PurifierModels(pipe=pipe, pixel=pixel, stage2=pixel, upscaler=upscaler, lpips=lpips,
                          face=TinyFaceRestorer().to(device), detect_faces=lambda images: [True] * len(images))


@torch.no_grad()
def unet_forward_seconds(pipe, size: int, device, repeats: int) -> float:
    latents = torch.randn(1, 4, size // 8, size // 8, device=device, dtype=pipe.unet.dtype)
    context = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, device=device, dtype=pipe.unet.dtype)
    t = torch.tensor([500], device=device)
    pipe.unet(latents, t, encoder_hidden_states=context)  # warm-up
    return timed(lambda: pipe.unet(latents, t, encoder_hidden_states=context), device, repeats)


def timed(function, device, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        function()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def parse_overrides(items: list[str]) -> dict[str, dict[str, object]]:
    """``method.key=value`` → {method: {key: value}} (int, float or string)."""
    overrides: dict[str, dict[str, object]] = {}
    for item in items:
        target, value = item.split("=", 1)
        method, key = target.split(".", 1)
        for cast in (int, float, str):
            try:
                parsed = cast(value)
                break
            except ValueError:
                continue
        overrides.setdefault(method, {})[key] = parsed
    return overrides


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"))
    parser.add_argument("--sd-shaped", action="store_true", help="SD-shaped random networks (GPU) instead of tiny")
    parser.add_argument("--size", type=int, default=None, help="image side (64 tiny, 512 SD-shaped)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--set", nargs="*", default=[], metavar="METHOD.KEY=VALUE",
                        help="override a parameter, e.g. impress.iters=500")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    size = args.size or (512 if args.sd_shaped else 64)
    models = sd_shaped_models(device, dtype) if args.sd_shaped else tiny_models(device, dtype)
    overrides = parse_overrides(args.set)
    unit = unet_forward_seconds(models.pipe, size, device, 5)
    print(f"# device {device} {args.dtype}, images {size}², {'SD-shaped' if args.sd_shaped else 'tiny'} networks")
    print(f"# one UNet forward (batch 1, {size // 8}² latent): {unit * 1000:.2f} ms")
    print(f"{'method':16s} {'s/img':>10s} {'UNet fwds':>10s}  params")
    from cloaklab.tests.conftest import photo_tensor

    image = photo_tensor("astronaut", size)[None].to(device)
    for name in args.methods:
        spec = get_purifier(name)
        params = spec.resolve(overrides.get(name, {}))
        module = spec.load()

        def once():
            generators = [torch.Generator().manual_seed(0)]
            with torch.no_grad():
                return module.purify(image, generators=generators, models=models, **params)

        seconds = timed(once, device, args.repeats)
        shown = {k: v for k, v in params.items() if not k.endswith("_model")}
        print(f"{name:16s} {seconds:10.3f} {seconds / unit:10.0f}  {shown}", flush=True)


if __name__ == "__main__":
    main()
