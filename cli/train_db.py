"""``cloak train-db``: DreamBooth / LoRA training with Safe-Zone Training and DiffShortcut options."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cloaklab.ops.commands.train_db import MIXED_PRECISION
from cloaklab.ops.commands.train_db import TrainDbSettings as S
from cloaklab.ops.train.presets import MASK_MODES, PRESETS, TIMESTEP_SAMPLERS

from . import common

Preset = common.choices("Preset", list(PRESETS))
TSampler = common.choices("TSampler", list(TIMESTEP_SAMPLERS))
MaskMode = common.choices("MaskMode", list(MASK_MODES))
MixedPrecision = common.choices("MixedPrecision", list(MIXED_PRECISION))
NEG_HELP = ("DiffShortcut contrastive decoupling (paper 001 Alg. 1): instance prompt + ', NEG', class prompt + "
            "', without NEG'. Paper's best: 'UNKNOWN artifact masked'.")
TE_HELP = ("Also train the text encoder (full, or LoRA adapters with --lora). Default: on for DreamBooth (paper "
           "001's full.sh), off for --lora.")
MP_HELP = "Autocast compute dtype (fp32 master weights); papers 001/004 use bf16. fp16 has no loss scaling."


@common.handle_errors
def train_db(
    inputs: common.Inputs,
    output: common.Output,
    instance_prompt: Annotated[str, typer.Option("--instance-prompt", help="Prompt of the instance images (papers "
                                                 "001/004; paper 000's LoRA uses a dummy '*' token, e.g. 'a photo "
                                                 "of *').")] = S.instance_prompt,
    class_prompt: Annotated[str | None, typer.Option("--class-prompt", help="Prompt of the prior-preservation "
                                                        "class images [default: 'a photo of person'].")] = None,
    neg_token: Annotated[str | None, typer.Option("--neg-token", help=NEG_HELP)] = None,
    lora: Annotated[int | None, typer.Option("--lora", metavar="RANK", min=1, help="Train rank-RANK LoRA "
                                                "adapters instead of the full UNet (paper 000 App. P: 4); writes "
                                                "pytorch_lora_weights.safetensors.")] = None,
    train_text_encoder: Annotated[bool | None, typer.Option("--train-text-encoder/--no-train-text-encoder",
                                                               help=TE_HELP, show_default=False)] = None,
    prior_weight: Annotated[float | None, typer.Option("--prior-weight", min=0.0, help="Prior-preservation "
                                                          "weight λ (1.0 for DreamBooth; 0 for --lora, as paper "
                                                          "000 App. P).")] = None,
    num_class_images: Annotated[int, typer.Option("--num-class-images", min=1, help="Class images generated once "
                                                  "by the base model (200, papers 001/004).")] = S.num_class_images,
    class_dir: Annotated[Path | None, typer.Option("--class-dir", help="Cache folder for the class images "
                                                      "(reused and resumed; default OUTPUT/class_images).")] = None,
    class_steps: Annotated[int, typer.Option("--class-steps", min=1, help="DDIM steps per class image.")
                           ] = S.class_steps,
    class_guidance: Annotated[float, typer.Option("--class-guidance", help="CFG scale >= 0 for class images.")
                              ] = S.class_guidance,
    steps: Annotated[int, typer.Option("--steps", "--max-train-steps", min=1, help="Optimizer steps (1000).")
                     ] = S.steps,
    lr: Annotated[float | None, typer.Option("--lr", "--learning-rate", help="Learning rate > 0, constant (5e-7 "
                                             "DreamBooth, papers 001/004; 1e-4 LoRA).")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", min=1, help="Instance images per step; as "
                                                      "many class images (DreamBooth 1 + 1 as paper 001's full.sh; "
                                                      "--lora 2).")] = None,
    grad_accumulation: Annotated[int, typer.Option("--grad-accumulation", "--gradient-accumulation-steps", min=1,
                                                   help="Batches accumulated per optimizer step (1).")
                                 ] = S.grad_accumulation,
    max_grad_norm: Annotated[float, typer.Option("--max-grad-norm", help="Gradient-norm clip >= 0 (1.0; 0 = off).")
                             ] = S.max_grad_norm,
    weight_decay: Annotated[float, typer.Option("--weight-decay", help="AdamW weight decay >= 0 (1e-2).")
                            ] = S.weight_decay,
    resolution: Annotated[int | None, typer.Option("--resolution", help="Training size (the model's: 512 for "
                                                      "SD 1.5, 64 for tiny).")] = None,
    use_8bit_adam: Annotated[bool, typer.Option("--use-8bit-adam", help="bitsandbytes 8-bit AdamW (papers "
                                                "001/004; needs bitsandbytes + CUDA).")] = False,
    gradient_checkpointing: Annotated[bool, typer.Option("--gradient-checkpointing", help="Recompute activations "
                                                         "in backward (less memory, ~30 % slower).")] = False,
    mixed_precision: Annotated[MixedPrecision,  # type: ignore[valid-type]
                               typer.Option("--mixed-precision", help=MP_HELP)] = S.mixed_precision,
    save_trained_only: Annotated[bool, typer.Option("--save-trained-only", help="Full runs: save only the "
                                                    "trained parts (OUTPUT/unet, OUTPUT/text_encoder) instead of a "
                                                    "whole pipeline folder.")] = False,
    preset: Annotated[Preset | None,  # type: ignore[valid-type]
                      typer.Option("--preset", help="SZT preset (paper 000 Table 1); explicit flags override it.")
                      ] = None,
    jpeg: Annotated[int | None, typer.Option("--jpeg", min=1, max=100, help="JPEG-compress instance images at "
                                                "this quality first (SZT: 25).")] = None,
    t_sampler: Annotated[TSampler | None,  # type: ignore[valid-type]
                         typer.Option("--t-sampler", help="Instance timestep sampler (paper 000 App. H).")] = None,
    t_param: Annotated[float | None, typer.Option("--t-param", help="Sampler parameter ρ (threshold-high 0.5 "
                                                     "= t ≥ 500).")] = None,
    mask_mode: Annotated[MaskMode | None,  # type: ignore[valid-type]
                         typer.Option("--mask-mode", help="none, lm (loss mask), im, lim, zm (paper 000 App. I).")
                         ] = None,
    masks: Annotated[Path | None, typer.Option("--masks", help="Folder of concept masks (same names as the "
                                                  "images; `cloak mask`).")] = None,
    dilate: Annotated[int | None, typer.Option("--dilate", min=0, help="Mask dilation in px at a 512 training "
                                                  "resolution (N·R/512 at R), any aspect ratio (SZT: 16).")] = None,
    checkpoint_every: Annotated[int, typer.Option("--checkpoint-every", min=0, help="Resumable checkpoint every N "
                                                  "steps (last two kept; full runs: weights + Adam states).")
                                ] = S.checkpoint_every,
    save_every: Annotated[int, typer.Option("--save-every", min=0, help="Also save weights every N steps under "
                                            "OUTPUT/snapshots (0 = only at the end).")] = S.save_every,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the latest checkpoint in OUTPUT (same "
                                         "settings and images).")] = False,
    model: common.Model = None,
    trust_pickle: common.TrustPickle = False,
    recursive: common.Recursive = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Discard checkpoints of an earlier run in "
                                            "OUTPUT and start again.")] = False,
    device: common.Device = S.device,
    dtype: Annotated[str, typer.Option("--dtype", help="Compute dtype: fp32 = --mixed-precision no, fp16/bf16 = "
                                       "--mixed-precision fp16/bf16 (fp32 master weights either way); auto: "
                                       "--mixed-precision decides (default no).")] = S.dtype,
    seed: Annotated[int, typer.Option("--seed", help="Run seed: data order, timesteps, noise, LoRA init and the "
                                      "class images all follow from it.")] = S.seed,
    max_pixels: common.MaxPixels = None,
    json_out: common.JsonOut = False,
    debug: common.Debug = False,
) -> None:
    """DreamBooth (full UNet, + text encoder) or LoRA fine-tuning with prior preservation, SZT and DiffShortcut.

    Writes OUTPUT/pipeline (a diffusers folder: `cloak generate --model OUTPUT/pipeline`), or OUTPUT/unet
    (+ text_encoder) with --save-trained-only, or OUTPUT/pytorch_lora_weights.safetensors with --lora
    (`cloak generate --lora OUTPUT`); plus train_log.jsonl, checkpoints/ and cloak.json.

    Examples:  cloak train-db faces -o db --instance-prompt "a photo of sks person" --class-prompt
    "a photo of person" --train-text-encoder --use-8bit-adam --mixed-precision bf16 ·
    cloak train-db toy -o lora --lora 4 --instance-prompt "a photo of *" --preset szt --masks toy_masks ·
    cloak train-db faces -o ds --neg-token "UNKNOWN artifact masked" --train-text-encoder

    Several GPUs: torchrun --nproc-per-node N -m cloaklab train-db … (docs/grid.md)
    """
    flags = dict(locals())
    common.execute("train-db", common.settings_from(S, flags), inputs, output, json_out)


def register(app: typer.Typer) -> None:
    app.command("train-db")(train_db)
