"""``cloak rerun``: repeat a recorded run from its manifest into a new folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from . import common


@common.handle_errors
def rerun(
    manifest: Annotated[Path, typer.Argument(help="A run's cloak.json (or its folder).", show_default=False)],
    output: common.Output,
    device: Annotated[str, typer.Option("--device", help="Run on this device instead of the recorded one (auto, "
                                                         "cpu, cuda, cuda:N, mps); results may then differ.")] = "",
    json_out: common.JsonOut = False,
    debug: common.Debug = False,
) -> None:
    """Re-execute a recorded run: the same command, settings and inputs (by path; inputs whose bytes changed
    since are reported) into a new folder, with byte-identical outputs when nothing changed.

    Example:  cloak rerun out/poisoned/cloak.json -o out/poisoned-again
    """
    from cloaklab.ops.commands.rerun import check_new_output, in_recorded_folder, load_recorded

    recorded = load_recorded(manifest, **({"device": device} if device else {}))
    check_new_output(recorded, output)
    for line in recorded.changed:
        common.Reporter("rerun").line(f"cloak: warning: {line}")
    target = output.absolute()  # named from here, before moving to the recorded working directory
    with in_recorded_folder(recorded):  # relative settings and inputs mean what they meant then
        common.execute(recorded.command, recorded.settings, recorded.inputs, target, json_out)


def register(app: typer.Typer) -> None:
    app.command("rerun")(rerun)
