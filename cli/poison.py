"""``cloak poison``: add a protective perturbation (AdvDM, SDS, PhotoGuard, Mist, Anti-DreamBooth, InMark …)."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated

import typer

from cloaklab.ops.attacks import ARTIST_PRESET, ATTACKS, attack_names

from . import common

Attack = common.choices("Attack", attack_names())
ATTACK_LIST = "\n\n".join(f"{spec.name}{' (set-level)' if spec.set_level else ''}: {spec.summary}"
                          for spec in ATTACKS.values())
PRESET_TEXT = ", ".join(f"{key} {value}" for key, value in ARTIST_PRESET.items())


def _opt(help_text: str, **kwargs):
    return typer.Option(help=help_text, show_default=False, **kwargs)


@common.handle_errors
def poison(
    inputs: common.Inputs,
    output: common.Output,
    attack: Annotated[Attack | None, typer.Option("--attack", "-a", show_default=False,  # type: ignore[valid-type]
                                                  help="Attack (the list under Attacks in this help). Without it: "
                                                       f"the artist preset ({PRESET_TEXT}).")] = None,
    eps: Annotated[float | None, _opt("L∞ budget in /255 pixel units, 0 < eps <= 255 (16; Anti-DreamBooth family "
                                      "6.375, MetaCloak 11). Holds exactly on the saved PNG.", min=0)] = None,
    step_size: Annotated[float | None, _opt("PGD step in /255 units, 0 < step <= 255 (1).", min=0)] = None,
    steps: Annotated[int | None, _opt("PGD iterations (100; da 200).", min=0)] = None,
    random_start: Annotated[bool | None, typer.Option("--random-start/--no-random-start", show_default=False,
                                                         help="Start from a uniform draw in the ε-ball (on for "
                                                              "adm±, sds±, ea, mist as Mist v1; off for lf-*, "
                                                              "da).")] = None,
    t_range: Annotated[str | None, _opt("Timesteps LO,HI drawn uniformly, LO ≤ t < HI, 0 <= LO < HI <= 1000 (whole "
                                        "schedule).", metavar="LO,HI")] = None,
    prompt: Annotated[str | None, _opt("Prompt conditioning the UNet ('a photo').")] = None,
    target: Annotated[str | None, _opt("ea/mist/da/ace target: pattern (ours, high-contrast), gray, zero, "
                                          "or an image path (pattern).")] = None,
    lf_ratio: Annotated[float | None, _opt("lf-*/inmark: DCT low-frequency ratio η, 0 < η <= 1 (0.25).", min=0,
                                              max=1)] = None,
    fused_weight: Annotated[float | None, _opt("mist: weight of the AdvDM term, >= 0 (1e4).")] = None,
    mask: Annotated[Path | None, _opt("Perturb only inside this mask (white = perturb): one image for all "
                                         "inputs, or a folder of <name>.png masks as `cloak mask` writes.")] = None,
    robust: Annotated[str | None, _opt("EoT transforms inside the loss, comma-separated: jpeg "
                                          "(differentiable), resize, blur; 'none' to switch off the preset's.",
                                          metavar="LIST")] = None,
    eot_samples: Annotated[int, typer.Option(help="EoT draws averaged per step.", min=1)] = 1,
    jpeg_quality: Annotated[int | None, _opt("Fix the EoT JPEG quality (default random 50-90).", min=1,
                                                max=100)] = None,
    resolution: Annotated[int | None, typer.Option(help="Working resolution: short side in px (0-4096), aspect "
                                                           "kept, multiples of 8; 0 = native size. Default: the "
                                                           "model's own size (SD 1.x 512, SD 2.1-v 768, SDXL 1024, "
                                                           "toy/tiny 64). Photos longer than 8× their short side "
                                                           "are rejected.", min=0, show_default=False)] = None,
    native_size: Annotated[bool, typer.Option("--native-size/--working-size",
                                              help="Single-image attacks on photos larger than the working "
                                                   "resolution: optimize in the photo's own pixels through a "
                                                   "mimic's random resize (PIL bicubic/bilinear/Lanczos/box, "
                                                   "random crops); --working-size: optimize at the working size "
                                                   "and upsample the perturbation (lf-* and da always do).")] = True,
    native_crops: Annotated[float, typer.Option(help="--native-size: share of the resize draws that are random "
                                                     "crops (windows 95-100 % of the photo per side at a random "
                                                     "place), for mimics that random-crop.", min=0, max=1)] = 0.0,
    preview: Annotated[bool, typer.Option("--preview", help="Also write OUTPUT/previews/<name>.png: original | "
                                          "cloaked | amplified difference.")] = False,
    clean_dir: Annotated[Path | None, _opt("Set-level attacks: clean images of the same subject (set A).")] = None,
    param: Annotated[list[str] | None, typer.Option("--param", metavar="KEY=VALUE", show_default=False,
                                                    help="Any other method parameter (listed per attack in this "
                                                         "help), e.g. --param rounds=10 --param l2_eps=8.")] = None,
    param_short: Annotated[list[str] | None, typer.Option("-p", hidden=True, show_default=False,
                                                             help="Deprecated spelling of --param.")] = None,
    eval_draws: Annotated[int, typer.Option(help="Fixed (t, ε) draws measuring each file's loss at start and end "
                                                 "(0 = skip; single-image attacks).", min=0)] = 4,
    checkpointing: Annotated[bool, typer.Option("--checkpointing/--no-checkpointing", "--gradient-checkpointing",
                                                help="Gradient checkpointing in UNet/VAE (less GPU memory; "
                                                     "--gradient-checkpointing is the diffusers examples' name).")
                             ] = False,
    model: common.Model = None,
    trust_pickle: common.TrustPickle = False,
    recursive: common.Recursive = False,
    overwrite: common.Overwrite = False,
    shard: common.Shard = None,
    device: common.Device = "auto",
    dtype: common.Dtype = "auto",
    seed: common.Seed = 0,
    batch_size: Annotated[int | None, typer.Option("--batch-size", min=1, show_default=False,
                                                      help="Images per batch, same-size images only (1); "
                                                           "set-level attacks: the PGD minibatch (all images at "
                                                           "once, as Anti-DreamBooth).")] = None,
    max_pixels: common.MaxPixels = None,
    json_out: common.JsonOut = False,
    debug: common.Debug = False,
) -> None:
    """Protect images: every input becomes OUTPUT/<same name>.png with the same size, mode, orientation, alpha and
    ICC profile, within ε of the input on the saved bytes; per-file loss, L∞, L2, PSNR and SSIM go to cloak.json.

    \b
    Examples:
      cloak poison photos -o cloaked                      (artist preset)
      cloak poison photos -o out -a adm+ --eps 8 --steps 50
      cloak poison photos -o out -a ea --target gray --robust jpeg,resize
      cloak poison photos -o out -a sds- --mask masks/ --preview
      cloak poison faces -o out -a aspl --clean-dir faces_a --param rounds=20
      cloak poison photos -o out -a lf-adm+ --lf-ratio 0.25 --model toy
    """
    flags = dict(locals())
    import sys

    from cloaklab.ops.commands.poison import PoisonSettings

    if param_short:  # -p means --prompts (cloak generate); poison's -p still works, warned
        sys.stderr.write("cloak: warning: poison -p is deprecated (-p means --prompts); use --param\n")
        flags["param"] = [*(param or []), *param_short]
    common.execute("poison", common.settings_from(PoisonSettings, flags, drop=("param_short",)), inputs, output,
                   json_out)


poison.__doc__ = inspect.cleandoc(poison.__doc__ or "") + (
    "\n\nBudgets and steps are in /255 pixel units (public codes in [-1,1] units state twice the number). "
    "lf-<attack> runs any attack with the DCT low-frequency gradient mask (paper 004). Method parameters without a "
    "flag: --param KEY=VALUE.\n\nAttacks (published defaults):\n\n" + ATTACK_LIST + "\n\n"
    + "\n\n".join(f"{name} parameters: " + ", ".join(f"{k}={v}" for k, v in spec.defaults.items())
                  for name, spec in ATTACKS.items()))


def register(app: typer.Typer) -> None:
    app.command("poison")(poison)
