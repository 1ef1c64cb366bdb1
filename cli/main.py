"""``cloak`` — the typer app. Each subcommand lives in its own module; this file only registers them."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from . import generate, immunize, mask, poison, purify, report, score, ssm, train_db, train_ti

app = typer.Typer(
    name="cloak",
    help="Protective perturbations against personalized text-to-image diffusion models — poison, purify, "
         "train, generate and score from the shell. Every command reads image folders and writes a folder with "
         "PNGs and a cloak.json manifest; reruns skip finished files.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    rich_markup_mode=None,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

def _version(show: bool) -> None:
    if show:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"cloak {version('cloaklab')}")
        except PackageNotFoundError:
            typer.echo("cloak (not installed)")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True,
                                                    help="Print the version and exit.")] = None,
) -> None:
    """cloaklab's command line."""


for _module in (purify, poison, mask, train_ti, train_db, generate, score, report, ssm, immunize):
    _module.register(app)


def main() -> None:
    app(prog_name="cloak")


if __name__ == "__main__":
    main()
