"""``cloak train-ti``: Textual Inversion with Safe-Zone Training options. Not built yet — the command exits 2 without doing any work."""

from __future__ import annotations

import typer

from . import common


def register(app: typer.Typer) -> None:
    def train_ti(ctx: typer.Context) -> None:
        """Textual Inversion with Safe-Zone Training options (not implemented yet: exits 2)."""
        common.not_implemented("train-ti")

    app.command("train-ti", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(train_ti)
