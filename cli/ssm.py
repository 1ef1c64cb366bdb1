"""``cloak ssm``: Semantic sensitivity maps and timestep/spatial analyses. Not built yet — the command exits 2 without doing any work."""

from __future__ import annotations

import typer

from . import common


def register(app: typer.Typer) -> None:
    def ssm(ctx: typer.Context) -> None:
        """Semantic sensitivity maps and timestep/spatial analyses (not implemented yet: exits 2)."""
        common.not_implemented("ssm")

    app.command("ssm", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(ssm)
