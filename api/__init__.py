"""cloaklab's Python API: every ``cloak`` command as a function, for notebooks and scripts.

    import cloaklab
    summary = cloaklab.purify("photos", "out", method="jpeg", quality=25)
    summary.done, summary.outputs, summary.records

Each function takes ``(inputs, output, **settings)`` with the CLI's long flag names in snake_case and returns the
run's :class:`~cloaklab.ops.commands.base.RunSummary`. The contract is the CLI's (atomic writes, ``cloak.json``,
resume, shards); a usage error raises :class:`~cloaklab.ops.errors.UsageError` (the CLI's exit 2), a missing model
:class:`~cloaklab.ops.errors.ModelNotFoundError` (exit 1); rejected or failed files are listed in the summary
(``summary.check()`` raises :class:`~cloaklab.ops.commands.base.PartialRun` for them). ``plan(command, …)`` is the
``--dry-run``. In-memory helpers work on single PIL images and reuse loaded networks: :func:`poison_image`,
:func:`purify_image`. Importing this package loads no torch; a function loads what it needs when called.
See docs/api.md.
"""

from __future__ import annotations

from typing import Any

COMMAND_FUNCTIONS = ("poison", "purify", "mask", "train_ti", "train_db", "generate", "score", "ssm", "immunize")
__all__ = [*COMMAND_FUNCTIONS, "plan", "rerun", "settings", "poison_image", "purify_image"]


def _command(name: str):
    def call(inputs: Any, output: Any, *, on_event=None, **settings: Any):
        from cloaklab.ops.commands import load, run_command

        return run_command(name, load(name).Settings.from_kwargs(**settings), inputs, output, on_event=on_event)

    call.__name__ = call.__qualname__ = name
    call.__doc__ = (f"Run ``cloak {name.replace('_', '-')}`` on ``inputs`` into ``output``; ``settings`` are its "
                    f"long flags in snake_case (see ``cloak {name.replace('_', '-')} --help``). Returns the "
                    "RunSummary.")
    return call


def settings(command: str, **values: Any):
    """The validated, frozen settings of ``command`` (raises ``UsageError`` naming a bad flag)."""
    from cloaklab.ops.commands import load

    return load(command).Settings.from_kwargs(**values)


def plan(command: str, inputs: Any, output: Any, **values: Any):
    """What ``command`` would do (``--dry-run``): loads no model, writes nothing; returns a ``Plan``."""
    from cloaklab.ops.commands import load

    module = load(command)
    return module.plan(module.Settings.from_kwargs(**values), inputs, output)


def rerun(manifest: Any, output: Any, *, on_event=None, **overrides: Any):
    """Repeat the run recorded in ``manifest`` (a ``cloak.json``) into ``output``; returns its RunSummary."""
    from pathlib import Path

    from cloaklab.ops.commands import run_command
    from cloaklab.ops.commands.rerun import check_new_output, in_recorded_folder, load_recorded

    recorded = load_recorded(manifest, **overrides)
    check_new_output(recorded, output)
    target = Path(output).absolute()  # named from here, before moving to the recorded working directory
    with in_recorded_folder(recorded):  # relative settings and inputs mean what they meant then
        summary = run_command(recorded.command, recorded.settings, recorded.inputs, target, on_event=on_event)
    summary.notes = [*recorded.changed, *summary.notes]
    return summary


def __getattr__(name: str) -> Any:
    if name in COMMAND_FUNCTIONS:
        function = _command(name)
        globals()[name] = function
        return function
    if name in ("poison_image", "purify_image"):
        from cloaklab.ops import images

        return getattr(images, name)
    raise AttributeError(f"module 'cloaklab' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
