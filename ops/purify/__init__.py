"""Purifiers (``cloak purify --method NAME``): one small module each, registered here by name.

This registry imports nothing heavy, so the CLI can list methods without loading torch. Each method module exposes
``purify(images, *, generators, **params) -> images`` on float ``(B, 3, H, W)`` batches in [0, 1], one generator
per image (model-based methods also take ``models``, built once per run by their ``load_models(device=, dtype=,
model=, trust_pickle=, **params)``, and may return ``(images, [per-image stats])``). Diffusion methods share
:mod:`.sdedit`; their extra networks load through :mod:`.models`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ..registry import MethodSpec
from ..validate import PURIFIER_RANGES


@dataclass(frozen=True)
class PurifierSpec(MethodSpec):
    needs_model: bool = False
    min_size: int = 1

    range_table: ClassVar[dict[str, Any]] = PURIFIER_RANGES


PURIFIERS: dict[str, PurifierSpec] = {}


def register(spec: PurifierSpec) -> PurifierSpec:
    PURIFIERS[spec.name] = spec
    return spec


def get_purifier(name: str) -> PurifierSpec:
    from ..errors import UsageError

    if name not in PURIFIERS:
        raise UsageError(f"unknown purifier {name!r}; choose one of: {', '.join(PURIFIERS)}")
    return PURIFIERS[name]


register(PurifierSpec("none", "identity", "No purification: every image unchanged (the grid's no-defence column, "
                      "written with a manifest like any other).", {}))
register(PurifierSpec("jpeg", "jpeg", "JPEG encode → decode (Pillow, 4:2:0); saved losslessly so later steps see "
                      "exactly what JPEG did. Default quality 75 (DiffShortcut/MetaCloak eval; SZT uses 25). "
                      "--jpeg-scale S: JPEG at short side S (bicubic up, encode, back; paper 000 used 512-px photos).",
                      {"quality": 75, "jpeg_scale": None}))
register(PurifierSpec("webp", "webp", "WebP encode → decode (Pillow), quality 75 (InMark, paper 004).",
                      {"quality": 75}))
register(PurifierSpec("gaussian", "gaussian", "Gaussian blur as DiffShortcut ran it: Pillow GaussianBlur(radius=5); "
                      "Pillow's radius is the standard deviation, so --sigma 5 (pixels).", {"sigma": 5.0}))
register(PurifierSpec("tvm", "tvm", "Total-variance minimization (Guo et al. 2018) as in DiffShortcut App. C.1: "
                      "resize to 64², drop 2% of pixels, min ‖(1−X)⊙(Z−x)‖₂ + λ·TV(Z), λ 0.01, upsample back "
                      "(bicubic; the paper used two SR steps).",
                      {"resolution": 64, "drop": 0.02, "tv_weight": 0.01, "iters": 200}))
register(PurifierSpec("adverse-cleaner", "adverse_cleaner", "AdverseCleaner: 64 × bilateral filter (d 5, σc 8, "
                      "σs 8) then 4 × guided filter with the input as guide (r 4, eps 16).",
                      {"bilateral_iters": 64, "guided_iters": 4, "radius": 4, "eps": 16.0}))

# ---------------------------------------------------------------------------- diffusion, optimization, restoration
# Network defaults (Hub ids / names) live here too so the CLI can show them without importing torch.
PIXEL_MODEL = "google/ddpm-ema-celebahq-256"
UPSCALER_MODEL = "stabilityai/stable-diffusion-x4-upscaler"
STAGE2_MODEL = "DeepFloyd/IF-II-L-v1.0"
DIFFPURE_PROMPT = "a photo of a {class}, clear, high resolution, high quality, noise-free"

register(PurifierSpec("regen", "regen", "Diffusion regeneration (WatermarkAttacker): SD VAE latent noised to step 60, "
                      "denoised over the rest of a 50-step DDIM schedule, CFG 7.5, prompt \"\".",
                      {"t": 60, "steps": 50, "guidance": 7.5, "prompt": ""}, needs_model=True, min_size=8))
register(PurifierSpec("diffpure-latent", "diffpure_latent", "LatentDiffPure as DiffShortcut's diffpure_main.py: SD "
                      "latent (posterior sample) noised to t=300, stochastic DDPM on every step 300..0 (301 UNet "
                      "calls), CFG 7.5, prompt with {class} (empty without --class-name); --steps 50 --eta 0 is the "
                      "deterministic DDIM variant.",
                      {"t": 300, "steps": 1000, "guidance": 7.5, "prompt": DIFFPURE_PROMPT, "class_name": None,
                       "eta": 1.0},
                      needs_model=True, min_size=8))
register(PurifierSpec("diffpure-pixel", "diffpure_pixel", "PixelDiffPure (Nie et al.): pixel diffusion model "
                      "(--pixel-model), resize to its 256² and back, noise to t=100, DDPM reverse over every step.",
                      {"t": 100, "steps": 1000, "eta": 1.0, "resolution": None, "pixel_model": PIXEL_MODEL}))
register(PurifierSpec("ddspure", "ddspure", "DDSPure (Carlini et al.): t* with (1−ᾱ)/ᾱ = σ² in the model's own "
                      "1000-step schedule, σ = 11/255 (×2 for [-1,1]), then one pixel SDEdit from t*.",
                      {"sigma": 11.0, "steps": 1000, "eta": 1.0, "resolution": None, "pixel_model": PIXEL_MODEL}))
register(PurifierSpec("gridpure", "gridpure", "GrIDPure: 256² windows, stride 128, plus the stitched corner "
                      "patches; DiffPure t=10 per window, overlaps averaged, x ← 0.9·x̃ + 0.1·x, 10 iterations "
                      "(official README: 20).",
                      {"window": 256, "stride": 128, "t": 10, "steps": 1000, "gamma": 0.1, "iters": 10, "eta": 1.0,
                       "pixel_model": PIXEL_MODEL}, min_size=8))
register(PurifierSpec("pdm-pure", "pdm_pure", "PDM-Pure: DeepFloyd IF stage II SDEdit at 256² (t≈444, guidance 7, "
                      "prompt \"a picture\"), then SD x4 upscaler (50 steps, guidance 4), resized back.",
                      {"t": 444, "steps": 100, "guidance": 7.0, "prompt": "a picture", "resolution": 256,
                       "upscaler_steps": 50, "upscaler_guidance": 4.0, "noise_level": 20,
                       "stage2_model": STAGE2_MODEL, "upscaler_model": UPSCALER_MODEL}, min_size=8))
register(PurifierSpec("impress", "impress", "IMPRESS as released: from x_ptb + N(0, 0.05²) (0.1 in [-1,1] units), min "
                      "‖x − D(E(x))‖² + 0.1·max(LPIPS(x, x_ptb) − 0.1, 0), Adam lr 0.01 (eps 1e-5) cosine to 1e-5, "
                      "3000 iterations (--iters 500 is ~6× faster, most of the effect).",
                      {"iters": 3000, "lr": 0.01, "lpips_weight": 0.1, "lpips_budget": 0.1, "lpips_model": "vgg",
                       "noise": 0.05},
                      needs_model=True, min_size=8))
register(PurifierSpec("codeformer-sr", "codeformer_sr", "DiffShortcut purification: CodeFormer face restoration "
                      "(fidelity 0.5; non-faces skipped), resize to 1/4 (128² for 512²), SD x4 upscaler (75 steps, "
                      "guidance 9, noise level 20), prompt \"A photo of a {class}\".",
                      {"fidelity": 0.5, "steps": 75, "guidance": 9.0, "noise_level": 20,
                       "prompt": "A photo of a {class}", "class_name": None, "face_model": "codeformer",
                       "upscaler_model": UPSCALER_MODEL}, min_size=8))
register(PurifierSpec("noisy-upscale", "noisy_upscale", "Noisy upscaling (robust-style-mimicry): Gaussian noise "
                      "σ 0.05, then SD x4 upscaler at noise level 320 (75 steps, guidance 9) from 1/4 size.",
                      {"noise": 0.05, "noise_level": 320, "steps": 75, "guidance": 9.0, "prompt": "",
                       "upscaler_model": UPSCALER_MODEL}, min_size=8))
