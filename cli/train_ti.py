"""``cloak train-ti``: Textual Inversion with every Safe-Zone Training component of paper 000 as a flag or preset."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cloaklab.ops.commands.train_ti import TrainTiSettings as S
from cloaklab.ops.train.presets import MASK_MODES, PRESETS, TIMESTEP_SAMPLERS

from . import common

Preset = common.choices("Preset", list(PRESETS))
Sampler = common.choices("Sampler", list(TIMESTEP_SAMPLERS))
MaskMode = common.choices("MaskMode", list(MASK_MODES))
SZT = "Safe-Zone Training (paper 000)"


@common.handle_errors
def train_ti(
    inputs: common.Inputs,
    output: common.Output,
    token: Annotated[str, typer.Option(help="The new placeholder token (must not exist in the tokenizer).")] = S.token,
    init_token: Annotated[str, typer.Option(help="A one-token word whose embedding initialises the new token.")]
    = S.init_token,
    num_vectors: Annotated[int, typer.Option(min=1, help="Embedding rows for the token (paper 000: 1).")
                           ] = S.num_vectors,
    templates: Annotated[str, typer.Option(
        metavar="object|style|FILE", help="Prompt templates: the TI paper's object or style set, or a text file of "
                                          "templates with {} for the token, one per line.")] = S.templates,
    preset: Annotated[Preset | None, typer.Option(  # type: ignore[valid-type]
        help=f"{SZT} preset = a column of Table 1: nominal, jpeg (q25), t600 (t>=600), lm (loss mask), jpeg+t600, "
             "jpeg+lm, szt (JPEG q25 + t>=500 + LM with 16 px dilation). Explicit flags override it.",
        rich_help_panel=SZT)] = None,
    jpeg: Annotated[int | None, typer.Option(min=1, max=100, metavar="Q", rich_help_panel=SZT,
                                                help="JPEG-compress training images at quality Q (SZT: 25).")] = None,
    jpeg_scale: Annotated[int | None, typer.Option(
        min=8, metavar="S", rich_help_panel=SZT,
        help="Apply that JPEG at short side S px (Pillow bicubic up, encode/decode, back; paper 000 compressed 512-px "
             "photos, so the toy grid's 64-px images use 512). Default: each file's own size. Ignored without JPEG.")]
    = None,
    t_sampler: Annotated[Sampler | None, typer.Option(  # type: ignore[valid-type]
        rich_help_panel=SZT, help="Timestep sampler (App. H): uniform; threshold-high U(rho,1); threshold-low "
                                  "U(0,rho); power p(t)~t^rho; tanh p(t)~tanh(rho(t-0.5))/2+0.5 (t in [0,1] x T).")]
    = None,
    t_param: Annotated[float | None, typer.Option(metavar="RHO", rich_help_panel=SZT,
                                                     help="rho of the sampler (t600: 0.6; szt: 0.5).")] = None,
    masks: Annotated[Path | None, typer.Option(rich_help_panel=SZT, help="Folder of concept masks (from `cloak "
                                                  "mask`): same relative name (.png) and size as each image.")] = None,
    mask_mode: Annotated[MaskMode | None, typer.Option(  # type: ignore[valid-type]
        rich_help_panel=SZT, help="App. I: lm = loss mask, im = masked input image, lim = both, zm = masked z_t "
                                  "(default lm when --masks is given).")] = None,
    dilate: Annotated[int | None, typer.Option(min=0, metavar="N", rich_help_panel=SZT,
                                                  help="Dilate masks by N px at a 512 training resolution, any "
                                                       "aspect ratio (max filter 2N'+1, N' = N·min(W,H)/512; "
                                                       "SZT: 16).")] = None,
    steps: Annotated[int, typer.Option("--steps", "--max-train-steps", min=1,
                                       help="Optimizer steps (paper 000: 5000; CustomConcept101: 2500).")] = S.steps,
    lr: Annotated[float, typer.Option("--lr", "--learning-rate", help="Learning rate > 0, constant (paper 000: 5e-4).")
                  ] = S.lr,
    warmup_steps: Annotated[int, typer.Option(min=0, help="Linear warm-up steps (paper 000: 0).")] = S.warmup_steps,
    weight_decay: Annotated[float, typer.Option(min=0.0, help="AdamW weight decay of the new token's rows (diffusers' "
                                                "textual_inversion.py --adam_weight_decay: 1e-2; 0 = plain Adam).")]
    = S.weight_decay,
    flip_p: Annotated[float, typer.Option(min=0.0, max=1.0, help="Probability of mirroring a training image left-right "
                                          "per sample (diffusers' TextualInversionDataset flip_p: 0.5; 0 = never). "
                                          "Drawn from the run's seed.")] = S.flip_p,
    grad_accumulation: Annotated[int, typer.Option("--grad-accumulation", "--gradient-accumulation-steps", min=1,
                                                   help="Gradient accumulation (App. O SDXL: 5).")
                                 ] = S.grad_accumulation,
    resolution: Annotated[int | None, typer.Option(help="Training size (default: the model's, e.g. 512 for "
                                                      "SD1.5, 64 for tiny).")] = None,
    mean_latents: Annotated[bool, typer.Option(help="Use the VAE posterior mean instead of a sample per step.")]
    = False,
    log_grad_by_t: Annotated[bool, typer.Option(help="Log the embedding-gradient norm per step and per timestep "
                                                "bin (grad_by_t.json; paper 000 Fig. 5/11).")] = False,
    checkpoint_every: Annotated[int, typer.Option(min=0, help="Checkpoint for --resume every N steps (0: only at "
                                                  "the end).")] = S.checkpoint_every,
    snapshot_every: Annotated[int, typer.Option(min=0, help="Save an embedding snapshot every N steps (0: none).")]
    = S.snapshot_every,
    resume: Annotated[bool, typer.Option(help="Continue from the latest checkpoint in OUTPUT (bit-exact with the same "
                                              "seed and settings).")] = False,
    model: common.Model = None,
    trust_pickle: common.TrustPickle = False,
    recursive: common.Recursive = False,
    overwrite: common.Overwrite = False,
    device: common.Device = S.device,
    dtype: common.Dtype = S.dtype,
    seed: Annotated[int, typer.Option(help="Seed of the run: one generator draws the data order, latent samples, "
                                           "timesteps, noise and prompts (same seed = same embedding).")] = S.seed,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per optimizer step (paper 000: 1).")] = S.batch_size,
    max_pixels: common.MaxPixels = None,
    json_out: common.JsonOut = False,
    debug: common.Debug = False,
) -> None:
    """Learn a new token for the concept in IMAGES (Textual Inversion), optionally with Safe-Zone Training.

    Writes OUTPUT/learned_embeds.safetensors (diffusers `load_textual_inversion`), snapshots/, train_log.jsonl,
    checkpoints/ (for --resume) and cloak.json. Defaults are paper 000's: lr 5e-4 constant, 5000 steps, batch 1,
    with the diffusers TI script it builds on: AdamW weight decay 1e-2, horizontal flips with p 0.5.

    Examples:  cloak train-ti photos -o ti --token '<R*>' --init-token toy ·
    cloak mask photos -o masks && cloak train-ti photos -o ti-szt --preset szt --masks masks ·
    cloak train-ti photos -o ti --t-sampler power --t-param 2 --log-grad-by-t

    Several GPUs: torchrun --nproc-per-node N -m cloaklab train-ti … (docs/grid.md)
    """
    flags = dict(locals())
    common.execute("train-ti", common.settings_from(S, flags), inputs, output, json_out)


def register(app: typer.Typer) -> None:
    app.command("train-ti")(train_ti)
