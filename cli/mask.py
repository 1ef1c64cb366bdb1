"""``cloak mask``: Concept masks with segment-anything. Not built yet — the command exits 2 without doing any work."""

from __future__ import annotations

import typer

from . import common


def register(app: typer.Typer) -> None:
    def mask(ctx: typer.Context) -> None:
        """Concept masks with segment-anything (not implemented yet: exits 2)."""
        common.not_implemented("mask")

    app.command("mask", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(mask)
