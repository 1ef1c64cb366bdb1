"""IMMA's hyper-parameters (paper 003 A4 / the authors' scripts for SD v1-4), stdlib only so that the command's
settings (:mod:`ops.commands.immunize`) and the CLI read the same defaults without importing torch.

The method itself — the alternating inner/outer steps, the attention weights, checkpoints — is
:mod:`ops.train.immunize`, which re-exports these names.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from ..errors import UsageError
from .distributed import check_batch  # stdlib at import, as this module

AGAINST = ("ti", "db", "lora")
IMMUNIZED_NAME = "immunized_attention.safetensors"
# Per adaptation: adaptation (inner) lr, defence (outer) lr, gradient-norm clip — see ops.train.immunize's table.
DEFAULTS: dict[str, dict[str, Any]] = {
    "ti": {"lr": 5e-4, "defence_lr": 1e-6, "max_grad_norm": None},
    "db": {"lr": 5e-6, "defence_lr": 2e-5, "max_grad_norm": 1.0},
    "lora": {"lr": 5e-6, "defence_lr": 2e-5, "max_grad_norm": 1.0},
}
# The identifier the simulated attacker trains: a new TI token, or DreamBooth's rare word.
DEFAULT_TOKENS = {"ti": "<R*>", "db": "sks", "lora": "sks"}
DEFAULT_CLASS_WORD = "object"


def default_token(against: str) -> str:
    """The attacker's identifier for ``against`` (``<R*>`` for TI, ``sks`` for DreamBooth and LoRA)."""
    return DEFAULT_TOKENS[against]


@dataclass
class ImmunizeConfig:
    """Hyper-parameters of one immunization stage; ``None`` means the per-method default of :data:`DEFAULTS`."""

    against: str = "ti"
    steps: int = 1000
    inner_steps: int = 1
    outer_steps: int = 1
    lr: float | None = None
    defence_lr: float | None = None
    max_grad_norm: float | None = None
    clip: bool = True  # False: no clipping even where the method's default clips
    batch_size: int = 1
    weight_decay: float = 1e-2
    lora_rank: int = 4
    cross_attention_only: bool = False
    sample_latents: bool = True
    seed: int = 0
    checkpoint_every: int = 250
    log_every: int = 1

    def resolved(self) -> ImmunizeConfig:
        """This config with the per-method defaults filled in (and no clipping when ``clip`` is off)."""
        if self.against not in AGAINST:
            raise UsageError(f"--against {self.against!r}: choose one of {', '.join(AGAINST)}")
        base = DEFAULTS[self.against]
        clip = self.max_grad_norm if self.max_grad_norm is not None else base["max_grad_norm"]
        return replace(self, lr=self.lr if self.lr is not None else base["lr"],
                       defence_lr=self.defence_lr if self.defence_lr is not None else base["defence_lr"],
                       max_grad_norm=clip if self.clip else None)

    def check(self) -> None:
        if min(self.steps, self.inner_steps, self.outer_steps, self.batch_size, self.lora_rank) < 1:
            raise UsageError("--steps, --inner-steps, --outer-steps, --batch-size and --lora-rank must be >= 1")
        if not (self.lr and self.lr > 0 and self.defence_lr and self.defence_lr > 0):
            raise UsageError("--lr and --defence-lr must be > 0")
        check_batch(self.batch_size)  # a data-parallel run shares each batch equally

    def resume_key(self) -> dict[str, Any]:
        """What a checkpoint must match to be resumed (everything but the run length and the write cadence)."""
        keep = asdict(self)
        for name in ("steps", "checkpoint_every", "log_every"):
            keep.pop(name)
        return keep
