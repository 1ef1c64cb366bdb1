"""``cloak ssm``: semantic sensitivity maps (paper 000 Eq. 6) and the timestep/spatial/frequency analyses."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cloaklab.ops.commands.ssm import PROFILES, SsmSettings

from . import common

Profile = common.choices("Profile", list(PROFILES))


@common.handle_errors
def ssm(
    inputs: common.Inputs,
    output: common.Output,
    prompt: Annotated[str, typer.Option("--prompt", help="Prompt the maps are conditioned on, e.g. 'a <R*> on the "
                                        "grass'.")] = SsmSettings.prompt,
    token: Annotated[list[str] | None, typer.Option("--token", help="Token or word of the prompt to map "
                                                       "(repeatable; default: every token of the prompt). A token "
                                                       "unknown to the tokenizer is added, initialised from "
                                                       "--init-word, unless --embedding provides it.")] = None,
    embedding: Annotated[Path | None, typer.Option("--embedding", help="Learned TI embedding "
                                                      "(learned_embeds.safetensors) for the token.")] = None,
    init_word: Annotated[str, typer.Option(help="Initial embedding of a new token without --embedding.")] \
    = SsmSettings.init_word,
    timesteps: Annotated[str | None, typer.Option("--timesteps", help="Comma-separated timesteps (default: "
                                                     "100,200,…,800,1000 as paper 000 Fig. 3 for maps; 21 equally "
                                                     "spaced, 0…1000, for profiles as Fig. 4).")] = None,
    samples: Annotated[int, typer.Option("--samples", min=1, help="Draws of (random dictionary embedding, noise) "
                                         "averaged per map / per profile point.")] = SsmSettings.samples,
    masks: Annotated[Path | None, typer.Option("--masks", help="Concept masks named like the images: adds "
                                                  "R_{n,M} (Eq. 16) to each map; needed by --profile mask-loss.")]
    = None,
    profile: Annotated[Profile | None, typer.Option("--profile", help="Run an analysis instead of maps: loss "  # type: ignore[valid-type]
                                                       "(Fig. 4), grad (Fig. 5), mask-loss (Fig. 6), jpeg-hist "
                                                       "(Fig. 7/12, needs --clean), spectrum (Fig. 13). mask-loss on "
                                                       "train_log.jsonl inputs plots the logged losses.")] = None,
    clean: Annotated[Path | None, typer.Option("--clean", help="Clean twins of the (poisoned) inputs, named "
                                                  "alike: a second series in the profiles.")] = None,
    quality: Annotated[int, typer.Option(help="JPEG quality for jpeg-hist and spectrum (SZT's 25).", min=1,
                                         max=100)] = SsmSettings.quality,
    resolution: Annotated[int | None, typer.Option(help="Working resolution (default: the model's, 512 for "
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
                                            "call is batch × (1 + tokens) wide; results do not depend on it).")] \
    = SsmSettings.batch_size,
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
    flags = dict(locals())
    common.execute("ssm", common.settings_from(SsmSettings, flags), inputs, output, json_out)


def register(app: typer.Typer) -> None:
    app.command("ssm")(ssm)
