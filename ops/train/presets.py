"""Training vocabulary and published defaults, stdlib only so the CLI, the command settings and the attack registry
read them without importing torch: the Safe-Zone Training presets, the timestep samplers and mask modes, and the
defaults of the trainers (Textual Inversion, DreamBooth, LoRA). The trainers and ``ops.diffusion`` import them here.

Safe-Zone Training presets — one per column of paper 000 Table 1.

Each preset fills the SZT options of ``cloak train-ti`` (and ``train-db``); flags given explicitly override it.
  * ``nominal``   — plain TI: uniform t, no JPEG, no mask;
  * ``jpeg``      — JPEG quality 25 preprocessing (§5.2.4);
  * ``t600``      — t ~ U(600, 1000): high threshold ρ = 0.6 (§5.2.2);
  * ``lm``        — loss masking with the concept mask, no dilation (§4.5, App. I);
  * ``jpeg+t600``, ``jpeg+lm`` — the two-component ablations of Table 1;
  * ``szt``       — JPEG q25 + t ≥ 500 + LM with 16 px dilation at 512² (§5.2.4, App. J: "T500+LM-D16" + JPEG).
"""

from __future__ import annotations

from typing import Any

# Timestep samplers of paper 000 App. H (implemented by ops.diffusion.sample_timesteps) and the mask modes of App. I
# (ops.train.loop): none, lm = loss mask, im = masked input image, lim = both, zm = masked z_t.
TIMESTEP_SAMPLERS = ("uniform", "threshold-high", "threshold-low", "power", "tanh")
MASK_MODES = ("none", "lm", "im", "lim", "zm")

NOMINAL: dict[str, Any] = {"jpeg": None, "t_sampler": "uniform", "t_param": None, "mask_mode": "none", "dilate": 0}

PRESETS: dict[str, dict[str, Any]] = {
    "nominal": {},
    "jpeg": {"jpeg": 25},
    "t600": {"t_sampler": "threshold-high", "t_param": 0.6},
    "lm": {"mask_mode": "lm"},
    "jpeg+t600": {"jpeg": 25, "t_sampler": "threshold-high", "t_param": 0.6},
    "jpeg+lm": {"jpeg": 25, "mask_mode": "lm"},
    "szt": {"jpeg": 25, "t_sampler": "threshold-high", "t_param": 0.5, "mask_mode": "lm", "dilate": 16},
}


def resolve_preset(name: str | None, given: dict[str, Any]) -> dict[str, Any]:
    """The SZT settings of preset ``name`` (``None`` = nominal) with every non-``None`` value of ``given`` on top."""
    if name is not None and name not in PRESETS:
        from ..errors import UsageError

        raise UsageError(f"--preset {name!r}: choose one of {', '.join(PRESETS)}")
    settings = {**NOMINAL, **PRESETS[name or "nominal"]}
    settings.update({key: value for key, value in given.items() if value is not None})
    return settings


# ------------------------------------------------------------------------------------------ trainer defaults
# Textual Inversion as paper 000 trains it (§5.1.2: lr 5e-4 constant, no warm-up, 5000 steps, batch 1, the object
# templates) on the diffusers TI example (examples/textual_inversion/textual_inversion.py: AdamW weight decay 1e-2,
# TextualInversionDataset flip_p 0.5).
TEXTUAL_INVERSION: dict[str, Any] = {
    "token": "<R*>", "init_token": "object", "num_vectors": 1, "templates": "object", "steps": 5000, "lr": 5e-4,
    "warmup_steps": 0, "batch_size": 1, "weight_decay": 1e-2, "flip_p": 0.5, "grad_accumulation": 1,
    "checkpoint_every": 500, "snapshot_every": 500,
}
# DreamBooth with prior preservation as paper 001's released run trains it (DiffShortcut scripts/sub/train/full.sh:
# --train_text_encoder --train_batch_size=1 --with_prior_preservation --prior_loss_weight=1.0 --learning_rate=5e-7
# --num_class_images=200 --max_train_steps=1000; papers 001 A.1, 004 §4); class images by DDIM, 50 steps, CFG 7.5
# (the diffusers DreamBooth example). The set-level poisons' surrogate (ops.attacks.SET_DEFAULTS) starts from it.
DREAMBOOTH: dict[str, Any] = {
    "instance_prompt": "a photo of sks person", "class_prompt": "a photo of person", "steps": 1000, "lr": 5e-7,
    "batch_size": 1, "prior_weight": 1.0, "weight_decay": 1e-2, "max_grad_norm": 1.0, "train_text_encoder": True,
    "num_class_images": 200, "class_steps": 50, "class_guidance": 7.5,
}
# LoRA as paper 000 App. P: no prior preservation, UNet only; lr not stated there — diffusers' LoRA examples use
# 1e-4 to 5e-4.
LORA: dict[str, Any] = {**DREAMBOOTH, "lr": 1e-4, "batch_size": 2, "prior_weight": 0.0, "train_text_encoder": False}
