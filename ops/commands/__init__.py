"""One module per command: its frozen settings and its whole run (``run(settings, inputs, output, *, on_event)``).

``COMMANDS`` maps a command's name (as on the command line, ``train-ti``) to its module here. Importing this package
is stdlib-only; a command's module imports torch only inside its ``run``.
"""

from __future__ import annotations

import importlib
import os as _os
from types import ModuleType

COMMANDS: dict[str, str] = {
    "poison": "poison", "purify": "purify", "mask": "mask", "train-ti": "train_ti", "train-db": "train_db",
    "generate": "generate", "score": "score", "ssm": "ssm", "immunize": "immunize",
}


def load(command: str) -> ModuleType:
    """The module of ``command`` (``train-ti`` or ``train_ti``)."""
    from ..errors import UsageError

    name = command.replace("_", "-")
    if name not in COMMANDS:
        raise UsageError(f"unknown command {command!r}; one of: {', '.join(COMMANDS)}")
    return importlib.import_module(f"{__name__}.{COMMANDS[name]}")


def run_command(command: str, settings, inputs, output, *, on_event=None, **extra):
    """Run ``command`` with ``settings`` (its ``Settings``) on ``inputs`` into ``output``; the manifest records the
    command, settings and inputs so that ``cloak rerun`` can repeat it. The CLI and the Python API both call this."""
    from ..manifest import RUN_SPEC
    from .base import as_input_list

    module = load(command)
    given = as_input_list(inputs) if inputs is not None else []
    spec = {"command": command.replace("_", "-"), "settings": settings.as_dict(),
            "inputs": given, "inputs_resolved": [entry if entry == "-" else _absolute(entry) for entry in given]}
    token = RUN_SPEC.set(spec)
    try:
        return module.run(settings, inputs, output, on_event=on_event, **extra)
    finally:
        RUN_SPEC.reset(token)


def _absolute(entry: str) -> str:
    return _os.path.abspath(entry)
