"""``cloak train-ti``: Textual Inversion with every Safe-Zone Training component of paper 000 as a flag or preset."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from cloaklab.ops.train.presets import PRESETS

from . import common

Preset = common.choices("Preset", list(PRESETS))
Sampler = common.choices("Sampler", ["uniform", "threshold-high", "threshold-low", "power", "tanh"])
MaskMode = common.choices("MaskMode", ["none", "lm", "im", "lim", "zm"])
SZT = "Safe-Zone Training (paper 000)"


@common.handle_errors
def train_ti(
    inputs: common.Inputs,
    output: common.Output,
    token: Annotated[str, typer.Option(help="The new placeholder token (must not exist in the tokenizer).")] = "<R*>",
    init_token: Annotated[str, typer.Option(help="A one-token word whose embedding initialises the new token.")]
    = "object",
    num_vectors: Annotated[int, typer.Option(min=1, help="Embedding rows for the token (paper 000: 1).")] = 1,
    templates: Annotated[str, typer.Option(
        metavar="object|style|FILE", help="Prompt templates: the TI paper's object or style set, or a text file of "
                                          "templates with {} for the token, one per line.")] = "object",
    preset: Annotated[Optional[Preset], typer.Option(  # type: ignore[valid-type]
        help=f"{SZT} preset = a column of Table 1: nominal, jpeg (q25), t600 (t>=600), lm (loss mask), jpeg+t600, "
             "jpeg+lm, szt (JPEG q25 + t>=500 + LM with 16 px dilation). Explicit flags override it.",
        rich_help_panel=SZT)] = None,
    jpeg: Annotated[Optional[int], typer.Option(min=1, max=100, metavar="Q", rich_help_panel=SZT,
                                                help="JPEG-compress training images at quality Q (SZT: 25).")] = None,
    jpeg_scale: Annotated[Optional[int], typer.Option(
        min=8, metavar="S", rich_help_panel=SZT,
        help="Apply that JPEG at short side S px (Pillow bicubic up, encode/decode, back; paper 000 compressed 512-px "
             "photos, so the toy grid's 64-px images use 512). Default: each file's own size. Ignored without JPEG.")]
    = None,
    t_sampler: Annotated[Optional[Sampler], typer.Option(  # type: ignore[valid-type]
        rich_help_panel=SZT, help="Timestep sampler (App. H): uniform; threshold-high U(rho,1); threshold-low "
                                  "U(0,rho); power p(t)~t^rho; tanh p(t)~tanh(rho(t-0.5))/2+0.5 (t in [0,1] x T).")]
    = None,
    t_param: Annotated[Optional[float], typer.Option(metavar="RHO", rich_help_panel=SZT,
                                                     help="rho of the sampler (t600: 0.6; szt: 0.5).")] = None,
    masks: Annotated[Optional[Path], typer.Option(rich_help_panel=SZT, help="Folder of concept masks (from `cloak "
                                                  "mask`): same relative name (.png) and size as each image.")] = None,
    mask_mode: Annotated[Optional[MaskMode], typer.Option(  # type: ignore[valid-type]
        rich_help_panel=SZT, help="App. I: lm = loss mask, im = masked input image, lim = both, zm = masked z_t "
                                  "(default lm when --masks is given).")] = None,
    dilate: Annotated[Optional[int], typer.Option(min=0, metavar="N", rich_help_panel=SZT,
                                                  help="Dilate masks by N px at a 512 training resolution, any "
                                                       "aspect ratio (max filter 2N'+1, N' = N·min(W,H)/512; "
                                                       "SZT: 16).")] = None,
    steps: Annotated[int, typer.Option("--steps", "--max-train-steps", min=1, help="Optimizer steps (paper 000: 5000; CustomConcept101: 2500).")]
    = 5000,
    lr: Annotated[float, typer.Option("--lr", "--learning-rate", help="Learning rate > 0, constant (paper 000: 5e-4).")] = 5e-4,
    warmup_steps: Annotated[int, typer.Option(min=0, help="Linear warm-up steps (paper 000: 0).")] = 0,
    weight_decay: Annotated[float, typer.Option(min=0.0, help="AdamW weight decay of the new token's rows (diffusers' "
                                                "textual_inversion.py --adam_weight_decay: 1e-2; 0 = plain Adam).")]
    = 1e-2,
    flip_p: Annotated[float, typer.Option(min=0.0, max=1.0, help="Probability of mirroring a training image left-right "
                                          "per sample (diffusers' TextualInversionDataset flip_p: 0.5; 0 = never). "
                                          "Drawn from the run's seed.")] = 0.5,
    grad_accumulation: Annotated[int, typer.Option("--grad-accumulation", "--gradient-accumulation-steps", min=1,
                                                   help="Gradient accumulation (App. O SDXL: 5).")] = 1,
    resolution: Annotated[Optional[int], typer.Option(help="Training size (default: the model's, e.g. 512 for "
                                                      "SD1.5, 64 for tiny).")] = None,
    mean_latents: Annotated[bool, typer.Option(help="Use the VAE posterior mean instead of a sample per step.")]
    = False,
    log_grad_by_t: Annotated[bool, typer.Option(help="Log the embedding-gradient norm per step and per timestep "
                                                "bin (grad_by_t.json; paper 000 Fig. 5/11).")] = False,
    checkpoint_every: Annotated[int, typer.Option(min=0, help="Checkpoint for --resume every N steps (0: only at "
                                                  "the end).")] = 500,
    snapshot_every: Annotated[int, typer.Option(min=0, help="Save an embedding snapshot every N steps (0: none).")]
    = 500,
    resume: Annotated[bool, typer.Option(help="Continue from the latest checkpoint in OUTPUT (bit-exact with the same "
                                              "seed and settings).")] = False,
    model: common.Model = None,
    trust_pickle: common.TrustPickle = False,
    recursive: common.Recursive = False,
    overwrite: common.Overwrite = False,
    device: common.Device = "auto",
    dtype: common.Dtype = "auto",
    seed: Annotated[int, typer.Option(help="Seed of the run: one generator draws the data order, latent samples, "
                                           "timesteps, noise and prompts (same seed = same embedding).")] = 0,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per optimizer step (paper 000: 1).")] = 1,
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
    """

    import torch

    from cloaklab.ops.device import resolve_device, resolve_dtype
    from cloaklab.ops.errors import UsageError
    from cloaklab.ops.io import check_outputs, check_output_location, collect_inputs
    from cloaklab.ops.manifest import Manifest
    from cloaklab.ops.models import check_available, default_model, load_pipeline, model_info, model_note, \
        native_resolution
    from cloaklab.ops.train.data import TEMPLATE_SETS, fill_templates, load_instance_images, load_templates
    from cloaklab.ops.train.loop import TrainConfig, prepare_run_folder, refuse_foreign_outputs, train
    from cloaklab.ops.train.presets import resolve_preset
    from cloaklab.ops.train.textual_inversion import EMBEDS_NAME, SNAPSHOT_DIR, TextualInversion

    szt = resolve_preset(common.value(preset), {"jpeg": jpeg, "t_sampler": common.value(t_sampler),
                                                "t_param": t_param, "mask_mode": common.value(mask_mode),
                                                "dilate": dilate})
    if masks is not None and mask_mode is None and szt["mask_mode"] == "none":
        szt["mask_mode"] = "lm"
    if szt["mask_mode"] != "none" and masks is None:
        raise UsageError(f"mask mode {szt['mask_mode']} (from --preset/--mask-mode) needs --masks DIR "
                         "(make them with `cloak mask IMAGES -o DIR`)")
    if masks is not None and not masks.is_dir():
        raise UsageError(f"--masks {masks}: not a folder")
    check_output_location(inputs, output)
    items, notes = collect_inputs(inputs, recursive, sys.stdin)
    check_outputs(output, items)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    model_name = model or default_model()
    check_available(model_name)  # a missing model: one line, and no output folder left behind
    resolution = resolution or native_resolution(model_name)
    record = model_info(model_name).as_dict()
    template_list = load_templates(templates)
    params = {"token": token, "init_token": init_token, "num_vectors": num_vectors,
              "templates": templates if templates in TEMPLATE_SETS  # a file's lines enter the run hash
              else {"file": templates, "lines": list(template_list)},
              "preset": common.value(preset), **szt, "jpeg_scale": jpeg_scale if szt["jpeg"] else None,
              "flip_p": flip_p, "weight_decay": weight_decay, "steps": steps, "lr": lr, "warmup_steps": warmup_steps,
              "grad_accumulation": grad_accumulation, "batch_size": batch_size, "resolution": resolution,
              "mean_latents": mean_latents, "masks": str(masks) if masks else None, "model": record,
              "inputs": [item.rel.as_posix() for item in items]}
    manifest = Manifest(output, "train-ti", params, seed=seed, model=record,
                        extra={"device": str(torch_device), "dtype": str(torch_dtype).replace("torch.", "")})
    reporter = common.Reporter("train-ti")
    reporter.header(model=model_name, device=torch_device, dtype=torch_dtype, size=resolution,
                    threads=common.RunOptions.threads)
    if model_note(model_name):
        reporter.line(f"cloak: note: {model_note(model_name)}")
    for note in notes:
        reporter.line(f"cloak: note: {note}")
    done = manifest.files.get(EMBEDS_NAME, {})
    if (not overwrite and not resume and done.get("status") == "done" and done.get("params_hash") == manifest.hash
            and (output / EMBEDS_NAME).exists()):
        reporter.line(f"train-ti: {output / EMBEDS_NAME} already trained with these settings (--overwrite retrains)")
        common.emit(output, {"output": str(output), "embeds": str(output / EMBEDS_NAME), "skipped": True}, json_out)
        raise typer.Exit(0)
    refuse_foreign_outputs(output, (EMBEDS_NAME,), owned=bool(done.get("status")))
    prepare_run_folder(output, resume=resume, overwrite=overwrite, extra=(SNAPSHOT_DIR,))
    manifest.start_run()

    pipe = load_pipeline(model_name, torch_device, torch_dtype, trust_pickle=trust_pickle)
    size = resolution
    for encoder in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
        if encoder is not None:
            encoder.to(dtype=torch.float32)  # the trained rows and their gradients stay in fp32
    rejected: list[tuple[str, str]] = []
    data = load_instance_images(items, size, jpeg_quality=szt["jpeg"],
                                jpeg_scale=jpeg_scale if szt["jpeg"] else None, mask_dir=masks, dilate=szt["dilate"],
                                max_pixels=max_pixels, rejected=rejected)
    for name, reason in rejected:
        reporter.line(f"cloak: rejected {name}: {reason}")
        manifest.record(name, status="rejected", error=reason)
    trainable = TextualInversion(pipe, token, init_token, num_vectors, size)
    prompts = fill_templates(template_list, token)
    config = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps,
                         grad_accumulation=grad_accumulation, seed=seed, t_sampler=szt["t_sampler"],
                         t_param=szt["t_param"], mask_mode=szt["mask_mode"], sample_latents=not mean_latents,
                         checkpoint_every=checkpoint_every, snapshot_every=snapshot_every,
                         log_grad_by_t=log_grad_by_t, weight_decay=weight_decay, flip_p=flip_p)
    rho = "" if szt["t_param"] is None else f" rho {szt['t_param']}"
    reporter.info(f"train-ti: {len(data)} image(s) at {size}px, {steps} steps, t-sampler {szt['t_sampler']}{rho}, "
                  f"mask {szt['mask_mode']}, jpeg {szt['jpeg'] or 'off'}"
                  f"{f' at {jpeg_scale}px' if szt['jpeg'] and jpeg_scale else ''}, dilate {szt['dilate']}")
    progress = common.StepProgress("train-ti", reporter,
                                   lambda record: f"loss {record['loss']:.4f} t {record['t'][0]}")
    with progress:
        result = train(pipe, trainable, data, prompts, config, output, resume=resume, on_progress=progress.update)
    if result.resumed_from is not None:
        reporter.line(f"train-ti: resumed from step {result.resumed_from}")
    manifest.record(EMBEDS_NAME, status="done", steps=result.steps_done, final_loss=result.final_loss,
                    resumed_from=result.resumed_from, seconds=round(result.seconds, 2), images=data.names,
                    mask_area=data.mask_area)
    reporter.line(f"train-ti: {result.steps_done} steps, final loss {result.final_loss:.4f} → {output / EMBEDS_NAME}")
    common.emit(output, {"output": str(output), "embeds": str(output / EMBEDS_NAME), "steps": result.steps_done,
                   "final_loss": result.final_loss, "resumed_from": result.resumed_from,
                   "rejected": [{"name": n, "reason": r} for n, r in rejected]}, json_out)
    raise typer.Exit(3 if rejected else 0)



def register(app: typer.Typer) -> None:
    app.command("train-ti")(train_ti)
