"""``cloak mask``: concept masks with Segment Anything — binary PNGs for loss masking (``train-ti --masks``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cloaklab.ops.commands.mask import MaskSettings
from cloaklab.ops.masks import SAM_TYPES, SELECT_MODES

from . import common

SamType = common.choices("SamType", list(SAM_TYPES))
Select = common.choices("Select", list(SELECT_MODES))
PROMPTS = "Prompts (default: automatic)"


@common.handle_errors
def mask(
    inputs: common.Inputs,
    output: common.Output,
    box: Annotated[str | None, typer.Option(metavar="X0,Y0,X1,Y1", rich_help_panel=PROMPTS,
                                               help="Box prompt in image pixels (same for every image).")] = None,
    point: Annotated[list[str] | None, typer.Option(metavar="X,Y", rich_help_panel=PROMPTS,
                                                       help="Positive point prompt in image pixels; repeatable.")]
    = None,
    center: Annotated[bool, typer.Option(rich_help_panel=PROMPTS, help="Prompt with the image centre.")] = False,
    select: Annotated[Select, typer.Option(rich_help_panel=PROMPTS,  # type: ignore[valid-type]
                                           help="Automatic mode: the central object (largest mask containing the "
                                                "centre) or the largest object.")] = MaskSettings.select,
    points_per_side: Annotated[int, typer.Option(min=1, rich_help_panel=PROMPTS,
                                                 help="Automatic mode: SAM point grid per side (SAM default 32).")]
    = MaskSettings.points_per_side,
    dilate: Annotated[int, typer.Option(min=0, metavar="N", help="Dilate by N px at a 512 training resolution (max "
                                        "filter 2N'+1, N' = N·min(W,H)/512). Leave 0 if train-ti dilates "
                                        "(--dilate / --preset szt).")] = MaskSettings.dilate,
    sam_type: Annotated[SamType, typer.Option(help="SAM backbone (tiny = random demo model built in code).")]  # type: ignore[valid-type]
    = MaskSettings.sam_type,
    sam_checkpoint: Annotated[Path | None, typer.Option(envvar="CLOAK_SAM_CHECKPOINT", help="SAM checkpoint "
                                                           "(.pth state dict or .safetensors). Default: "
                                                           "~/.cache/segment_anything/sam_vit_h_4b8939.pth etc., from "
                                                           "https://dl.fbaipublicfiles.com/segment_anything/")] = None,
    preview: Annotated[bool, typer.Option(help="Also write OUTPUT/previews/<name>.png: the image with the mask in "
                                          "red.")] = False,
    recursive: common.Recursive = False,
    overwrite: common.Overwrite = False,
    shard: common.Shard = None,
    device: common.Device = "auto",
    seed: common.Seed = 0,
    max_pixels: common.MaxPixels = None,
    json_out: common.JsonOut = False,
    debug: common.Debug = False,
) -> None:
    """Segment the concept in each image with SAM: OUTPUT/<same name>.png is a binary mask (0/255) of the image's
    size; cloak.json records the mask's area fraction, SAM score and mode.

    Examples:  cloak mask photos -o masks · cloak mask photos -o masks --center --preview ·
    cloak mask photos -o masks --box 40,30,480,500 --sam-type vit_b --sam-checkpoint sam_vit_b_01ec64.pth
    """
    flags = dict(locals())
    common.execute("mask", common.settings_from(MaskSettings, flags), inputs, output, json_out)


def register(app: typer.Typer) -> None:
    app.command("mask")(mask)
