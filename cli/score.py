"""``cloak score``: metrics of generated or purified images against clean references, and result tables."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from cloaklab.ops.metrics import (
    CLIP_DEFAULT,
    CLIPSCORE_W,
    DEFAULT_METRICS,
    DINOV2_DEFAULT,
    FID_DEFAULT_FEATURES,
    LPIPS_DEFAULT_NET,
    METRICS,
)

from . import common

METRIC_LIST = "\n\n".join(
    f"{spec.name} ({spec.kind}; {'offline' if spec.offline else 'needs weights: ' + str(spec.default_weights)}): "
    f"{spec.summary}" for spec in METRICS.values())


@common.handle_errors
def score(
    inputs: Annotated[list[str], typer.Argument(help="Image files/folders (or - for paths on stdin); with --table: "
                                                "score JSON files to merge.", show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", parser=common.output_path,
                                         help="Score file to write (.json); with --table: the "
                                         "table stem (writes .md, .csv and .png).", show_default=False)],
    metrics: Annotated[str, typer.Option("--metrics", help="Comma-separated metrics (the list under Metrics in this "
                                         "help); all-offline = every metric that needs no download.")
                       ] = DEFAULT_METRICS,
    metrics_short: Annotated[str | None, typer.Option("-m", hidden=True, show_default=False,
                                                         help="Deprecated spelling of --metrics.")] = None,
    ref: Annotated[Path | None, typer.Option("--ref", help="Clean reference images: one subfolder per concept, "
                                                "or a flat folder for all; paired metrics match by name.")] = None,
    csv: Annotated[Path | None, typer.Option("--csv", parser=common.output_path,
                                                     help="Also write the records and means as CSV.")] = None,
    group_by: Annotated[str, typer.Option("--group-by", help="Concepts: folder (first subfolder, or the flat "
                                          "folder's name), none, field:NAME (a cloak generate record field), or "
                                          "regex:PATTERN on the relative path.")] = "folder",
    class_name: Annotated[str | None, typer.Option("--class", help="Class word for clip-iqac and q "
                                                      "(e.g. person, dog).")] = None,
    prompt: Annotated[str | None, typer.Option("--prompt", help="clip: prompt for every image (default: each "
                                                  "image's prompt from the cloak generate manifest).")] = None,
    token: Annotated[str | None, typer.Option("--token", help="clip: token removed from the prompt (default: the "
                                                 "manifest's token).")] = None,
    label: Annotated[list[str] | None, typer.Option("--label", metavar="KEY=VALUE", help="Label stored in the "
                                                    "score file for --table (repeatable), e.g. poison=adm+.")] = None,
    dinov2_model: Annotated[str, typer.Option(help="dinov2 weights: Hub id, local folder, or tiny.")] =
    DINOV2_DEFAULT,
    clip_model: Annotated[str, typer.Option(help="CLIP weights for clip, clip-iqa, clip-iqac, liqe, q: Hub id, "
                                            "folder, or tiny.")] = CLIP_DEFAULT,
    clip_scale: Annotated[float, typer.Option(help="clip: CLIPScore weight w in w·max(cos, 0); 2.5 is Hessel et al.'s "
                                              "CLIP-S (paper 000's tables), 100 torchmetrics' scale.")] = CLIPSCORE_W,
    clip_prefix: Annotated[str, typer.Option(help="clip: text put before each prompt; Hessel et al.'s code uses "
                                             "'A photo depicts ' (default: none).")] = "",
    liqe_model: Annotated[str | None, typer.Option(help="liqe: LIQE CLIP weights as a transformers folder "
                                                      "(default: zero-shot with --clip-model).")] = None,
    lpips_net: Annotated[str, typer.Option(help="lpips backbone: alex, vgg, squeeze, or tiny (random backbone).")] =
    LPIPS_DEFAULT_NET,
    fid_features: Annotated[str, typer.Option(help="fid features: inception (torch-fidelity) or tiny.")] =
    FID_DEFAULT_FEATURES,
    arcface_model: Annotated[str | None, typer.Option(help="ism/ims: ArcFace ONNX file (e.g. antelopev2 "
                                                        "glintr100.onnx; needs onnxruntime), TorchScript file "
                                                        "(--trust-pickle), or tiny.")] = None,
    vggface_model: Annotated[str | None, typer.Option(help="ims: VGG-Face ONNX or TorchScript file, or tiny.")]
    = None,
    face_detector: Annotated[str | None, typer.Option(
        help="fdfr/ism/ims: haar (default, OpenCV, offline; no alignment) or a RetinaFace-style ONNX/TorchScript file "
             "returning (N, 15) boxes, scores and 5 landmarks, or a raw RetinaFace export (loc, conf, landms heads, "
             "biubug6/Pytorch_Retinaface; decoded here, recognized automatically): faces are then aligned to "
             "ArcFace's 112² template (the papers' pipeline; docs/score.md).")] = None,
    trust_pickle: common.TrustPickle = False,
    table: Annotated[bool, typer.Option("--table", help="Merge score files (the inputs) into a rows × cols table.")]
    = False,
    rows: Annotated[str | None, typer.Option(help="--table: label key for rows (e.g. poison).")] = None,
    cols: Annotated[str | None, typer.Option(help="--table: label key for columns (e.g. defense).")] = None,
    metric: Annotated[str | None, typer.Option(help="--table: metric shown (default: each file's first).")] = None,
    average_row: Annotated[str | None, typer.Option(help="--table: add a row averaging the rows, e.g. "
                                                       "'Psn Avg'.")] = None,
    average_exclude: Annotated[list[str] | None, typer.Option(help="--table: rows left out of the average "
                                                                 "(repeatable), e.g. clean.")] = None,
    recursive: common.Recursive = False,
    device: common.Device = "auto",
    batch_size: common.BatchSize = 8,
    max_pixels: common.MaxPixels = None,
    json_out: common.JsonOut = False,
    debug: common.Debug = False,
) -> None:
    """Score images: per-image records, per-concept means, then the dataset mean (paper 000's order) → a JSON file.

    Examples:  cloak score gen -r --ref clean --metrics dinov2,fid,clip -o scores.json --label poison=adm+ --label
    defense=szt ·  cloak score purified --ref clean --metrics psnr,ssim,lpips -o faithful.json --csv faithful.csv ·
    cloak score --table runs/*.json --rows poison --cols defense --average-row "Psn Avg" --average-exclude clean
    -o table1.md
    """
    flags = dict(locals())
    if metrics_short is not None:  # -m means --method (cloak purify); score's old -m still works, warned
        sys.stderr.write("cloak: warning: score -m is deprecated (-m means --method); use --metrics\n")
        flags["metrics"] = metrics_short
    from cloaklab.ops.commands.score import ScoreSettings

    settings = common.settings_from(ScoreSettings, flags, drop=("metrics_short",))
    common.execute("score", settings, inputs, output, json_out)


score.__doc__ = (score.__doc__ or "") + "\n\nMetrics:\n\n" + METRIC_LIST


def register(app: typer.Typer) -> None:
    app.command("score")(score)
