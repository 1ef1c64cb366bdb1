"""``cloak immunize``: IMMA model immunization against TI, DreamBooth and LoRA (paper 003)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import common

Against = common.choices("Against", ["ti", "db", "lora"])
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
                                       "together (IMMA: 1000).")] = 1000,
    inner_steps: Annotated[int, typer.Option(min=1, rich_help_panel=IMMA, help="Adaptation steps per cycle "
                                             "(IMMA: 1).")] = 1,
    outer_steps: Annotated[int, typer.Option(min=1, rich_help_panel=IMMA, help="Defence steps per cycle (IMMA: "
                                             "1).")] = 1,
    lr: Annotated[Optional[float], typer.Option(rich_help_panel=IMMA, help="Adaptation (inner) lr; default per "
                                                "method: ti 5e-4, db 5e-6, lora 5e-6.")] = None,
    defence_lr: Annotated[Optional[float], typer.Option(rich_help_panel=IMMA, help="Defence (outer) lr on the "
                                                        "attention weights; default ti 1e-6, db/lora 2e-5.")] = None,
    max_grad_norm: Annotated[Optional[float], typer.Option(rich_help_panel=IMMA, help="Gradient-norm clip of both "
                                                           "steps (default: db/lora 1.0, ti none).")] = None,
    clip: Annotated[bool, typer.Option("--clip/--no-clip", rich_help_panel=IMMA,
                                       help="--no-clip: never clip gradients, whatever --max-grad-norm says.")
                    ] = True,
    weight_decay: Annotated[float, typer.Option(rich_help_panel=IMMA, help="AdamW weight decay of both "
                                                "optimizers.")] = 1e-2,
    lora_rank: Annotated[int, typer.Option(min=1, rich_help_panel=IMMA, help="Rank of the attacker's LoRA "
                                           "(--against lora).")] = 4,
    cross_attention_only: Annotated[bool, typer.Option(rich_help_panel=IMMA, help="Immunize only cross-attention "
                                                       "(attn2) projections (default: self- and cross-attention "
                                                       "to_q/to_k/to_v/to_out).")] = False,
    token: Annotated[Optional[str], typer.Option(help="Identifier the attacker trains: the new TI token (default "
                                                 "'<R*>') or the DreamBooth rare word (default 'sks').")] = None,
    class_word: Annotated[list[str], typer.Option(help="Class of the concept: TI init token and DreamBooth "
                                                  "prompt word; repeat once per concept with --multi-concept.")]
    = ["object"],  # noqa: B006 - typer needs a list default
    instance_prompt: Annotated[Optional[str], typer.Option(help="db/lora prompt (default 'a photo of {token} "
                                                           "{class}').")] = None,
    resolution: Annotated[Optional[int], typer.Option(help="Training size (default: the model's; 512 for SD1.5, "
                                                      "64 for tiny).")] = None,
    mean_latents: Annotated[bool, typer.Option(help="Use the VAE posterior mean instead of a sample per step.")]
    = False,
    check_steps: Annotated[int, typer.Option(min=0, help="After immunizing, adapt the base and the immunized model "
                                             "alike for N steps on each concept and report both adaptation losses "
                                             "(higher = learnt worse; logs in OUTPUT/check/). 0: skip.")] = 0,
    checkpoint_every: Annotated[int, typer.Option(min=0, help="Checkpoint for --resume every N steps (0: only at "
                                                  "the end).")] = 250,
    resume: Annotated[bool, typer.Option(help="Continue from the latest checkpoint (bit-exact with the same seed "
                                              "and settings); finished concepts are skipped.")] = False,
    model: common.Model = None,
    trust_pickle: common.TrustPickle = False,
    recursive: common.Recursive = False,
    overwrite: common.Overwrite = False,
    device: common.Device = "auto",
    dtype: common.Dtype = "auto",
    seed: common.Seed = 0,
    batch_size: common.BatchSize = 1,
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
    """
    import shutil

    import torch

    from cloaklab.ops.device import resolve_device, resolve_dtype
    from cloaklab.ops.errors import UsageError
    from cloaklab.ops.io import check_output_location, check_outputs, collect_inputs
    from cloaklab.ops.manifest import Manifest
    from cloaklab.ops.models import check_available, default_model, load_pipeline, model_info, model_note, \
        native_resolution
    from cloaklab.ops.train.data import load_instance_images
    from cloaklab.ops.train.immunize import (IMMUNIZED_NAME, ImmunizeConfig, adapted_loss, apply_attention_state,
                                             attention_state, immunize as run_stage, load_attention_state,
                                             save_attention_state)
    from cloaklab.ops.train.loop import prepare_run_folder

    method = common.value(against)
    check_output_location(inputs, output)
    groups = [[raw] for raw in inputs] if multi_concept else [list(inputs)]
    concepts = []
    all_notes: list[str] = []
    for group in groups:
        items, notes = collect_inputs(group, recursive, sys.stdin)
        check_outputs(output, items)
        all_notes += notes
        if not items:
            raise UsageError(f"no images in {' '.join(group)}")
        name = Path(group[0]).stem or "concept" if len(group) == 1 and group[0] != "-" else "concept"
        concepts.append((name, items))
    if len(class_word) not in (1, len(concepts)):
        raise UsageError(f"--class-word given {len(class_word)} times for {len(concepts)} concepts: give it once, "
                         "or once per concept")
    words = class_word * len(concepts) if len(class_word) == 1 else list(class_word)
    token = token or ("<R*>" if method == "ti" else "sks")
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    model_name = model or default_model()
    check_available(model_name)  # a missing model: one line, and no output folder left behind
    resolution = resolution or native_resolution(model_name)
    record = model_info(model_name).as_dict()
    config = ImmunizeConfig(against=method, steps=steps, inner_steps=inner_steps, outer_steps=outer_steps, lr=lr,
                            defence_lr=defence_lr, max_grad_norm=max_grad_norm, clip=clip,
                            batch_size=batch_size, weight_decay=weight_decay, lora_rank=lora_rank,
                            cross_attention_only=cross_attention_only, sample_latents=not mean_latents, seed=seed,
                            checkpoint_every=checkpoint_every).resolved()
    config.check()
    params = {"against": method, "steps": steps, "inner_steps": inner_steps, "outer_steps": outer_steps,
              "lr": config.lr, "defence_lr": config.defence_lr, "max_grad_norm": config.max_grad_norm,
              "weight_decay": weight_decay, "lora_rank": lora_rank, "cross_attention_only": cross_attention_only,
              "token": token, "class_words": words, "instance_prompt": instance_prompt, "resolution": resolution,
              "mean_latents": mean_latents, "batch_size": batch_size, "model": record,
              "concepts": [[n, [i.rel.as_posix() for i in its]] for n, its in concepts]}
    manifest = Manifest(output, "immunize", params, seed=seed, model=record,
                        extra={"device": str(torch_device), "dtype": str(torch_dtype).replace("torch.", "")})
    reporter = common.Reporter("immunize")
    reporter.header(model=model_name, device=torch_device, dtype=torch_dtype, size=resolution,
                    threads=common.RunOptions.threads)
    if model_note(model_name):
        reporter.line(f"cloak: note: {model_note(model_name)}")
    for note in all_notes:
        reporter.line(f"cloak: note: {note}")
    stage_dirs = [output if len(concepts) == 1 else output / "stages" / f"{i + 1:02d}-{name}"
                  for i, (name, _) in enumerate(concepts)]
    final = output / IMMUNIZED_NAME
    pipeline_dir = output / "pipeline"
    done = manifest.files.get("pipeline", {})
    if (not overwrite and done.get("status") == "done" and done.get("params_hash") == manifest.hash
            and final.exists() and (pipeline_dir / "model_index.json").exists()):
        reporter.line(f"immunize: {pipeline_dir} already immunized with these settings (--overwrite redoes it)")
        common.emit(output, {"output": str(output), "pipeline": str(pipeline_dir), "weights": str(final),
                       "skipped": True}, json_out)
        raise typer.Exit(0)
    if (pipeline_dir.is_symlink() or (pipeline_dir.exists() and not done.get("status"))
            or (final.exists() and not done.get("status"))):
        raise UsageError(f"{pipeline_dir} or {final} exists and was not written by cloak (its manifest has no "
                         "record of it): move it away or choose another --output")
    for folder in stage_dirs:
        prepare_run_folder(folder, resume=resume, overwrite=overwrite)
    manifest.start_run()

    pipe = load_pipeline(model_name, torch_device, torch_dtype, trust_pickle=trust_pickle)
    size = resolution
    state = None
    rejected: list[tuple[str, str]] = []
    summary = []
    reporter.line(f"immunize: against {method}, {len(concepts)} concept(s), {steps} steps each ({inner_steps} "
                  f"inner : {outer_steps} outer), lr {config.lr:g}, defence lr {config.defence_lr:g}")
    for index, ((name, items), folder, word) in enumerate(zip(concepts, stage_dirs, words)):
        stage_file = folder / IMMUNIZED_NAME if len(concepts) > 1 else folder / "stage.safetensors"
        key = f"stages/{index + 1:02d}-{name}"
        previous = manifest.files.get(key, {})
        if (not overwrite and previous.get("status") == "done" and previous.get("params_hash") == manifest.hash
                and stage_file.exists()):
            state = load_attention_state(stage_file)
            reporter.line(f"immunize: concept {name} already done (skipped)")
            summary.append({"concept": name, "skipped": True})
            continue
        stage_rejected: list[tuple[str, str]] = []
        data = load_instance_images(items, size, max_pixels=max_pixels, rejected=stage_rejected)
        for bad, reason in stage_rejected:
            reporter.line(f"cloak: rejected {bad}: {reason}")
            manifest.record(bad, status="rejected", error=reason)
        rejected += stage_rejected
        progress = common.StepProgress(f"immunize {name}", reporter,
                                       lambda record: f"{record['phase']} loss {record['loss']:.4f}")
        with progress:
            result = run_stage(pipe, data, config, folder, token=token, class_word=word,
                               instance_prompt=instance_prompt, init_state=state, resume=resume,
                               on_progress=progress.update)
        state = result.state
        save_attention_state(state, stage_file, {"against": method, "concept": name, "model": str(record["name"])})
        manifest.record(key, status="done", steps=result.steps_done, resumed_from=result.resumed_from,
                        inner_loss=result.inner_loss, outer_loss=result.outer_loss,
                        seconds=round(result.seconds, 2), images=data.names,
                        weights=stage_file.relative_to(output).as_posix())
        reporter.line(f"immunize: concept {name}: {result.steps_done} steps, last adaptation loss "
                      f"{result.inner_loss:.4f}, last defence loss {result.outer_loss:.4f}"
                      + (f" (resumed from step {result.resumed_from})" if result.resumed_from is not None else ""))
        summary.append({"concept": name, "steps": result.steps_done, "inner_loss": result.inner_loss,
                        "outer_loss": result.outer_loss, "resumed_from": result.resumed_from})

    from cloaklab.ops.train import distributed

    if not distributed.is_main():  # data-parallel: rank 0 writes the immunized pipeline and runs the check alone
        raise typer.Exit(3 if rejected else 0)
    base = attention_state(pipe.unet)
    changed = sum(not torch.equal(base[name], value) for name, value in state.items())
    save_attention_state(state, final, {"against": method, "model": str(record["name"]),
                                        "concepts": ",".join(name for name, _ in concepts)})
    apply_attention_state(pipe.unet, state)
    temporary = output / "pipeline.tmp"
    shutil.rmtree(temporary, ignore_errors=True)
    pipe.save_pretrained(str(temporary), safe_serialization=True)
    shutil.rmtree(pipeline_dir, ignore_errors=True)
    temporary.replace(pipeline_dir)
    checks = []
    for (name, items), word in zip(concepts if check_steps else [], words):
        data = load_instance_images(items, size, max_pixels=max_pixels, rejected=[])
        losses = {}
        for label, weights in (("base", base), ("immunized", state)):
            losses[label] = adapted_loss(pipe, weights, data, method, output / "check" / name / label,
                                         steps=check_steps, lr=config.lr, token=token, class_word=word,
                                         instance_prompt=instance_prompt, lora_rank=lora_rank, seed=seed)
        checks.append({"concept": name, "steps": check_steps, **losses})
        reporter.line(f"immunize: check {name}: adaptation loss after {check_steps} {method} steps: base "
                      f"{losses['base']:.4f}, immunized {losses['immunized']:.4f}")
    manifest.record("pipeline", status="done", weights=IMMUNIZED_NAME, tensors=len(state), changed=changed,
                    check=checks)
    reporter.line(f"immunize: {changed}/{len(state)} attention tensors changed → {pipeline_dir} "
                  f"(use --model {pipeline_dir})")
    common.emit(output, {"output": str(output), "pipeline": str(pipeline_dir), "weights": str(final),
                   "concepts": summary, "check": checks,
                   "rejected": [{"name": n, "reason": r} for n, r in rejected]}, json_out)
    raise typer.Exit(3 if rejected else 0)



def register(app: typer.Typer) -> None:
    app.command("immunize")(immunize)
