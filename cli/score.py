"""``cloak score``: Metrics of generated or purified images against references. Not built yet — the command exits 2 without doing any work."""

from __future__ import annotations

import typer

from . import common


def register(app: typer.Typer) -> None:
    def score(ctx: typer.Context) -> None:
        """Metrics of generated or purified images against references (not implemented yet: exits 2)."""
        common.not_implemented("score")

    app.command("score", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(score)
