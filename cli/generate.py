"""``cloak generate``: seeded generation from a model, a TI embedding, a LoRA, or a DreamBooth pipeline folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cloaklab.ops.generate import DEFAULT_ETA, DEFAULT_GUIDANCE, DEFAULT_SCHEDULER, DEFAULT_STEPS, SCHEDULERS
from cloaklab.ops.prompts import DEFAULT_PROMPT_SET

from . import common

Scheduler = common.choices("Scheduler", list(SCHEDULERS))


@common.handle_errors
def generate(
    output: common.Output,
    prompts: Annotated[str, typer.Option(
        "--prompts", "-p", metavar="objects24|faces|FILE",
        help="objects24 (24 recontextualisation prompts, paper 000), faces ('a photo of {token} person', 'a DSLR "
             "portrait of {token} person'; papers 001/004), or a text file with one template per line (# comments).")
    ] = DEFAULT_PROMPT_SET,
    token: Annotated[str | None, typer.Option("--token", "-t", help="Replaces {token} in the templates (default: "
                                                 "the embedding's token with --embedding, else 'sks'). Add a class "
                                                 "word if wanted: --token 'sks dog'.")] = None,
    num_per_prompt: Annotated[int | None, typer.Option("--num-per-prompt", "-n", min=1,
                                                          help="Images per prompt (5 for the built-in sets, paper "
                                                          "000 §5.1.2; 1 for files).")] = None,
    model: common.Model = None,
    embedding: Annotated[Path | None, typer.Option("--embedding", help="Textual-inversion file "
                                                      "(learned_embeds.safetensors), loaded with diffusers' "
                                                      "load_textual_inversion.")] = None,
    lora: Annotated[Path | None, typer.Option("--lora", help="Folder (or file) with "
                                                 "pytorch_lora_weights.safetensors, loaded with diffusers' "
                                                 "load_lora_weights.")] = None,
    unet: Annotated[Path | None, typer.Option("--unet", help="A trained UNet folder replacing the model's "
                                                 "(train-db --save-trained-only writes OUT/unet).")] = None,
    text_encoder: Annotated[Path | None, typer.Option("--text-encoder", help="A trained text-encoder folder "
                                                         "replacing the model's (OUT/text_encoder).")] = None,
    lora_scale: Annotated[float | None, typer.Option("--lora-scale", help="LoRA strength (1.0).")] = None,
    steps: Annotated[int, typer.Option("--steps", min=1, help="Sampler steps (50; METHODS.md: 50-100).")] = \
    DEFAULT_STEPS,
    guidance: Annotated[float, typer.Option("--guidance", help="Classifier-free guidance scale g (7.5). With a "
                                            "negative prompt this is paper 001 Eq. 6 with w = g - 1.")] = \
    DEFAULT_GUIDANCE,
    negative_prompt: Annotated[str | None, typer.Option("--negative-prompt", help="Negative prompt "
                                                           "(replaces the empty unconditional prompt).")] = None,
    quality_negative: Annotated[bool, typer.Option("--quality-negative", help="DiffShortcut sampling (paper 001 "
                                                   "Eq. 6, Alg. 1): negative prompt '{neg-token}, noisy, abstract, "
                                                   "pattern, low quality' (+ --negative-prompt).")] = False,
    neg_token: Annotated[str | None, typer.Option("--neg-token", help="DiffShortcut negative token used in "
                                                     "training (e.g. 'UNKNOWN artifact masked'); prepended to the "
                                                     "quality negative prompt, and ', without NEG' is appended to "
                                                     "every prompt (paper 001 §4.2, DiffShortcut's infer).")] = None,
    scheduler: Annotated[Scheduler, typer.Option("--scheduler", help="Sampler: ddim (η=0), dpm "  # type: ignore
                                                 "(DPM-Solver++), pndm, euler, or the model's own.")] = \
    DEFAULT_SCHEDULER,
    eta: Annotated[float, typer.Option("--eta", help="DDIM η (0 = deterministic).")] = DEFAULT_ETA,
    resolution: Annotated[int | None, typer.Option("--resolution", help="Square output size in pixels (the "
                                                      "model's default: 512 for SD 1.5, 64 for tiny).")] = None,
    only: Annotated[list[str] | None, typer.Option("--only", help="Generate only these images, e.g. --only "
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
    flags = dict(locals())
    from cloaklab.ops.commands.generate import GenerateSettings

    common.execute("generate", common.settings_from(GenerateSettings, flags), None, output, json_out)


def register(app: typer.Typer) -> None:
    app.command("generate")(generate)
