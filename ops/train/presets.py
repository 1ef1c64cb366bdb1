"""Safe-Zone Training presets — one per column of paper 000 Table 1 (stdlib only, so the CLI can list them).

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
