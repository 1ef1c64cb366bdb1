"""``cloak`` — the typer app. Each subcommand lives in its own module; this file only registers them."""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from typer.core import TyperGroup

try:  # recent typer parses with its own vendored click
    from typer._click import exceptions as click_errors  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - older typer on the real click
    from click import exceptions as click_errors  # type: ignore[no-redef]

from . import generate, immunize, mask, poison, purify, report, rerun, score, ssm, train_db, train_ti


class OneLineUsageError(click_errors.ClickException):
    """A flag the parser refused (unknown option, value out of its range): one line on stderr, exit 2."""

    exit_code = 2

    def show(self, file=None) -> None:  # noqa: ARG002 - click's signature
        sys.stderr.write(f"cloak: error: {' '.join(self.format_message().split())}\n")  # click may wrap lines


class CloakGroup(TyperGroup):
    """Reports click's usage errors (bad values, unknown flags) as one line, like every other expected fault."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click_errors.UsageError as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":
                raise
            command = (exc.ctx.command_path if exc.ctx is not None else "").partition(" ")[2]
            raise OneLineUsageError((f"{command}: " if command else "") + exc.format_message()) from exc


app = typer.Typer(
    name="cloak",
    cls=CloakGroup,
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
    version: Annotated[bool | None, typer.Option("--version", callback=_version, is_eager=True,
                                                    help="Print the version and exit.")] = None,
) -> None:
    """cloaklab's command line."""


for _module in (purify, poison, mask, train_ti, train_db, generate, score, report, ssm, immunize, rerun):
    _module.register(app)


def main() -> None:
    app(prog_name="cloak")


if __name__ == "__main__":
    main()
