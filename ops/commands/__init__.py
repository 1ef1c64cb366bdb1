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
    recorded = settings.as_dict()
    for name in settings.path_fields():  # a rerun from another folder must find --ref, --embedding … too
        recorded[name] = _absolute_paths(recorded[name])
    for table in (recorded, recorded.get("params") or {}):  # model folders and prompt files named by a str flag
        for name in MAYBE_PATHS:
            value = table.get(name)
            if isinstance(value, str) and value not in BUILTIN_NAMES and _os.path.exists(value):
                table[name] = _absolute(value)
    spec = {"command": command.replace("_", "-"), "settings": recorded,
            "inputs": [entry if entry == "-" else _absolute(entry) for entry in given]}
    token = RUN_SPEC.set(spec)
    try:
        return module.run(settings, inputs, output, on_event=on_event, **extra)
    finally:
        RUN_SPEC.reset(token)


MAYBE_PATHS = ("model", "prompts", "pixel_model", "upscaler_model", "stage2_model", "face_model", "face_detector",
               "lpips_model")
BUILTIN_NAMES = ("tiny", "toy", "sd15-shaped", "objects24", "faces", "none", "codeformer", "vgg", "alex", "squeeze")


def _absolute_paths(value):
    if isinstance(value, str) and value:
        return _absolute(value)
    if isinstance(value, list):
        return [_absolute_paths(item) for item in value]
    return value


def _absolute(entry: str) -> str:
    return _os.path.abspath(entry)
