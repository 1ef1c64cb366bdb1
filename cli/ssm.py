"""``cloak ssm``: semantic sensitivity maps (paper 000 Eq. 6) and the timestep/spatial/frequency analyses."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import common

PROFILE_NAMES = ("loss", "grad", "mask-loss", "jpeg-hist", "spectrum")
Profile = common.choices("Profile", list(PROFILE_NAMES))
DEFAULT_TIMESTEPS = "100,200,300,400,500,600,700,800,1000"


@common.handle_errors
def ssm(
    inputs: common.Inputs,
    output: common.Output,
    prompt: Annotated[str, typer.Option("--prompt", help="Prompt the maps are conditioned on, e.g. 'a <R*> on the "
                                        "grass'.")] = "a photo of a <R*>",
    token: Annotated[Optional[list[str]], typer.Option("--token", help="Token or word of the prompt to map "
                                                       "(repeatable; default: every token of the prompt). A token "
                                                       "unknown to the tokenizer is added, initialised from "
                                                       "--init-word, unless --embedding provides it.")] = None,
    embedding: Annotated[Optional[Path], typer.Option("--embedding", help="Learned TI embedding "
                                                      "(learned_embeds.safetensors) for the token.")] = None,
    init_word: Annotated[str, typer.Option(help="Initial embedding of a new token without --embedding.")] = "object",
    timesteps: Annotated[Optional[str], typer.Option("--timesteps", help="Comma-separated timesteps (default: "
                                                     "100,200,…,800,1000 as paper 000 Fig. 3 for maps; 21 equally "
                                                     "spaced, 0…1000, for profiles as Fig. 4).")] = None,
    samples: Annotated[int, typer.Option("--samples", min=1, help="Draws of (random dictionary embedding, noise) "
                                         "averaged per map / per profile point.")] = 8,
    masks: Annotated[Optional[Path], typer.Option("--masks", help="Concept masks named like the images: adds "
                                                  "R_{n,M} (Eq. 16) to each map; needed by --profile mask-loss.")]
    = None,
    profile: Annotated[Optional[Profile], typer.Option("--profile", help="Run an analysis instead of maps: loss "  # type: ignore[valid-type]
                                                       "(Fig. 4), grad (Fig. 5), mask-loss (Fig. 6), jpeg-hist "
                                                       "(Fig. 7/12, needs --clean), spectrum (Fig. 13). mask-loss on "
                                                       "train_log.jsonl inputs plots the logged losses.")] = None,
    clean: Annotated[Optional[Path], typer.Option("--clean", help="Clean twins of the (poisoned) inputs, named "
                                                  "alike: a second series in the profiles.")] = None,
    quality: Annotated[int, typer.Option(help="JPEG quality for jpeg-hist and spectrum (SZT's 25).", min=1,
                                         max=100)] = 25,
    resolution: Annotated[Optional[int], typer.Option(help="Working resolution (default: the model's, 512 for "
                                                      "SD 1.5); images are resized and centre-cropped.")] = None,
    model: common.Model = None,
    trust_pickle: common.TrustPickle = False,
    recursive: common.Recursive = False,
    overwrite: common.Overwrite = False,
    shard: common.Shard = None,
    device: common.Device = "auto",
    dtype: common.Dtype = "auto",
    seed: common.Seed = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Timesteps per UNet call for maps (each "
                                            "call is batch × (1 + tokens) wide; results do not depend on it).")] = 4,
    max_pixels: common.MaxPixels = None,
    json_out: common.JsonOut = False,
    debug: common.Debug = False,
) -> None:
    """Semantic sensitivity maps: per image, token and timestep, E‖ε_θ(z_t,t,c) − ε_θ(z_t,t,c_Δn)‖²_ch (paper 000
    Eq. 6) → OUTPUT/<name>.npy (T × N × h × w), OUTPUT/<name>.png (timesteps × tokens grid), cloak.json (means,
    and R_{n,M} of Eq. 16 with --masks). With --profile: one analysis over the folder → profile-NAME.png + .json.

    Examples:  cloak ssm poisoned -o maps --prompt "a <R*> on the grass" --token '<R*>' --embedding
    ti/learned_embeds.safetensors --masks masks ·  cloak ssm poisoned -o prof --profile loss --clean clean ·
    cloak ssm poisoned -o prof --profile jpeg-hist --clean clean --quality 25 ·
    cloak ssm ti-clean/train_log.jsonl ti-adm/train_log.jsonl -o prof --profile mask-loss
    """
    import json

    from cloaklab.ops import diffusion
    from cloaklab.ops.device import resolve_device, resolve_dtype
    from cloaklab.ops.extras import PLOT_SKIPPED
    from cloaklab.ops.io import (check_outputs, check_output_location, collect_inputs, parse_shard, select_shard,
                                 shard_label)
    from cloaklab.ops.manifest import Manifest
    from cloaklab.ops.models import check_available, default_model, load_pipeline, model_info
    from cloaklab.ops.ssm import ensure_token, load_embedding, parse_timesteps
    from cloaklab.ops.ssm_run import run_maps, run_profile, working_resolution

    profile_name = common.value(profile) if profile is not None else None
    if profile_name == "mask-loss" and inputs and all(name.endswith(".jsonl") for name in inputs):
        from cloaklab.ops.ssm_run import run_train_log_profile

        output.mkdir(parents=True, exist_ok=True)
        data = run_train_log_profile([Path(name) for name in inputs], output)
        if data["png_skipped"]:
            sys.stderr.write(f"cloak: note: {PLOT_SKIPPED}\n")
        sys.stderr.write(f"ssm: profile mask-loss from {len(inputs)} training log(s) → {data['outputs'][-1]}\n")
        sys.stdout.write((json.dumps({"output": str(output), "outputs": data["outputs"], "exit_code": 0})
                          if json_out else str(output)) + "\n")
        raise typer.Exit(0)
    shard_spec = parse_shard(shard)
    check_output_location(inputs, output)
    items, notes = collect_inputs(inputs, recursive, sys.stdin)
    check_outputs(output, items)
    items = select_shard(items, shard_spec)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    model_name = model or default_model()
    check_available(model_name)
    pipe = load_pipeline(model_name, torch_device, torch_dtype, trust_pickle=trust_pickle)
    tokens = list(token or [])
    if embedding is not None:
        if len(tokens) < 1:
            from cloaklab.ops.errors import UsageError

            raise UsageError("--embedding needs --token (the token it is stored under, e.g. '<R*>')")
        load_embedding(pipe, embedding, tokens[0])
    for word in tokens:
        ensure_token(pipe, word, init_word)
    size = working_resolution(pipe, resolution)
    output.mkdir(parents=True, exist_ok=True)
    with common.Reporter("ssm") as reporter:
        for note in notes:
            reporter.line(f"cloak: note: {note}")
        if profile_name:
            chosen = parse_timesteps(timesteps, diffusion.num_train_timesteps(pipe.scheduler)) if timesteps else None
            data = run_profile(pipe, profile_name, items, output, prompt=prompt, token=tokens[0] if tokens else None,
                               clean=clean, masks=masks, samples=samples, seed=seed, resolution=size,
                               quality=quality, max_pixels=max_pixels, timesteps=chosen)
            manifest = Manifest(output, "ssm", {"profile": profile_name, "prompt": prompt, "tokens": tokens,
                                                "timesteps": data["timesteps"], "samples": samples,
                                                "resolution": size, "quality": quality,
                                                "clean": str(clean) if clean else None,
                                                "masks": str(masks) if masks else None,
                                                "embedding": str(embedding) if embedding else None,
                                                "model": model_name},
                                seed=seed, model=model_info(model_name).as_dict(), extra={"device": str(torch_device)})
            manifest.start_run()
            manifest.update(**{f"profile_{profile_name}": {"outputs": data["outputs"], "images": data["images"],
                                                           "rejected": data["rejected"]}})
            for name, reason in data["rejected"]:
                reporter.line(f"  rejected {name}: {reason}")
            if data["png_skipped"]:
                reporter.line(f"cloak: note: {PLOT_SKIPPED}")
            reporter.line(f"ssm: profile {profile_name} over {len(data['images'])} image(s) → {data['outputs'][-1]}")
            code = 3 if data["rejected"] else 0
            sys.stdout.write((json.dumps({"output": str(output), "outputs": data["outputs"], "exit_code": code})
                              if json_out else str(output)) + "\n")
            raise typer.Exit(code)
        steps = parse_timesteps(timesteps or DEFAULT_TIMESTEPS, diffusion.num_train_timesteps(pipe.scheduler))
        manifest = Manifest(output, "ssm", {"prompt": prompt, "tokens": tokens, "timesteps": steps,
                                            "samples": samples, "resolution": size, "init_word": init_word,
                                            "embedding": str(embedding) if embedding else None,
                                            "masks": str(masks) if masks else None, "model": model_name},
                            seed=seed, model=model_info(model_name).as_dict(),
                            extra={"device": str(torch_device), "shard": shard_label(shard_spec)})
        manifest.start_run()
        summary = run_maps(pipe, items, output, manifest, prompt=prompt, tokens=tokens, timesteps=steps,
                           samples=samples, seed=seed, resolution=size, masks=masks, overwrite=overwrite,
                           batch_timesteps=batch_size,
                           max_pixels=max_pixels, on_event=reporter.event)
        if summary["png_skipped"]:
            reporter.line(f"cloak: note: {PLOT_SKIPPED}")
        reporter.line(f"ssm: {len(summary['done'])} mapped, {len(summary['skipped'])} skipped (already done), "
                      f"{len(summary['rejected'])} rejected → {output}")
        for name, reason in summary["rejected"]:
            reporter.line(f"  rejected {name}: {reason}")
    code = 3 if summary["rejected"] else 0
    common.emit(output, {"output": str(output), "done": summary["done"], "skipped": summary["skipped"],
                         "rejected": [{"file": n, "reason": r} for n, r in summary["rejected"]], "exit_code": code},
                json_out)
    raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    app.command("ssm")(ssm)
