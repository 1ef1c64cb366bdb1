"""Protective perturbations (``cloak poison --attack NAME``): one small module each over the shared PGD engine.

This registry is stdlib-only so the CLI can list attacks without importing torch. Budgets and step sizes are in
pixel units on the 0-255 scale everywhere (``eps=16`` means 16/255 of the [0, 1] range; public codes that work in
[-1, 1] units state 2× the number for the same budget: their 0.05 is 6.375/255 here).

Module contract (``spec.load()`` returns the module; :mod:`.engine` has the shared PGD pieces):

* single-image attacks (``set_level=False``) expose
  ``attack(images, *, models, generators, **params, **options) -> engine.PGDResult`` on float ``(B, 3, H, W)``
  batches in [0, 1]. ``models`` is an :class:`engine.AttackModels`; ``generators`` one ``torch.Generator`` per
  image (batching never changes an image's random draws); ``params`` are the spec's defaults after user overrides,
  minus the model-level ones (``prompt``, ``t_range``, which configure ``models``), plus ``spec.fixed``;
  ``options`` are the engine's (``mask`` ``(B,1,H,W)``, ``eot``, ``eot_samples``, ``grad_transform``,
  ``delta_transform``, ``on_step``) and must be passed on to :func:`engine.pgd`. Targeted attacks also get
  ``targets`` ``(B, 3, H, W)`` in [0, 1] (built by :func:`.ea.make_target` from ``--target``).
* set-level attacks (``set_level=True``) expose
  ``attack_set(images, *, models, generators, clean_images=None, progress=None, **params, **options)
  -> list[engine.PGDResult]`` where ``images`` is the whole protected folder as a list of ``(3, H, W)`` tensors at
  the working resolution (sizes may differ; group or resize as the method needs, and map back), ``generators``
  one per image, ``clean_images`` the optional set A (``--clean-dir``, same form, or ``None``), ``progress(text)``
  reports rounds, ``masks`` a list of ``(1, H, W)`` tensors or ``None``, ``batch_size`` the user's
  ``--batch-size``, and ``options`` as above (without ``mask``).
  Results come back in the same order and shapes (each ``PGDResult`` with a batch of one).

``lf-<attack>`` names are derived on demand (:func:`get_attack`): the base attack with its gradient projected on the
low-frequency DCT block (paper 004 Eq. 5-8, :mod:`.lowfreq`), adding the parameter ``lf_ratio`` (η).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

from ..registry import MethodSpec
from ..train.presets import DREAMBOOTH
from ..validate import ATTACK_RANGES

# PGD defaults of paper 000 App. F / Diff-Protect / Mist v1: ε 16/255, α 1/255, 100 steps, t ~ U[0, 1000), and a
# uniform random start in the ε-ball (paper 000 made ADM+ and EA through Mist v1's modes: psyker-team/mist
# mist_v3.py runs advertorch's LinfPGDAttack, whose rand_init defaults to True). `-p random_start=false` starts at x.
PGD_DEFAULTS: dict[str, Any] = {"eps": 16.0, "step_size": 1.0, "steps": 100, "random_start": True}
DIFFUSION_DEFAULTS: dict[str, Any] = {"t_range": None, "prompt": "a photo"}
# `cloak poison photos -o cloaked` with no --attack: AdvDM (ε 16, α 1, 100 steps, 512 px) with EoT over our
# differentiable JPEG. Why: ADM+ and EA are the strongest poisons against Textual Inversion in paper 000 (Table 2,
# DINOv2 similarity 0.44 clean → ~0.10), ADM+ needs no target image and works on any SD UNet; JPEG is the cheapest
# effective purifier (paper 000 Table 1; paper 004 §1), and EoT over it costs no extra UNet pass. See docs/poison.md.
ARTIST_PRESET: dict[str, Any] = {"attack": "adm+", "robust": "jpeg"}
LF_RATIO = 0.25  # η of LF-PGD (Guo et al. 2020 kept a quarter of the spectrum); paper 004 does not state its value


@dataclass(frozen=True)
class AttackSpec(MethodSpec):
    """An attack's name, module, one-line summary, published defaults, and how the folder run must call it."""

    set_level: bool = False
    needs_target: bool = False  # takes --target (pattern | gray | zero | PATH)
    sdxl: bool = True  # defined on the UNet/VAE alone, so SDXL works
    base: str | None = None  # for lf-<attack>: the attack whose gradient is low-pass projected
    fixed: dict[str, Any] = field(default_factory=dict)  # passed to the module, not user-settable (adm-: ascent)

    selector: ClassVar[str] = "--attack"
    range_table: ClassVar[dict[str, Any]] = ATTACK_RANGES


ATTACKS: dict[str, AttackSpec] = {}


def register(spec: AttackSpec) -> AttackSpec:
    ATTACKS[spec.name] = spec
    return spec


def get_attack(name: str) -> AttackSpec:
    """The spec of ``name``; ``lf-<attack>`` is built from the base attack (low-frequency gradient, η = 0.25)."""
    from ..errors import UsageError

    if name in ATTACKS:
        return ATTACKS[name]
    if name.startswith("lf-") and name[3:] in ATTACKS and not name[3:].startswith("lf-"):
        base = ATTACKS[name[3:]]
        return replace(base, name=name, base=base.name, module="lowfreq", fixed={**base.fixed, "base": base.name},
                       summary=f"{base.name} with its gradient kept on the low-frequency DCT block "
                               f"(LF-PGD, paper 004 Eq. 8).",
                       defaults={**base.defaults, "lf_ratio": LF_RATIO, "lf_project": False,
                                 # paper 004 Alg. 1 starts at x̃ = x0 (a uniform start would be full-band noise)
                                 **({"random_start": False} if "random_start" in base.defaults else {})})
    raise UsageError(f"unknown attack {name!r}; choose one of: {', '.join(attack_names())}")


def attack_names(with_lf: bool = True) -> list[str]:
    names = list(ATTACKS)
    return names + [f"lf-{name}" for name in ATTACKS if name not in ("inmark",)] if with_lf else names


# ------------------------------------------------------------------------------------------ single image
register(AttackSpec("adm+", "adm", "AdvDM: maximize the noise-prediction loss E_t,ε ‖ε_θ(z'_t,t,c) − ε‖² "
                    "(paper 000 Eq. 4; Liang et al. 2023). ε 16, α 1, 100 steps.",
                    {**PGD_DEFAULTS, **DIFFUSION_DEFAULTS}))
register(AttackSpec("adm-", "adm", "AdvDM descent: minimize the same loss (paper 000 App. F).",
                    {**PGD_DEFAULTS, **DIFFUSION_DEFAULTS}, fixed={"ascent": False}))
register(AttackSpec("sds+", "sds", "SDS(+) of Diff-Protect (Xue et al. 2024): AdvDM's direction with the UNet "
                    "Jacobian dropped — (ε_θ − ε) is a constant pushed back through the VAE encoder only.",
                    {**PGD_DEFAULTS, **DIFFUSION_DEFAULTS}))
register(AttackSpec("sds-", "sds", "SDS(−): the descent version of sds+ (Diff-Protect's strongest).",
                    {**PGD_DEFAULTS, **DIFFUSION_DEFAULTS}, fixed={"ascent": False}))
register(AttackSpec("ea", "ea", "PhotoGuard encoder attack: minimize ‖E(x') − E(x_target)‖² (paper 000 Eq. 5); "
                    "target: our high-contrast pattern, gray, zero or an image.",
                    {**PGD_DEFAULTS, "target": "pattern"}, needs_target=True))
register(AttackSpec("da", "da", "PhotoGuard diffusion attack: back-propagate through 4 DDIM steps (η 1, empty "
                    "prompt, CFG 7.5) from the noisiest step and pull the unclamped decoded output to the target "
                    "(mid-grey); L2 PGD (ε 16, step 1 in [-1,1] units), 200 iterations, 10 gradient samples "
                    "averaged, inside the L∞ budget.",
                    {"eps": 16.0, "l2_eps": 16.0, "l2_step": 1.0, "steps": 200, "grad_samples": 10,
                     "sampling_steps": 4, "guidance": 7.5, "strength": 1.0, "eta": 1.0, "random_start": False,
                     "sampling_prompt": "", "target": "gray"}, needs_target=True, sdxl=False))
register(AttackSpec("mist", "mist", "Mist v1 fused mode (mist_v3.py): minimize Σ(E(x') − E(x_target))² (summed over "
                    "the latent) − 1e4 · mean AdvDM loss; random start.",
                    {**PGD_DEFAULTS, **DIFFUSION_DEFAULTS, "target": "pattern", "fused_weight": 1e4},
                    needs_target=True))

# ------------------------------------------------------------------------------------------- set level
# (aspl, fsmg, e-aspl, metacloak, caat, ace, inmark: registered below by their modules' author)
# Shared by the DreamBooth-surrogate attacks (ops/attacks/setlevel.py, whose start_run takes its defaults from here):
# the DreamBooth defaults of ops.train.presets.DREAMBOOTH — prompts of papers 001/004, 200 class images of the base
# model (cached, resumable; class_dir None = the user cache), lr 5e-7 with prior weight 1.0, text encoder trained —
# plus the attack side: no timestep window and the posterior mean as latents (latent_sample draws from it instead).
# Anti-DreamBooth's budget 0.05 / step 0.005 in [-1, 1] units is 6.375 / 0.6375 here.
SET_DEFAULTS: dict[str, Any] = {
    "instance_prompt": DREAMBOOTH["instance_prompt"], "class_prompt": DREAMBOOTH["class_prompt"],
    "num_class_images": DREAMBOOTH["num_class_images"], "class_dir": None, "class_steps": DREAMBOOTH["class_steps"],
    "prior_weight": DREAMBOOTH["prior_weight"], "db_lr": DREAMBOOTH["lr"],
    "train_text_encoder": DREAMBOOTH["train_text_encoder"], "t_range": None, "latent_sample": False}
NO_PRIOR_DEFAULTS: dict[str, Any] = {key: SET_DEFAULTS[key] for key in ("instance_prompt", "t_range", "latent_sample")}
ANTI_DREAMBOOTH_BUDGET: dict[str, Any] = {"eps": 6.375, "step_size": 0.6375}
register(AttackSpec("aspl", "aspl", "Anti-DreamBooth ASPL: 50 rounds of [copy f→f′, 3 DreamBooth steps of f′ on clean "
                    "set A, 6 PGD steps on the set against f′, 3 DreamBooth steps of f on the perturbed set]; "
                    "ε 6.375, α 0.6375.",
                    {**ANTI_DREAMBOOTH_BUDGET, "rounds": 50, "surrogate_steps": 3, "pgd_steps": 6, **SET_DEFAULTS},
                    set_level=True, sdxl=False))
register(AttackSpec("fsmg", "fsmg", "Anti-DreamBooth FSMG: DreamBooth-train a surrogate on clean set A (1000 steps, "
                    "2 instance + 2 class images a step), then 100 PGD steps against it; ε 6.375, α 0.6375.",
                    {**ANTI_DREAMBOOTH_BUDGET, "steps": 100, "surrogate_steps": 1000, **SET_DEFAULTS,
                     "db_batch_size": 2},
                    set_level=True, sdxl=False))
register(AttackSpec("e-aspl", "e_aspl", "Ensemble ASPL: one ASPL round per base model (--model + --ensemble, default "
                    "SD 1.4 and SD 2.1-base) from the shared images each round, perturbations averaged.",
                    {**ANTI_DREAMBOOTH_BUDGET, "rounds": 50, "surrogate_steps": 3, "pgd_steps": 6,
                     "ensemble": "CompVis/stable-diffusion-v1-4,stabilityai/stable-diffusion-2-1-base",
                     **SET_DEFAULTS}, set_level=True, sdxl=False))
register(AttackSpec("metacloak", "metacloak", "MetaCloak: pool of DreamBooth snapshots trained on the protected "
                    "images (every 200 of 1000 steps); trials × snapshots × [6 EoT-PGD steps (blur k7, flip, "
                    "rotation in [0, θ]) + 2 unrolled training steps]; ε 11, α 1.1.",
                    {"eps": 11.0, "step_size": 1.1, "pgd_steps": 6, "unroll_steps": 2, "trials": 4,
                     "inner_iterations": 100, "pool_steps": 1000, "pool_interval": 200, "rotation": 0.0,
                     **SET_DEFAULTS}, set_level=True, sdxl=False))
register(AttackSpec("caat", "caat", "CAAT: only cross-attention K/V train; each of 250 steps one backward gives an "
                    "image sign-ascent step and one AdamW step (lr 1e-5, K/V gradient norm clipped to 1.0); "
                    "ε 6.375, α 0.6375.",
                    {**ANTI_DREAMBOOTH_BUDGET, "steps": 250, "lr": 1e-5, **NO_PRIOR_DEFAULTS},
                    set_level=True, sdxl=False))
register(AttackSpec("ace", "ace", "ACE (Mist v2 lunet, attacks/mist.py): pull the noise prediction toward the "
                    "target latent; 5 epochs × (30 PGD steps + 10 LoRA steps, rank 4, lr 1e-4, prior weight 0.1 "
                    "with 50 class images); ε 4, α 0.6375 (mist-v2's 8/255 and 0.005 in [-1,1] units).",
                    {"eps": 4.0, "step_size": 0.6375, "epochs": 5, "pgd_steps": 30, "lora_steps": 10,
                     "lora_rank": 4, "lora_lr": 1e-4, "target": "pattern",
                     **{**SET_DEFAULTS, "num_class_images": 50, "prior_weight": 0.1, "train_text_encoder": False}},
                    set_level=True, needs_target=True, sdxl=False))
register(AttackSpec("inmark", "inmark", "InMark (paper 004 Alg. 1): epochs alternate DCT low-frequency PGD (η 0.25) "
                    "and self-influence steps (H⁻¹ by damped CG on cross-attention K/V; identity/LiSSA options), "
                    "DreamBooth update each epoch; ε 6.375, α 0.6375.",
                    {**ANTI_DREAMBOOTH_BUDGET, "epochs": 10, "iterations": 10, "surrogate_steps": 3,
                     "lf_ratio": 0.25, "influence": "cg", "hvp_steps": 5, "damping": 0.01, "lissa_scale": 10.0,
                     "influence_params": "attn2.to_k,attn2.to_v", **SET_DEFAULTS}, set_level=True, sdxl=False))
