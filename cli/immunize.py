"""``cloak immunize``: IMMA model immunization against TI, DreamBooth and LoRA (paper 003)."""

from __future__ import annotations

from typing import Annotated

import typer

from cloaklab.ops.train.immunize_config import AGAINST, DEFAULT_CLASS_WORD, ImmunizeConfig

from . import common

Against = common.choices("Against", list(AGAINST))
STAGE = ImmunizeConfig()  # the method's defaults, stated once in ops/train/immunize_config.py
IMMA = "IMMA (paper 003)"


@common.handle_errors
def immunize(
    inputs: common.Inputs,
    output: common.Output,
    against: Annotated[Against, typer.Option(  # type: ignore[valid-type]
        help="The adaptation to immunize against: ti (Textual Inversion), db (DreamBooth, full UNet) or lora "
             "(DreamBooth-LoRA).", show_default=False)],
    multi_concept: Annotated[bool, typer.Option(help="Each INPUT (file or folder) is one concept; immunize them "
                                                "one after the other, each stage starting from the previous "
                                                "one's weights (paper 003 A1.3).")] = False,
    steps: Annotated[int, typer.Option(min=1, rich_help_panel=IMMA, help="Steps per concept, inner and outer "
                                       "together (IMMA: 1000).")] = STAGE.steps,
    inner_steps: Annotated[int, typer.Option(min=1, rich_help_panel=IMMA, help="Adaptation steps per cycle "
                                             "(IMMA: 1).")] = STAGE.inner_steps,
    outer_steps: Annotated[int, typer.Option(min=1, rich_help_panel=IMMA, help="Defence steps per cycle (IMMA: "
                                             "1).")] = STAGE.outer_steps,
    lr: Annotated[float | None, typer.Option(rich_help_panel=IMMA, help="Adaptation (inner) lr; default per "
                                                "method: ti 5e-4, db 5e-6, lora 5e-6.")] = None,
    defence_lr: Annotated[float | None, typer.Option(rich_help_panel=IMMA, help="Defence (outer) lr on the "
                                                        "attention weights; default ti 1e-6, db/lora 2e-5.")] = None,
    max_grad_norm: Annotated[float | None, typer.Option(rich_help_panel=IMMA, help="Gradient-norm clip of both "
                                                           "steps (default: db/lora 1.0, ti none).")] = None,
    clip: Annotated[bool, typer.Option("--clip/--no-clip", rich_help_panel=IMMA,
                                       help="--no-clip: never clip gradients, whatever --max-grad-norm says.")
                    ] = STAGE.clip,
    weight_decay: Annotated[float, typer.Option(rich_help_panel=IMMA, help="AdamW weight decay of both "
                                                "optimizers.")] = STAGE.weight_decay,
    lora_rank: Annotated[int, typer.Option(min=1, rich_help_panel=IMMA, help="Rank of the attacker's LoRA "
                                           "(--against lora).")] = STAGE.lora_rank,
    cross_attention_only: Annotated[bool, typer.Option(rich_help_panel=IMMA, help="Immunize only cross-attention "
                                                       "(attn2) projections (default: self- and cross-attention "
                                                       "to_q/to_k/to_v/to_out).")] = STAGE.cross_attention_only,
    token: Annotated[str | None, typer.Option(help="Identifier the attacker trains: the new TI token (default "
                                                 "'<R*>') or the DreamBooth rare word (default 'sks').")] = None,
    class_word: Annotated[list[str], typer.Option(help="Class of the concept: TI init token and DreamBooth "
                                                  "prompt word; repeat once per concept with --multi-concept.")]
    = [DEFAULT_CLASS_WORD],  # noqa: B006 - typer needs a list default
    instance_prompt: Annotated[str | None, typer.Option(help="db/lora prompt (default 'a photo of {token} "
                                                           "{class}').")] = None,
    resolution: Annotated[int | None, typer.Option(help="Training size (default: the model's; 512 for SD1.5, "
                                                      "64 for tiny).")] = None,
    mean_latents: Annotated[bool, typer.Option(help="Use the VAE posterior mean instead of a sample per step.")]
    = not STAGE.sample_latents,
    check_steps: Annotated[int, typer.Option(min=0, help="After immunizing, adapt the base and the immunized model "
                                             "alike for N steps on each concept and report both adaptation losses "
                                             "(higher = learnt worse; logs in OUTPUT/check/). 0: skip.")] = 0,
    checkpoint_every: Annotated[int, typer.Option(min=0, help="Checkpoint for --resume every N steps (0: only at "
                                                  "the end).")] = STAGE.checkpoint_every,
    resume: Annotated[bool, typer.Option(help="Continue from the latest checkpoint (bit-exact with the same seed "
                                              "and settings); finished concepts are skipped.")] = False,
    model: common.Model = None,
    trust_pickle: common.TrustPickle = False,
    recursive: common.Recursive = False,
    overwrite: common.Overwrite = False,
    device: common.Device = "auto",
    dtype: common.Dtype = "auto",
    seed: common.Seed = 0,
    batch_size: common.BatchSize = STAGE.batch_size,
    max_pixels: common.MaxPixels = None,
    json_out: common.JsonOut = False,
    debug: common.Debug = False,
) -> None:
    """Immunize a model against learning the concept in IMAGES (IMMA): alternate an adaptation step on the images
    with a step that maximizes that adaptation loss w.r.t. the UNet attention weights.

    Writes OUTPUT/pipeline/ (a diffusers folder: pass it to --model of train-ti/train-db/generate),
    OUTPUT/immunized_attention.safetensors (only the changed tensors), train_log.jsonl, checkpoints/ and
    cloak.json; with --multi-concept one OUTPUT/stages/NN-NAME/ per concept. Evaluate by adapting the base model
    and OUTPUT/pipeline alike, generating, and running `cloak score` (docs/immunize.md).

    Examples:  cloak immunize purse/ -o imma-ti --against ti --class-word purse ·
    cloak immunize purse/ -o imma-db --against db --class-word purse ·
    cloak immunize castle/ chair/ guitar/ -o imma3 --against ti --multi-concept --class-word castle
    --class-word chair --class-word guitar

    Several GPUs: torchrun --nproc-per-node N -m cloaklab immunize … (docs/grid.md)
    """
    flags = dict(locals())
    from cloaklab.ops.commands.immunize import ImmunizeSettings

    common.execute("immunize", common.settings_from(ImmunizeSettings, flags), inputs, output, json_out)


def register(app: typer.Typer) -> None:
    app.command("immunize")(immunize)
