"""``cloak purify``: remove protective perturbations (or test how well they survive) — one method per run."""

from __future__ import annotations

import inspect
from typing import Annotated

import typer

from cloaklab.ops.purify import PURIFIERS

from . import common

Method = common.choices("Method", list(PURIFIERS))
METHOD_HELP = "Purifier (the list under Methods in this help)."
METHOD_LIST = "\n\n".join(f"{spec.name}: {spec.summary}" for spec in PURIFIERS.values())


@common.handle_errors
def purify(
    inputs: common.Inputs,
    output: common.Output,
    method: Annotated[Method, typer.Option("--method", "-m", help=METHOD_HELP)] = "jpeg",  # type: ignore[valid-type]
    quality: Annotated[int | None, typer.Option(help="jpeg/webp: encoder quality 1-100 (75; SZT uses 25).",
                                                   min=1, max=100)] = None,
    jpeg_scale: Annotated[int | None, typer.Option(
        metavar="S", min=8, help="jpeg: apply JPEG at short side S px (Pillow bicubic resize, encode/decode, resize "
                                 "back; e.g. 512 = paper 000's photo size for small images). Default: own size.")]
    = None,
    sigma: Annotated[float | None, typer.Option(
        help="gaussian: blur σ > 0 in pixels = Pillow's GaussianBlur radius (5, DiffShortcut). ddspure: "
             "perturbation radius σ on the 0-255 scale (11); t* solves (1−ᾱ)/ᾱ = (2σ/255)² in the pixel "
             "model's own schedule.")] = None,
    resolution: Annotated[int | None, typer.Option(
        help="tvm: working resolution, 8-4096 (64). diffpure-pixel/ddspure: pixel-model input size (the model's "
             "own, 256 for the default). pdm-pure: stage-II size (256).")] = None,
    drop: Annotated[float | None, typer.Option(help="tvm: fraction of pixels dropped, 0 <= drop < 1 (0.02).")] = None,
    tv_weight: Annotated[float | None, typer.Option(help="tvm: TV weight λ >= 0 (0.01).")] = None,
    iters: Annotated[int | None, typer.Option(
        help="Iterations — speed/quality trade-off. tvm: optimizer steps (200). gridpure: purify-and-blend rounds "
             "(10; official README 20). impress: Adam steps (3000 as in the paper; 500 is ~6× faster).",
        min=1)] = None,
    bilateral_iters: Annotated[int | None, typer.Option(help="adverse-cleaner: bilateral passes >= 0 (64).")] = None,
    guided_iters: Annotated[int | None, typer.Option(help="adverse-cleaner: guided-filter passes >= 0 (4).")] = None,
    radius: Annotated[int | None, typer.Option(help="adverse-cleaner: guided-filter radius >= 1 (4).")] = None,
    eps: Annotated[float | None, typer.Option(help="adverse-cleaner: guided-filter eps > 0, 0-255 scale (16).")] = None,
    t: Annotated[int | None, typer.Option(
        "--t", help="Noise step (strength) in the model's 1000-step schedule; higher = stronger, less faithful. "
                    "regen 60, diffpure-latent 300, diffpure-pixel 100, gridpure 10, pdm-pure 444.",
        min=0, max=999)] = None,
    steps: Annotated[int | None, typer.Option(
        help="Length of the sampling schedule; denoising runs its part below --t (fewer = faster). regen 50 "
             "(DDIM), diffpure-latent/diffpure-pixel/ddspure/gridpure 1000 (every step, DDPM), pdm-pure 100 "
             "(stage II; stride 10). codeformer-sr/noisy-upscale: upscaler steps (75).", min=1)] = None,
    guidance: Annotated[float | None, typer.Option(
        help="Classifier-free guidance. regen/diffpure-latent 7.5, pdm-pure stage II 7, codeformer-sr/"
             "noisy-upscale upscaler 9.")] = None,
    prompt: Annotated[str | None, typer.Option(
        help="Text prompt ({class} is replaced by --class-name; without it such a prompt becomes \"\"). regen "
             "\"\", diffpure-latent \"a photo of a {class}, clear, high resolution, high quality, noise-free\", "
             "pdm-pure \"a picture\", codeformer-sr \"A photo of a {class}\", noisy-upscale \"\".")] = None,
    class_name: Annotated[str | None, typer.Option(
        help="diffpure-latent, codeformer-sr: the class for {class} in the prompt (e.g. person).")] = None,
    eta: Annotated[float | None, typer.Option(
        help="diffpure-latent/diffpure-pixel/ddspure/gridpure: reverse-process noise (1 = DDPM ancestral as "
             "DiffPure and DiffShortcut; 0 = deterministic DDIM, e.g. diffpure-latent --steps 50 --eta 0).",
        min=0.0)] = None,
    window: Annotated[int | None, typer.Option(help="gridpure: window size in pixels (256).", min=2)] = None,
    stride: Annotated[int | None, typer.Option(help="gridpure: window stride (128).", min=1)] = None,
    gamma: Annotated[float | None, typer.Option(
        help="gridpure: weight of the previous image in x ← (1−γ)·x̃ + γ·x (0.1).", min=0.0, max=1.0)] = None,
    lr: Annotated[float | None, typer.Option(help="impress: Adam learning rate > 0, cosine-annealed (0.01).")] = None,
    lpips_weight: Annotated[float | None, typer.Option(help="impress: LPIPS hinge weight α >= 0 (0.1).")] = None,
    lpips_budget: Annotated[float | None, typer.Option(help="impress: LPIPS budget Δ >= 0 of the hinge (0.1).")] = None,
    lpips_model: Annotated[str | None, typer.Option(
        help="impress: LPIPS backbone vgg (default), alex, squeeze (torchvision ImageNet weights from TORCH_HOME), "
             "or tiny (random, demo).")] = None,
    fidelity: Annotated[float | None, typer.Option(
        help="codeformer-sr: CodeFormer fidelity weight w (0.5; 1 = keep the input).", min=0.0, max=1.0)] = None,
    noise: Annotated[float | None, typer.Option(
        help="noisy-upscale: Gaussian noise std in [0, 1], a fraction of the [0,1] range (0.05; robust-style-mimicry "
             "uses 0.05-0.1). impress: std of the starting noise, same unit (0.05 = the release's 0.1 on [-1,1]; 0 "
             "starts at the input).", min=0.0)] = None,
    noise_level: Annotated[int | None, typer.Option(
        help="x4 upscaler noise level (0-350): noisy-upscale 320, codeformer-sr 20, pdm-pure 20.",
        min=0, max=350)] = None,
    upscaler_steps: Annotated[int | None, typer.Option(help="pdm-pure: x4 upscaler steps (50).", min=1)] = None,
    upscaler_guidance: Annotated[float | None, typer.Option(help="pdm-pure: x4 upscaler guidance >= 0 (4).")] = None,
    pixel_model: Annotated[str | None, typer.Option(
        help="diffpure-pixel/ddspure/gridpure: pixel diffusion model — Hub id or diffusers folder (UNet2DModel + "
             "DDPM scheduler; default google/ddpm-ema-celebahq-256; paper 001 used guided-diffusion ImageNet 256 "
             "uncond, converted), or tiny.")] = None,
    upscaler_model: Annotated[str | None, typer.Option(
        help="pdm-pure/codeformer-sr/noisy-upscale: x4 upscaler (default stabilityai/stable-diffusion-x4-upscaler), "
             "or tiny.")] = None,
    stage2_model: Annotated[str | None, typer.Option(
        help="pdm-pure: pixel stage II (default DeepFloyd/IF-II-L-v1.0, gated on the Hub), or tiny.")] = None,
    face_model: Annotated[str | None, typer.Option(
        help="codeformer-sr: face restorer — codeformer (TorchScript file named by $CLOAK_CODEFORMER; default), a "
             "TorchScript file f(x, w) (needs --trust-pickle), none (skip restoration), or tiny.")] = None,
    model: common.Model = None,
    trust_pickle: common.TrustPickle = False,
    recursive: common.Recursive = False,
    overwrite: common.Overwrite = False,
    shard: common.Shard = None,
    device: common.Device = "auto",
    dtype: common.Dtype = "auto",
    seed: common.Seed = 0,
    batch_size: common.BatchSize = 1,
    max_pixels: common.MaxPixels = None,
    json_out: common.JsonOut = False,
    debug: common.Debug = False,
) -> None:
    """Purify images: every input becomes OUTPUT/<same name>.png with the same size, mode, alpha and ICC profile.

    Examples:  cloak purify photos -o out --method jpeg --quality 25 ·
    cloak purify photos -o out -m gaussian --sigma 2 · cloak purify photos -o out -m regen ·
    cloak purify photos -o out -m impress --iters 500 · cloak purify photos -o out -m gridpure --pixel-model DIR ·
    chain methods with the shell (a && b). Model-based methods load their networks once per run; flags that do
    not apply to the chosen method are refused.
    """
    flags = dict(locals())
    from cloaklab.ops.commands.purify import PurifySettings

    common.execute("purify", common.settings_from(PurifySettings, flags), inputs, output, json_out)


purify.__doc__ = inspect.cleandoc(purify.__doc__ or "") + "\n\nMethods (published defaults):\n\n" + METHOD_LIST


def register(app: typer.Typer) -> None:
    app.command("purify")(purify)
