"""Valid ranges of every numeric and path flag, checked once before any work (a bad value exits 2 with one line).

Two tables own the ranges: method parameters (``--eps``, ``--sigma``, ``--param rounds=…``) by name for attacks and for
purifiers (a spec may override one in its ``ranges``), checked by :meth:`ops.registry.MethodSpec.resolve`; and the
command flags that are not method parameters (``--lr``, ``--max-pixels``, ``--output``…), checked by
:func:`check_command_flags`, which the CLI's error wrapper calls before the command body runs. Every float must be
finite (``nan`` and ``inf`` are refused everywhere). Stdlib only: the CLI imports it before torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UsageError


@dataclass(frozen=True)
class Range:
    """A closed or half-open numeric interval, optionally integer/odd; ``pair`` checks ``[lo, hi]`` with lo < hi."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    odd: bool = False
    pair: bool = False
    note: str = ""

    def describe(self) -> str:
        if self.low is not None and self.high is not None:
            text = f"{'(' if self.low_open else '['}{_num(self.low)}, {_num(self.high)}{')' if self.high_open else ']'}"
            text = f"in {text}"
        elif self.low is not None:
            text = f"{'>' if self.low_open else '>='} {_num(self.low)}"
        elif self.high is not None:
            text = f"{'<' if self.high_open else '<='} {_num(self.high)}"
        else:
            text = "finite"
        if self.odd:
            text = f"odd and {text}"
        if self.pair:
            text = f"two values LO < HI, each {text}"
        return text + (f" ({self.note})" if self.note else "")

    def contains(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return False
        return not (self.odd and int(value) % 2 == 0)

    def check(self, flag: str, value: Any) -> None:
        if value is None or isinstance(value, bool):
            return
        values = list(value) if self.pair else [value]
        if self.pair and (len(values) != 2 or values[0] >= values[1]):
            raise UsageError(f"{flag} {_show(value)}: must be {self.describe()}")
        for item in values:
            if isinstance(item, (int, float)) and not self.contains(item):
                raise UsageError(f"{flag} {_show(value)}: must be {self.describe()}")


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(_show(v) for v in value)
    return _num(value) if isinstance(value, (int, float)) and math.isfinite(value) else str(value)


def flag_name(key: str) -> str:
    return "--" + key.replace("_", "-")


def check_finite(flag: str, value: Any) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise UsageError(f"{flag} {value}: must be a finite number")


POSITIVE = Range(0, None, low_open=True)
NON_NEGATIVE = Range(0)
AT_LEAST_ONE = Range(1)
UNIT = Range(0, 1)
TIMESTEP = Range(0, 999, note="a step of the 1000-step schedule")
PIXEL_BUDGET = Range(0, 255, low_open=True, note="/255 pixel units")

# ------------------------------------------------------------------------------------- method parameters
ATTACK_RANGES: dict[str, Range] = {
    "eps": PIXEL_BUDGET, "step_size": PIXEL_BUDGET, "steps": NON_NEGATIVE, "l2_eps": POSITIVE, "l2_step": POSITIVE,
    "t_range": Range(0, 1000, pair=True, note="timesteps LO <= t < HI of the 1000-step schedule"),
    "lf_ratio": Range(0, 1, low_open=True), "fused_weight": NON_NEGATIVE, "strength": UNIT,
    "grad_samples": AT_LEAST_ONE, "sampling_steps": AT_LEAST_ONE, "rounds": AT_LEAST_ONE, "epochs": AT_LEAST_ONE,
    "pgd_steps": AT_LEAST_ONE, "surrogate_steps": AT_LEAST_ONE, "class_steps": AT_LEAST_ONE,
    "num_class_images": AT_LEAST_ONE, "db_lr": POSITIVE, "lr": POSITIVE, "lora_lr": POSITIVE,
    "lora_rank": AT_LEAST_ONE, "lora_steps": AT_LEAST_ONE, "prior_weight": NON_NEGATIVE, "damping": NON_NEGATIVE,
    "hvp_steps": AT_LEAST_ONE, "iterations": AT_LEAST_ONE, "lissa_scale": POSITIVE,
    "inner_iterations": AT_LEAST_ONE, "pool_interval": AT_LEAST_ONE, "pool_steps": AT_LEAST_ONE,
    "rotation": Range(0, 180, note="degrees"), "trials": AT_LEAST_ONE, "unroll_steps": AT_LEAST_ONE,
}
PURIFIER_RANGES: dict[str, Range] = {
    "quality": Range(1, 100), "jpeg_scale": Range(8, 4096, note="pixels"), "sigma": POSITIVE,
    "resolution": Range(8, 4096), "drop": Range(0, 1, high_open=True, note="fraction of pixels"),
    "tv_weight": NON_NEGATIVE, "iters": AT_LEAST_ONE, "bilateral_iters": NON_NEGATIVE, "guided_iters": NON_NEGATIVE,
    "radius": AT_LEAST_ONE, "eps": POSITIVE, "t": TIMESTEP, "steps": AT_LEAST_ONE, "guidance": NON_NEGATIVE,
    "eta": NON_NEGATIVE, "window": Range(2), "stride": AT_LEAST_ONE, "gamma": UNIT, "lr": POSITIVE,
    "lpips_weight": NON_NEGATIVE, "lpips_budget": NON_NEGATIVE, "fidelity": UNIT, "noise": UNIT,
    "noise_level": Range(0, 350), "upscaler_steps": AT_LEAST_ONE, "upscaler_guidance": NON_NEGATIVE,
}


def check_params(params: Mapping[str, Any], table: Mapping[str, Range], overrides: Mapping[str, Range] | None = None,
                 ) -> None:
    """Check resolved method parameters against ``overrides`` then ``table``; every float must be finite."""
    for key, value in params.items():
        check_finite(flag_name(key), value)
        spec = (overrides or {}).get(key) or table.get(key)
        if spec is not None:
            spec.check(flag_name(key), value)


# ---------------------------------------------------------------------------------------- command flags
# Flags every command shares, then per command (by the function name of its body). Method parameters of poison and
# purify are not here: the method's spec owns them.
COMMON_FLAGS: dict[str, Range] = {"max_pixels": AT_LEAST_ONE, "batch_size": AT_LEAST_ONE}
TRAINING = {"lr": POSITIVE, "weight_decay": NON_NEGATIVE, "max_grad_norm": NON_NEGATIVE,
            "resolution": Range(8, 4096, note="pixels"),
            # rho: a fraction in (0, 1) for the threshold samplers (checked by ops.diffusion), > -1 for power
            "t_param": Range(-1, None, low_open=True)}
# the training commands' own loop and Safe-Zone Training flags (typer checks them on the command line too; the Python
# API has only these tables)
SZT_TRAINING = {"steps": AT_LEAST_ONE, "grad_accumulation": AT_LEAST_ONE, "checkpoint_every": NON_NEGATIVE,
                "jpeg": Range(1, 100), "dilate": NON_NEGATIVE}
COMMAND_FLAGS: dict[str, dict[str, Range]] = {
    "poison": {"resolution": Range(0, 4096, note="short side in px; 0 = native"), "eot_samples": AT_LEAST_ONE,
               "eval_draws": NON_NEGATIVE, "jpeg_quality": Range(1, 100), "native_crops": UNIT},
    "purify": {},
    "train_ti": {**TRAINING, **SZT_TRAINING, "flip_p": UNIT, "jpeg_scale": Range(8, 4096, note="pixels"),
                 "num_vectors": AT_LEAST_ONE, "warmup_steps": NON_NEGATIVE, "snapshot_every": NON_NEGATIVE},
    "train_db": {**TRAINING, **SZT_TRAINING, "class_guidance": NON_NEGATIVE, "prior_weight": NON_NEGATIVE,
                 "lora": AT_LEAST_ONE, "num_class_images": AT_LEAST_ONE, "class_steps": AT_LEAST_ONE,
                 "save_every": NON_NEGATIVE},
    "immunize": {**TRAINING, "defence_lr": POSITIVE, "steps": AT_LEAST_ONE, "inner_steps": AT_LEAST_ONE,
                 "outer_steps": AT_LEAST_ONE, "lora_rank": AT_LEAST_ONE, "check_steps": NON_NEGATIVE,
                 "checkpoint_every": NON_NEGATIVE},
    "generate": {"guidance": NON_NEGATIVE, "eta": UNIT, "resolution": Range(8, 4096, note="pixels"),
                 "steps": AT_LEAST_ONE, "num_per_prompt": AT_LEAST_ONE},
    "ssm": {"resolution": Range(8, 4096, note="pixels"), "samples": AT_LEAST_ONE, "quality": Range(1, 100)},
    "mask": {"dilate": NON_NEGATIVE, "points_per_side": AT_LEAST_ONE},
    "score": {},
}
# Path flags that name something that must already exist (checked before any model loads). Model checkpoints
# (--sam-checkpoint) are left to their loader: a missing one is exit 1 with where to download it.
EXISTING_PATHS = ("mask", "clean_dir", "masks", "embedding", "lora", "unet", "text_encoder", "ref", "clean",
                  "face_detector")
FILE_OUTPUT_COMMANDS = ("score",)  # -o names a file there, a folder everywhere else


def check_command_flags(command: str, kwargs: Mapping[str, Any]) -> None:
    """Refuse bad flag values of ``command`` (non-finite floats, out-of-range numbers, an OUTPUT folder that is an
    existing file, missing input paths) with one line naming the flag and its valid range."""
    table = {**COMMON_FLAGS, **COMMAND_FLAGS.get(command, {})}
    for key, value in kwargs.items():
        flag = "--output" if key == "output" else flag_name(key)
        check_finite(flag, value)
        if key in table:
            table[key].check(flag, value)
    output = kwargs.get("output")
    if isinstance(output, Path) and str(output) not in ("", "."):
        if command not in FILE_OUTPUT_COMMANDS and output.exists() and not output.is_dir():
            raise UsageError(f"--output {output}: is an existing file; give a folder (it is created if missing)")
    for key in EXISTING_PATHS:
        value = kwargs.get(key)
        if isinstance(value, Path) and not value.exists():
            raise UsageError(f"{flag_name(key)} {value}: not found")


# ------------------------------------------------------------------------------------------ working images
MAX_ASPECT = 8.0  # long side / short side of a photo that a command resizes to a working size (short side → R)


def check_aspect(width: int, height: int) -> None:
    """Refuse, before any allocation, a photo whose working image would be unbounded: a command that scales the
    short side to R makes a 4000×8 strip R×(500·R) (512 → 512×256,000). The limit is 1:8 (long ≤ 8 × short)."""
    from .errors import RejectedInput

    short, long = sorted((int(width), int(height)))
    if short <= 0 or long > MAX_ASPECT * short:
        raise RejectedInput(f"aspect ratio {long}:{short} of a {width}x{height} image exceeds the 1:{MAX_ASPECT:g} "
                            "limit of commands that resize to a working size; crop it first")
