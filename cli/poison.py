"""``cloak poison``: Add a protective perturbation (AdvDM, PhotoGuard, Mist, Anti-DreamBooth, MetaCloak, InMark …). Not built yet — the command exits 2 without doing any work."""

from __future__ import annotations

import typer

from . import common


def register(app: typer.Typer) -> None:
    def poison(ctx: typer.Context) -> None:
        """Add a protective perturbation (AdvDM, PhotoGuard, Mist, Anti-DreamBooth, MetaCloak, InMark …) (not implemented yet: exits 2)."""
        common.not_implemented("poison")

    app.command("poison", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(poison)
