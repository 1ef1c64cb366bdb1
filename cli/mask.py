"""``cloak mask``: concept masks with Segment Anything — binary PNGs for loss masking (``train-ti --masks``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from . import common

SamType = common.choices("SamType", ["vit_h", "vit_l", "vit_b", "tiny"])
Select = common.choices("Select", ["central", "largest"])
PROMPTS = "Prompts (default: automatic)"


def _numbers(text: str, count: int, flag: str) -> tuple[float, ...]:
    from cloaklab.ops.errors import UsageError

    try:
        values = tuple(float(part) for part in text.replace(" ", "").split(","))
    except ValueError:
        values = ()
    if len(values) != count:
        raise UsageError(f"{flag} {text!r}: expected {count} comma-separated numbers in image pixels")
    return values


@common.handle_errors
def mask(
    inputs: common.Inputs,
    output: common.Output,
    box: Annotated[Optional[str], typer.Option(metavar="X0,Y0,X1,Y1", rich_help_panel=PROMPTS,
                                               help="Box prompt in image pixels (same for every image).")] = None,
    point: Annotated[Optional[list[str]], typer.Option(metavar="X,Y", rich_help_panel=PROMPTS,
                                                       help="Positive point prompt in image pixels; repeatable.")]
    = None,
    center: Annotated[bool, typer.Option(rich_help_panel=PROMPTS, help="Prompt with the image centre.")] = False,
    select: Annotated[Select, typer.Option(rich_help_panel=PROMPTS,  # type: ignore[valid-type]
                                           help="Automatic mode: the central object (largest mask containing the "
                                                "centre) or the largest object.")] = "central",
    points_per_side: Annotated[int, typer.Option(min=1, rich_help_panel=PROMPTS,
                                                 help="Automatic mode: SAM point grid per side (SAM default 32).")]
    = 32,
    dilate: Annotated[int, typer.Option(min=0, metavar="N", help="Dilate by N px at a 512 training resolution (max "
                                        "filter 2N'+1, N' = N·min(W,H)/512). Leave 0 if train-ti dilates "
                                        "(--dilate / --preset szt).")] = 0,
    sam_type: Annotated[SamType, typer.Option(help="SAM backbone (tiny = random demo model built in code).")]  # type: ignore[valid-type]
    = "vit_h",
    sam_checkpoint: Annotated[Optional[Path], typer.Option(envvar="CLOAK_SAM_CHECKPOINT", help="SAM checkpoint "
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
    import sys

    import numpy as np
    import torch

    from cloaklab.ops.device import resolve_device
    from cloaklab.ops.io import (DEFAULT_MAX_PIXELS, LoadedImage, atomic_write_bytes, check_output_location,
                                 check_outputs, collect_inputs, output_path, parse_shard, select_shard,
                                 shard_label)
    from pathlib import PurePosixPath

    from cloaklab.ops.errors import RejectedInput
    from cloaklab.ops.manifest import Manifest
    from cloaklab.ops.masks import (MaskPrompt, dilate_mask, load_sam, overlay, require_sam, scaled_dilation,
                                    segment)
    from cloaklab.ops.runner import ProcessedImage, process_folder

    require_sam()  # before any output is made

    prompt = MaskPrompt(box=_numbers(box, 4, "--box") if box else None,  # type: ignore[arg-type]
                        points=[_numbers(p, 2, "--point") for p in point or []], center=center,
                        select=common.value(select), points_per_side=points_per_side)
    shard_spec = parse_shard(shard)
    check_output_location(inputs, output)
    items, notes = collect_inputs(inputs, recursive, sys.stdin)
    check_outputs(output, items)
    items = select_shard(items, shard_spec)
    torch_device = resolve_device(device)
    sam_name = common.value(sam_type)
    params = {"box": prompt.box, "points": [list(p) for p in prompt.points], "center": center,
              "select": prompt.select, "points_per_side": points_per_side, "dilate": dilate, "sam_type": sam_name,
              "sam_checkpoint": str(sam_checkpoint) if sam_checkpoint else None, "preview": preview}
    manifest = Manifest(output, "mask", params, seed=seed, model={"name": f"sam-{sam_name}"},
                        extra={"device": str(torch_device), "shard": shard_label(shard_spec)})
    sam = load_sam(sam_name, str(sam_checkpoint) if sam_checkpoint else None, torch_device)

    def process(jobs):
        results = []
        for job in jobs:
            rgb = np.rint(job.image.rgb.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
            torch.manual_seed(job.seed)
            with torch.no_grad():
                binary, stats = segment(sam, rgb, prompt)
            radius = scaled_dilation(dilate, job.image.size)
            binary = dilate_mask(binary, radius)
            stats.update(area_fraction=round(float(binary.mean()), 6), dilate_px=radius)
            if not binary.any():
                stats["warning"] = "empty mask"
            if preview:
                from PIL import Image
                import io as _io

                buffer = _io.BytesIO()
                Image.fromarray(overlay(rgb, binary)).save(buffer, format="PNG")
                try:  # no write through a symlink inside OUTPUT, nor over a preview cloak did not write
                    target = output_path(output, PurePosixPath("previews") / job.item.output_rel)
                    if target.exists() and not manifest.owns(job.item.output_rel.as_posix()):
                        raise RejectedInput(f"{target} exists and was not written by cloak")
                    atomic_write_bytes(target, buffer.getvalue())
                except RejectedInput as exc:
                    stats["warning"] = f"preview not written: {exc}"
            plane = torch.from_numpy(binary.astype(np.float32))
            like = LoadedImage(plane[None].expand(3, -1, -1), None, None, True, 8, "L")
            results.append(ProcessedImage(plane[None].expand(3, -1, -1).clone(), stats, like=like))
        return results

    with common.Reporter("mask") as reporter:
        for note in notes:
            reporter.line(f"cloak: note: {note}")
        summary = process_folder(items, output, manifest, process, seed=seed, overwrite=overwrite,
                                 max_pixels=max_pixels or DEFAULT_MAX_PIXELS, on_event=reporter.event)
        code = reporter.summary(summary, output, json_out)
    raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    app.command("mask")(mask)
