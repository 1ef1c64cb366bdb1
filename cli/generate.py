"""``cloak generate``: Seeded generation from a model, embedding or LoRA. Not built yet — the command exits 2 without doing any work."""

from __future__ import annotations

import typer

from . import common


def register(app: typer.Typer) -> None:
    def generate(ctx: typer.Context) -> None:
        """Seeded generation from a model, embedding or LoRA (not implemented yet: exits 2)."""
        common.not_implemented("generate")

    app.command("generate", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(generate)
