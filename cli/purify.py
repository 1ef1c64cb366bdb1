"""``cloak purify``: remove protective perturbations (or test how well they survive) — one method per run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cloaklab.ops.purify import PURIFIERS

from . import common

Method = common.choices("Method", list(PURIFIERS))
METHOD_HELP = "Purifier (see the method list below)."
METHOD_LIST = "\n\n".join(f"{spec.name}: {spec.summary}" for spec in PURIFIERS.values())


@common.handle_errors
def purify(
    inputs: common.Inputs,
    output: common.Output,
    method: Annotated[Method, typer.Option("--method", "-m", help=METHOD_HELP)] = "jpeg",  # type: ignore[valid-type]
    quality: Annotated[Optional[int], typer.Option(help="jpeg/webp: encoder quality 1-100 (75; SZT uses 25).",
                                                   min=1, max=100)] = None,
    kernel: Annotated[Optional[int], typer.Option(help="gaussian: odd kernel size (5).")] = None,
    sigma: Annotated[Optional[float], typer.Option(help="gaussian: blur sigma (from the kernel size).")] = None,
    resolution: Annotated[Optional[int], typer.Option(help="tvm: working resolution (64).")] = None,
    drop: Annotated[Optional[float], typer.Option(help="tvm: fraction of pixels dropped (0.02).")] = None,
    tv_weight: Annotated[Optional[float], typer.Option(help="tvm: TV weight λ (0.01).")] = None,
    iters: Annotated[Optional[int], typer.Option(help="tvm: optimizer steps (200; more = smoother, slower).")] = None,
    bilateral_iters: Annotated[Optional[int], typer.Option(help="adverse-cleaner: bilateral passes (64).")] = None,
    guided_iters: Annotated[Optional[int], typer.Option(help="adverse-cleaner: guided-filter passes (4).")] = None,
    radius: Annotated[Optional[int], typer.Option(help="adverse-cleaner: guided-filter radius (4).")] = None,
    eps: Annotated[Optional[float], typer.Option(help="adverse-cleaner: guided-filter eps, 0-255 scale (16).")] = None,
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
    cloak purify photos -o out -m gaussian --kernel 7 · chain methods with the shell (a && b).
    """
    import sys

    from cloaklab.ops.device import resolve_device
    from cloaklab.ops.io import check_output_location, collect_inputs, parse_shard, select_shard
    from cloaklab.ops.manifest import Manifest
    from cloaklab.ops.purify import get_purifier
    from cloaklab.ops.purify.run import purify_folder

    spec = get_purifier(common.value(method))
    params = spec.resolve({"quality": quality, "kernel": kernel, "sigma": sigma, "resolution": resolution,
                           "drop": drop, "tv_weight": tv_weight, "iters": iters, "bilateral_iters": bilateral_iters,
                           "guided_iters": guided_iters, "radius": radius, "eps": eps})
    shard_spec = parse_shard(shard)
    check_output_location(inputs, output)
    items, notes = collect_inputs(inputs, recursive, sys.stdin)
    items = select_shard(items, shard_spec)
    torch_device = resolve_device(device)
    model_record = None
    if spec.needs_model:
        from cloaklab.ops.models import default_model, model_info

        model_record = model_info(model or default_model()).as_dict()
    manifest = Manifest(output, "purify", {"method": spec.name, **params, **({"model": model_record} if model_record
                                                                            else {})},
                        seed=seed, model=model_record,
                        extra={"device": str(torch_device), "batch_size": batch_size, "shard": shard})
    with common.Reporter("purify") as reporter:
        for note in notes:
            reporter.line(f"cloak: note: {note}")
        summary = purify_folder(items, output, spec.name, params, manifest=manifest, seed=seed,
                                device=torch_device, batch_size=batch_size, overwrite=overwrite,
                                max_pixels=max_pixels, on_event=reporter.event)
        code = reporter.summary(summary, output, json_out)
    raise typer.Exit(code)


purify.__doc__ = (purify.__doc__ or "") + "\n\nMethods (published defaults):\n\n" + METHOD_LIST


def register(app: typer.Typer) -> None:
    app.command("purify")(purify)
