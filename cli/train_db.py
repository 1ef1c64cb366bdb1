"""``cloak train-db``: DreamBooth / LoRA training with Safe-Zone Training and DiffShortcut options."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from cloaklab.ops.train.presets import PRESETS

from . import common

Preset = common.choices("Preset", list(PRESETS))
TSampler = common.choices("TSampler", ["uniform", "threshold-high", "threshold-low", "power", "tanh"])
MaskMode = common.choices("MaskMode", ["none", "lm", "im", "lim", "zm"])
MixedPrecision = common.choices("MixedPrecision", ["no", "bf16", "fp16"])
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
                                                 "of *').")] = "a photo of sks person",
    class_prompt: Annotated[Optional[str], typer.Option("--class-prompt", help="Prompt of the prior-preservation "
                                                        "class images [default: 'a photo of person'].")] = None,
    neg_token: Annotated[Optional[str], typer.Option("--neg-token", help=NEG_HELP)] = None,
    lora: Annotated[Optional[int], typer.Option("--lora", metavar="RANK", min=1, help="Train rank-RANK LoRA "
                                                "adapters instead of the full UNet (paper 000 App. P: 4); writes "
                                                "pytorch_lora_weights.safetensors.")] = None,
    train_text_encoder: Annotated[Optional[bool], typer.Option("--train-text-encoder/--no-train-text-encoder",
                                                               help=TE_HELP, show_default=False)] = None,
    prior_weight: Annotated[Optional[float], typer.Option("--prior-weight", min=0.0, help="Prior-preservation "
                                                          "weight λ (1.0 for DreamBooth; 0 for --lora, as paper "
                                                          "000 App. P).")] = None,
    num_class_images: Annotated[int, typer.Option("--num-class-images", min=1, help="Class images generated once "
                                                  "by the base model (200, papers 001/004).")] = 200,
    class_dir: Annotated[Optional[Path], typer.Option("--class-dir", help="Cache folder for the class images "
                                                      "(reused and resumed; default OUTPUT/class_images).")] = None,
    class_steps: Annotated[int, typer.Option("--class-steps", min=1, help="DDIM steps per class image.")] = 50,
    class_guidance: Annotated[float, typer.Option("--class-guidance", help="CFG scale >= 0 for class images.")] = 7.5,
    steps: Annotated[int, typer.Option("--steps", "--max-train-steps", min=1, help="Optimizer steps (1000).")] = 1000,
    lr: Annotated[Optional[float], typer.Option("--lr", "--learning-rate", help="Learning rate > 0, constant (5e-7 DreamBooth, papers "
                                                "001/004; 1e-4 LoRA).")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", min=1, help="Instance images per step; as "
                                                      "many class images (DreamBooth 1 + 1 as paper 001's full.sh; "
                                                      "--lora 2).")] = None,
    grad_accumulation: Annotated[int, typer.Option("--grad-accumulation", "--gradient-accumulation-steps", min=1, help="Batches accumulated per "
                                                   "optimizer step (1).")] = 1,
    max_grad_norm: Annotated[float, typer.Option("--max-grad-norm", help="Gradient-norm clip >= 0 (1.0; 0 = off).")] = 1.0,
    weight_decay: Annotated[float, typer.Option("--weight-decay", help="AdamW weight decay >= 0 (1e-2).")] = 1e-2,
    resolution: Annotated[Optional[int], typer.Option("--resolution", help="Training size (the model's: 512 for "
                                                      "SD 1.5, 64 for tiny).")] = None,
    use_8bit_adam: Annotated[bool, typer.Option("--use-8bit-adam", help="bitsandbytes 8-bit AdamW (papers "
                                                "001/004; needs bitsandbytes + CUDA).")] = False,
    gradient_checkpointing: Annotated[bool, typer.Option("--gradient-checkpointing", help="Recompute activations "
                                                         "in backward (less memory, ~30 % slower).")] = False,
    mixed_precision: Annotated[MixedPrecision,  # type: ignore[valid-type]
                               typer.Option("--mixed-precision", help=MP_HELP)] = "no",
    save_trained_only: Annotated[bool, typer.Option("--save-trained-only", help="Full runs: save only the "
                                                    "trained parts (OUTPUT/unet, OUTPUT/text_encoder) instead of a "
                                                    "whole pipeline folder.")] = False,
    preset: Annotated[Optional[Preset],  # type: ignore[valid-type]
                      typer.Option("--preset", help="SZT preset (paper 000 Table 1); explicit flags override it.")
                      ] = None,
    jpeg: Annotated[Optional[int], typer.Option("--jpeg", min=1, max=100, help="JPEG-compress instance images at "
                                                "this quality first (SZT: 25).")] = None,
    t_sampler: Annotated[Optional[TSampler],  # type: ignore[valid-type]
                         typer.Option("--t-sampler", help="Instance timestep sampler (paper 000 App. H).")] = None,
    t_param: Annotated[Optional[float], typer.Option("--t-param", help="Sampler parameter ρ (threshold-high 0.5 "
                                                     "= t ≥ 500).")] = None,
    mask_mode: Annotated[Optional[MaskMode],  # type: ignore[valid-type]
                         typer.Option("--mask-mode", help="none, lm (loss mask), im, lim, zm (paper 000 App. I).")
                         ] = None,
    masks: Annotated[Optional[Path], typer.Option("--masks", help="Folder of concept masks (same names as the "
                                                  "images; `cloak mask`).")] = None,
    dilate: Annotated[Optional[int], typer.Option("--dilate", min=0, help="Mask dilation in px at a 512 training "
                                                  "resolution (N·R/512 at R), any aspect ratio (SZT: 16).")] = None,
    checkpoint_every: Annotated[int, typer.Option("--checkpoint-every", min=0, help="Resumable checkpoint every N "
                                                  "steps (last two kept; full runs: weights + Adam states).")] = 500,
    save_every: Annotated[int, typer.Option("--save-every", min=0, help="Also save weights every N steps under "
                                            "OUTPUT/snapshots (0 = only at the end).")] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the latest checkpoint in OUTPUT (same "
                                         "settings and images).")] = False,
    model: common.Model = None,
    trust_pickle: common.TrustPickle = False,
    recursive: common.Recursive = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Discard checkpoints of an earlier run in "
                                            "OUTPUT and start again.")] = False,
    device: common.Device = "auto",
    dtype: Annotated[str, typer.Option("--dtype", help="Compute dtype: fp32 = --mixed-precision no, fp16/bf16 = "
                                       "--mixed-precision fp16/bf16 (fp32 master weights either way); auto: "
                                       "--mixed-precision decides (default no).")] = "auto",
    seed: Annotated[int, typer.Option("--seed", help="Run seed: data order, timesteps, noise, LoRA init and the "
                                      "class images all follow from it.")] = 0,
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
    """

    from cloaklab.ops.device import resolve_device
    from cloaklab.ops.io import check_outputs, check_output_location, collect_inputs
    from cloaklab.ops.manifest import Manifest
    from cloaklab.ops.models import check_available, default_model, load_pipeline, model_info, model_note, \
        native_resolution
    from cloaklab.ops.train.dreambooth_train import DB_DEFAULTS, LORA_DEFAULTS, DreamBoothSettings
    from cloaklab.ops.train.dreambooth_train import LORA_WEIGHTS, PIPELINE_DIR, train_dreambooth
    from cloaklab.ops.train.loop import TrainConfig, refuse_foreign_outputs
    from cloaklab.ops.train.presets import resolve_preset

    mixed = common.value(mixed_precision)
    if dtype != "auto":
        from cloaklab.ops.errors import UsageError

        wanted = {"fp32": "no", "fp16": "fp16", "bf16": "bf16"}.get(dtype)
        if wanted is None:
            raise UsageError(f"--dtype {dtype!r}: choose auto, fp32, fp16 or bf16")
        if mixed not in ("no", wanted):
            raise UsageError(f"--dtype {dtype} contradicts --mixed-precision {mixed}; give one")
        mixed = wanted
    defaults = LORA_DEFAULTS if lora else DB_DEFAULTS
    weight = defaults["prior_weight"] if prior_weight is None else prior_weight
    train_text_encoder = defaults["train_text_encoder"] if train_text_encoder is None else train_text_encoder
    batch_size = defaults["batch_size"] if batch_size is None else batch_size
    szt = resolve_preset(common.value(preset), {"jpeg": jpeg, "t_sampler": common.value(t_sampler),
                                                "t_param": t_param, "mask_mode": common.value(mask_mode),
                                                "dilate": dilate})
    if szt["mask_mode"] != "none" and masks is None:
        from cloaklab.ops.errors import UsageError

        raise UsageError(f"--mask-mode {szt['mask_mode']} needs --masks DIR (make them with `cloak mask`)")
    check_output_location(inputs, output)
    items, notes = collect_inputs(inputs, recursive, sys.stdin)
    check_outputs(output, items)
    settings = DreamBoothSettings(
        instance_prompt=instance_prompt, class_prompt=class_prompt or ("a photo of person" if weight else None),
        neg_token=neg_token, lora_rank=lora, train_text_encoder=train_text_encoder, prior_weight=weight,
        num_class_images=num_class_images, class_steps=class_steps, class_guidance=class_guidance,
        gradient_checkpointing=gradient_checkpointing, mixed_precision=mixed,
        save_trained_only=save_trained_only)
    config = TrainConfig(steps=steps, batch_size=batch_size, lr=lr or defaults["lr"], weight_decay=weight_decay,
                         grad_accumulation=grad_accumulation, max_grad_norm=max_grad_norm or None, seed=seed,
                         t_sampler=szt["t_sampler"], t_param=szt["t_param"], mask_mode=szt["mask_mode"],
                         checkpoint_every=checkpoint_every, snapshot_every=save_every,
                         optimizer="adamw8bit" if use_8bit_adam else "adamw")
    config.check()
    torch_device = resolve_device(device)
    model_name = model or default_model()
    check_available(model_name)  # a missing model: one line, and no output folder left behind
    resolution = resolution or native_resolution(model_name)
    model_record = model_info(model_name).as_dict()
    train_prompts = settings.prompts()
    params = {"model": model_record, "instance_prompt": train_prompts[0], "class_prompt": train_prompts[1],
              "lora_rank": lora, "train_text_encoder": train_text_encoder, "prior_weight": weight,
              "num_class_images": num_class_images if weight else 0, "resolution": resolution,
              "mixed_precision": settings.mixed_precision, "jpeg": szt["jpeg"], "dilate": szt["dilate"],
              "masks": str(masks) if masks else None, **config.resume_key()}
    manifest = Manifest(output, "train-db", params, seed=seed, model=model_record,
                        extra={"device": str(torch_device), "resume": resume})
    refuse_foreign_outputs(output, (LORA_WEIGHTS, "unet", "text_encoder", PIPELINE_DIR),
                           owned=manifest.data.get("training") is not None)
    manifest.start_run()
    reporter = common.Reporter("train-db")
    reporter.header(model=model_name, device=torch_device, dtype="fp32" if settings.mixed_precision == "no"
                    else f"fp32 + {settings.mixed_precision} autocast", size=resolution,
                    threads=common.RunOptions.threads)
    if model_note(model_name):
        reporter.line(f"cloak: note: {model_note(model_name)}")
    for note in notes:
        reporter.line(f"cloak: note: {note}")
    pipe = load_pipeline(model_name, torch_device, None, trust_pickle=trust_pickle)
    rejected: list[tuple[str, str]] = []
    progress = common.StepProgress("train-db", reporter)

    def class_event(kind: str, name: str, info: dict) -> None:
        if kind == "start" and info["total"]:
            sys.stderr.write(f"train-db: generating {info['total']} class image(s) with the base model\n")

    with progress:
        result = train_dreambooth(pipe, items, output, settings, config, model_record=model_record,
                                  resolution=resolution, class_dir=class_dir, jpeg=szt["jpeg"], mask_dir=masks,
                                  dilate=szt["dilate"], resume=resume, overwrite=overwrite, rejected=rejected,
                                  on_progress=progress.update, on_event=class_event,
                                  **({"max_pixels": max_pixels} if max_pixels else {}))
    summary = {"output": str(output), "steps": result.steps_done, "final_loss": result.final_loss,
               "resumed_from": result.resumed_from, "files": result.files, "seconds": round(result.seconds, 2),
               "rejected": [{"file": name, "reason": why} for name, why in rejected]}
    manifest.update(training=summary)
    for name, why in rejected:
        sys.stderr.write(f"  rejected {name}: {why}\n")
    sys.stderr.write(f"train-db: {result.steps_done} steps, final loss {result.final_loss:.4f}, wrote "
                     f"{', '.join(result.files) or 'nothing new'} → {output}\n")
    common.emit(output, summary, json_out)
    raise typer.Exit(3 if rejected else 0)


def register(app: typer.Typer) -> None:
    app.command("train-db")(train_db)
