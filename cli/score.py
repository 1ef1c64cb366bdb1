"""``cloak score``: metrics of generated or purified images against clean references, and result tables."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from cloaklab.ops.metrics import METRICS

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
    metrics: Annotated[str, typer.Option("--metrics", help="Comma-separated metrics (the list under Metrics in this help); "
                                         "all-offline = every metric that needs no download.")] = "psnr,ssim,rmse",
    metrics_short: Annotated[Optional[str], typer.Option("-m", hidden=True, show_default=False,
                                                         help="Deprecated spelling of --metrics.")] = None,
    ref: Annotated[Optional[Path], typer.Option("--ref", help="Clean reference images: one subfolder per concept, "
                                                "or a flat folder for all; paired metrics match by name.")] = None,
    csv_path: Annotated[Optional[Path], typer.Option("--csv", parser=common.output_path,
                                                     help="Also write the records and means as CSV.")] = None,
    group_by: Annotated[str, typer.Option("--group-by", help="Concepts: folder (first subfolder, or the flat "
                                          "folder's name), none, field:NAME (a cloak generate record field), or "
                                          "regex:PATTERN on the relative path.")] = "folder",
    class_name: Annotated[Optional[str], typer.Option("--class", help="Class word for clip-iqac and q "
                                                      "(e.g. person, dog).")] = None,
    prompt: Annotated[Optional[str], typer.Option("--prompt", help="clip: prompt for every image (default: each "
                                                  "image's prompt from the cloak generate manifest).")] = None,
    token: Annotated[Optional[str], typer.Option("--token", help="clip: token removed from the prompt (default: the "
                                                 "manifest's token).")] = None,
    label: Annotated[Optional[list[str]], typer.Option("--label", metavar="KEY=VALUE", help="Label stored in the "
                                                       "score file for --table (repeatable), e.g. poison=adm+.")] = None,
    dinov2_model: Annotated[str, typer.Option(help="dinov2 weights: Hub id, local folder, or tiny.")] =
    "facebook/dinov2-base",
    clip_model: Annotated[str, typer.Option(help="CLIP weights for clip, clip-iqa, clip-iqac, liqe, q: Hub id, "
                                            "folder, or tiny.")] = "openai/clip-vit-base-patch32",
    clip_scale: Annotated[float, typer.Option(help="clip: CLIPScore weight w in w·max(cos, 0); 2.5 is Hessel et al.'s "
                                              "CLIP-S (paper 000's tables), 100 torchmetrics' scale.")] = 2.5,
    clip_prefix: Annotated[str, typer.Option(help="clip: text put before each prompt; Hessel et al.'s code uses "
                                             "'A photo depicts ' (default: none).")] = "",
    liqe_model: Annotated[Optional[str], typer.Option(help="liqe: LIQE CLIP weights as a transformers folder "
                                                      "(default: zero-shot with --clip-model).")] = None,
    lpips_net: Annotated[str, typer.Option(help="lpips backbone: alex, vgg, squeeze, or tiny (random backbone).")] =
    "alex",
    fid_features: Annotated[str, typer.Option(help="fid features: inception (torch-fidelity) or tiny.")] =
    "inception",
    arcface_model: Annotated[Optional[str], typer.Option(help="ism/ims: ArcFace ONNX file (e.g. antelopev2 "
                                                        "glintr100.onnx; needs onnxruntime), TorchScript file "
                                                        "(--trust-pickle), or tiny.")] = None,
    vggface_model: Annotated[Optional[str], typer.Option(help="ims: VGG-Face ONNX or TorchScript file, or tiny.")]
    = None,
    face_detector: Annotated[Optional[str], typer.Option(
        help="fdfr/ism/ims: haar (default, OpenCV, offline; no alignment) or a RetinaFace-style ONNX/TorchScript file "
             "returning (N, 15) boxes, scores and 5 landmarks, or a raw RetinaFace export (loc, conf, landms heads, "
             "biubug6/Pytorch_Retinaface; decoded here, recognized automatically): faces are then aligned to "
             "ArcFace's 112² template (the papers' pipeline; docs/score.md).")] = None,
    trust_pickle: common.TrustPickle = False,
    table: Annotated[bool, typer.Option("--table", help="Merge score files (the inputs) into a rows × cols table.")]
    = False,
    rows: Annotated[Optional[str], typer.Option(help="--table: label key for rows (e.g. poison).")] = None,
    cols: Annotated[Optional[str], typer.Option(help="--table: label key for columns (e.g. defense).")] = None,
    metric: Annotated[Optional[str], typer.Option(help="--table: metric shown (default: each file's first).")] = None,
    average_row: Annotated[Optional[str], typer.Option(help="--table: add a row averaging the rows, e.g. "
                                                       "'Psn Avg'.")] = None,
    average_exclude: Annotated[Optional[list[str]], typer.Option(help="--table: rows left out of the average "
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
    import json

    if metrics_short is not None:  # --metrics means --method (cloak purify); score's old --metrics still works, warned
        sys.stderr.write("cloak: warning: score --metrics is deprecated (-m means --method); use --metrics\n")
        metrics = metrics_short

    from cloaklab.ops.errors import UsageError

    if table:
        from cloaklab.ops.score import merge_tables, write_table

        if not rows or not cols:
            raise UsageError("--table needs --rows KEY and --cols KEY (label keys of the score files)")
        merged = merge_tables([Path(p) for p in inputs], rows, cols, metric, average_row, average_exclude or ())
        paths = write_table(merged, output)
        sys.stderr.write(Path(paths[0]).read_text())
        if not any(path.suffix == ".png" for path in paths):
            from cloaklab.ops.extras import PLOT_SKIPPED

            sys.stderr.write(f"cloak: note: {PLOT_SKIPPED}\n")
        sys.stdout.write((json.dumps({"outputs": [str(p) for p in paths], **merged}) if json_out
                          else str(paths[0])) + "\n")
        raise typer.Exit(0)

    from cloaklab.ops.device import resolve_device
    from cloaklab.ops.io import check_output_file, collect_inputs
    from cloaklab.ops.manifest import package_versions
    from cloaklab.ops.metrics import parse_metrics
    from cloaklab.ops.score import References, check_group_by, is_score_csv, is_score_output, score_images, \
        write_result

    specs = parse_metrics(metrics)
    check_group_by(group_by)
    labels = {}
    for entry in label or []:
        key, sep, value = entry.partition("=")
        if not sep or not key:
            raise UsageError(f"--label {entry!r}: expected KEY=VALUE")
        labels[key.strip()] = value.strip()
    if output.exists() and output.is_dir():
        raise UsageError(f"--output {output} is a folder: give a .json file name")
    items, notes = collect_inputs(inputs, recursive, sys.stdin)
    ref_items = []
    if ref is not None:
        if not ref.exists():
            raise UsageError(f"--ref {ref}: not found")
        ref_items, _ = collect_inputs([str(ref)], True)
    protected = [item.path for item in [*items, *ref_items]]
    check_output_file(output, protected, "--output", owned=is_score_output)
    if csv_path is not None:
        check_output_file(csv_path, protected + [output], "--csv", owned=is_score_csv)
    references = None
    torch_device = resolve_device(device)
    with common.Reporter("score") as reporter:
        for note in notes:
            reporter.line(f"cloak: note: {note}")
        if ref is not None:
            references = References.load(ref_items, max_pixels or 2**27)
        options = {"device": torch_device, "dinov2_model": dinov2_model, "clip_model": clip_model,
                   "clip_scale": clip_scale, "clip_prefix": clip_prefix, "liqe_model": liqe_model,
                   "lpips_net": lpips_net, "fid_features": fid_features,
                   "arcface_model": arcface_model, "vggface_model": vggface_model, "face_detector": face_detector,
                   "trust_pickle": trust_pickle}
        result = score_images(items, references, specs, options, group_by=group_by, class_name=class_name,
                              prompt=prompt, token=token, batch_size=batch_size, max_pixels=max_pixels,
                              on_event=lambda kind, name, info: reporter.line(
                                  f"score: {name} ({info['seconds']:.2f} s)")
                              if kind == "done" and reporter.progress is None else reporter.event(kind, name, info))
        params = {"metrics": [s.name for s in specs], "ref": str(ref) if ref else None, "group_by": group_by,
                  "class": class_name, "prompt": prompt, "token": token,
                  **({"clip_scale": clip_scale, "clip_prefix": clip_prefix} if any(s.name == "clip" for s in specs)
                     else {}),
                  "backbones": {s.name: _backbone(s.name, options) for s in specs}}
        from cloaklab.ops.provenance import command_argv, shareable_cwd, shareable_path

        for row in result.get("images") or []:
            if row.get("path"):
                row["path"] = shareable_path(row["path"], output.parent)
        document = {"command": "score", "argv": command_argv(), "cwd": shareable_cwd(output.parent), "labels": labels,
                    "params": params,
                    "versions": package_versions(), "device": str(torch_device), **result}
        write_result(output, document, csv_path)
        _print_table(reporter, result)
        for item in result["rejected"]:
            reporter.line(f"  rejected {item['file']}: {item['reason']}")
    code = 3 if result["rejected"] else 0
    common.emit(output, {"output": str(output), "dataset": result["dataset"], "rejected": result["rejected"],
                         "exit_code": code}, json_out)
    raise typer.Exit(code)


def _backbone(name: str, options: dict) -> str | None:
    aligned = f" (aligned, detector {options['face_detector']})" if options.get("face_detector") not in (None, "haar") \
        else ""
    return {"dinov2": options["dinov2_model"], "clip": options["clip_model"], "clip-iqa": options["clip_model"],
            "clip-iqac": options["clip_model"], "liqe": options["liqe_model"] or options["clip_model"],
            "q": options["clip_model"], "lpips": options["lpips_net"], "fid": options["fid_features"],
            "ism": f"{options['arcface_model']}{aligned}", "ims": f"{options['arcface_model']}+"
            f"{options['vggface_model']}{aligned}",
            "fdfr": options.get("face_detector") or "opencv-haar-frontalface-default",
            "brisque": "brisque-bundled-svm"}.get(name)


def _print_table(reporter, result: dict) -> None:
    """Concept means and the dataset mean as a table on stderr."""
    from rich.table import Table

    grid = Table(title="cloak score (per concept, then dataset)")
    grid.add_column("concept")
    grid.add_column("images", justify="right")
    for name in result["metrics"]:
        grid.add_column(name, justify="right")

    def cells(entry: dict) -> list[str]:
        return ["" if entry.get(n) is None else f"{entry[n]:.4f}" for n in result["metrics"]]

    for concept, entry in result["concepts"].items():
        grid.add_row(concept, str(entry["images"]), *cells(entry))
    grid.add_row("[bold]dataset[/bold]", str(result["dataset"]["images"]), *cells(result["dataset"]))
    reporter.console.print(grid)


score.__doc__ = (score.__doc__ or "") + "\n\nMetrics:\n\n" + METRIC_LIST


def register(app: typer.Typer) -> None:
    app.command("score")(score)
