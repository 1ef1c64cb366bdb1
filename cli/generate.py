"""``cloak generate``: seeded generation from a model, a TI embedding, a LoRA, or a DreamBooth pipeline folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from . import common

SCHEDULER_NAMES = ["ddim", "dpm", "pndm", "euler", "model"]  # ops.generate.SCHEDULERS (kept torch-free here)
Scheduler = common.choices("Scheduler", SCHEDULER_NAMES)


@common.handle_errors
def generate(
    output: common.Output,
    prompts: Annotated[str, typer.Option(
        "--prompts", "-p", metavar="objects24|faces|FILE",
        help="objects24 (24 recontextualisation prompts, paper 000), faces ('a photo of {token} person', 'a DSLR "
             "portrait of {token} person'; papers 001/004), or a text file with one template per line (# comments).")
    ] = "objects24",
    token: Annotated[Optional[str], typer.Option("--token", "-t", help="Replaces {token} in the templates (default: "
                                                 "the embedding's token with --embedding, else 'sks'). Add a class "
                                                 "word if wanted: --token 'sks dog'.")] = None,
    num_per_prompt: Annotated[Optional[int], typer.Option("--num-per-prompt", "-n", min=1,
                                                          help="Images per prompt (5 for the built-in sets, paper "
                                                          "000 §5.1.2; 1 for files).")] = None,
    model: common.Model = None,
    embedding: Annotated[Optional[Path], typer.Option("--embedding", help="Textual-inversion file "
                                                      "(learned_embeds.safetensors), loaded with diffusers' "
                                                      "load_textual_inversion.")] = None,
    lora: Annotated[Optional[Path], typer.Option("--lora", help="Folder (or file) with "
                                                 "pytorch_lora_weights.safetensors, loaded with diffusers' "
                                                 "load_lora_weights.")] = None,
    unet: Annotated[Optional[Path], typer.Option("--unet", help="A trained UNet folder replacing the model's "
                                                 "(train-db --save-trained-only writes OUT/unet).")] = None,
    text_encoder: Annotated[Optional[Path], typer.Option("--text-encoder", help="A trained text-encoder folder "
                                                         "replacing the model's (OUT/text_encoder).")] = None,
    lora_scale: Annotated[Optional[float], typer.Option("--lora-scale", help="LoRA strength (1.0).")] = None,
    steps: Annotated[int, typer.Option("--steps", min=1, help="Sampler steps (50; METHODS.md: 50-100).")] = 50,
    guidance: Annotated[float, typer.Option("--guidance", help="Classifier-free guidance scale g (7.5). With a "
                                            "negative prompt this is paper 001 Eq. 6 with w = g - 1.")] = 7.5,
    negative_prompt: Annotated[Optional[str], typer.Option("--negative-prompt", help="Negative prompt "
                                                           "(replaces the empty unconditional prompt).")] = None,
    quality_negative: Annotated[bool, typer.Option("--quality-negative", help="DiffShortcut sampling (paper 001 "
                                                   "Eq. 6, Alg. 1): negative prompt '{neg-token}, noisy, abstract, "
                                                   "pattern, low quality' (+ --negative-prompt).")] = False,
    neg_token: Annotated[Optional[str], typer.Option("--neg-token", help="DiffShortcut negative token used in "
                                                     "training (e.g. 'UNKNOWN artifact masked'); prepended to the "
                                                     "quality negative prompt, and ', without NEG' is appended to "
                                                     "every prompt (paper 001 §4.2, DiffShortcut's infer).")] = None,
    scheduler: Annotated[Scheduler, typer.Option("--scheduler", help="Sampler: ddim (η=0), dpm "  # type: ignore
                                                 "(DPM-Solver++), pndm, euler, or the model's own.")] = "ddim",
    eta: Annotated[float, typer.Option("--eta", help="DDIM η (0 = deterministic).")] = 0.0,
    resolution: Annotated[Optional[int], typer.Option("--resolution", help="Square output size in pixels (the "
                                                      "model's default: 512 for SD 1.5, 64 for tiny).")] = None,
    only: Annotated[Optional[list[str]], typer.Option("--only", help="Generate only these images, e.g. --only "
                                                      "p03_i002 (repeatable); their seeds are the same as in a "
                                                      "full run.")] = None,
    trust_pickle: common.TrustPickle = False,
    overwrite: common.Overwrite = False,
    shard: common.Shard = None,
    device: common.Device = "auto",
    dtype: common.Dtype = "auto",
    seed: Annotated[int, typer.Option("--seed", help="Run seed; image K of prompt J is seeded from (seed, J, K), "
                                      "whatever the batch size or shard.")] = 0,
    batch_size: common.BatchSize = 1,
    json_out: common.JsonOut = False,
    debug: common.Debug = False,
) -> None:
    """Generate images: OUTPUT/p{J:02d}_i{K:03d}.png for image K of prompt J (0-based), seeded from (seed, J, K).

    cloak.json records per file the prompt (token filled in), template, token, seed, indices, negative prompt and
    sampler settings. Reruns skip finished images; delete one (or use --only) to regenerate it alone.

    Examples:  cloak generate -o gen --model tiny ·
    cloak generate -o gen --embedding ti/learned_embeds.safetensors --prompts objects24 ·
    cloak generate -o gen --model db_out/pipeline --prompts faces --token sks --quality-negative
    --neg-token "UNKNOWN artifact masked" · cloak generate -o gen --lora lora_out -t "*"
    """
    import sys

    from cloaklab.ops.device import resolve_device, resolve_dtype
    from cloaklab.ops.errors import UsageError
    from cloaklab.ops.generate import artifact_digest, embedding_token, load_generation_pipeline, plan_jobs
    from cloaklab.ops.generate import generate_folder
    from cloaklab.ops.io import parse_shard, shard_label
    from cloaklab.ops.manifest import Manifest
    from cloaklab.ops.models import check_available, default_model, model_info, model_note, native_resolution
    from cloaklab.ops.prompts import DEFAULT_NUM_PER_PROMPT, DEFAULT_TOKEN, load_prompt_templates
    from cloaklab.ops.prompts import quality_negative_prompt

    if neg_token and not quality_negative:
        raise UsageError("--neg-token only matters with --quality-negative: add it, or put the token in "
                         "--negative-prompt")
    templates = load_prompt_templates(prompts)
    count = num_per_prompt or DEFAULT_NUM_PER_PROMPT.get(prompts, 1)
    negative = quality_negative_prompt(neg_token, negative_prompt) if quality_negative else negative_prompt
    shard_spec = parse_shard(shard)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    model_name = model or default_model()
    check_available(model_name)  # a missing model: one line, and no output folder left behind
    resolution = resolution or native_resolution(model_name)
    token = token or (embedding_token(embedding) if embedding and embedding.suffix == ".safetensors" else None) \
        or DEFAULT_TOKEN
    jobs = plan_jobs(templates, token, count, seed, negative, without=neg_token if quality_negative else None)
    if only:
        wanted = {name if name.endswith(".png") else f"{name}.png" for name in only}
        unknown = wanted - {job.name for job in jobs}
        if unknown:
            raise UsageError(f"--only: no such image in this plan ({len(templates)} prompts × {count}): "
                             f"{', '.join(sorted(unknown))}")
        jobs = [job for job in jobs if job.name in wanted]
    if shard_spec:
        index, total = shard_spec
        jobs = [job for position, job in enumerate(jobs) if position % total == index - 1]
    pipe, _ = load_generation_pipeline(model_name, torch_device, torch_dtype, embedding=embedding, token=token,
                                       lora=lora, scheduler=common.value(scheduler), unet=unet,
                                       text_encoder=text_encoder, trust_pickle=trust_pickle)
    settings = {"steps": steps, "guidance": guidance, "height": resolution, "width": resolution, "eta": eta,
                "lora_scale": lora_scale}
    model_record = model_info(model_name).as_dict()
    params = {"model": model_record, "embedding": artifact_digest(embedding), "lora": artifact_digest(lora),
              "unet": artifact_digest(unet), "text_encoder": artifact_digest(text_encoder),
              "scheduler": common.value(scheduler), "dtype": str(torch_dtype), **settings}
    manifest = Manifest(output, "generate", params, seed=seed, model=model_record,
                        extra={"device": str(torch_device), "batch_size": batch_size, "shard": shard_label(shard_spec),
                               "prompts": prompts, "num_per_prompt": count, "token": token})
    with common.Reporter("generate") as reporter:
        reporter.header(model=model_name, device=torch_device, dtype=torch_dtype, size=resolution,
                        threads=common.RunOptions.threads)
        if model_note(model_name):
            reporter.line(f"cloak: note: {model_note(model_name)}")
        summary = generate_folder(pipe, jobs, output, manifest, settings=settings, batch_size=batch_size,
                                  overwrite=overwrite, on_event=reporter.event)
        code = reporter.summary(summary, output, json_out)
    sys.stdout.flush()
    raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    app.command("generate")(generate)
