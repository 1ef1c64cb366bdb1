"""``cloak train-db``: DreamBooth / LoRA training with SZT and DiffShortcut options. Not built yet — the command exits 2 without doing any work."""

from __future__ import annotations

import typer

from . import common


def register(app: typer.Typer) -> None:
    def train_db(ctx: typer.Context) -> None:
        """DreamBooth / LoRA training with SZT and DiffShortcut options (not implemented yet: exits 2)."""
        common.not_implemented("train-db")

    app.command("train-db", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(train_db)
