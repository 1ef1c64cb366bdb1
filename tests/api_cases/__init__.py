"""One module per command for tests/test_api.py: ``make(tmp_path, inputs_dir) -> Case`` (see :class:`Case`).

A command's case lives in its own file (``purify.py`` …) so each command adds its own without touching the others.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Case:
    """How to run one command on the same inputs through the CLI and through ``cloaklab.<command>``.

    ``inputs`` are positional (paths as strings); ``cli_args`` the flags after ``-o OUT``; ``api_kwargs`` the same
    settings as keyword arguments; ``output`` the output name under a fresh folder (a file name for commands whose
    ``-o`` is a file); ``bad`` a keyword argument out of range and the flag the error must name."""

    command: str
    inputs: list[str]
    cli_args: list[str]
    api_kwargs: dict[str, Any]
    bad: tuple[str, Any, str]
    output: str = "out"
    ignore: tuple[str, ...] = field(default=("cloak.json", "cloak.json.d", ".cloak.json.lock"))


def all_cases() -> dict[str, Callable[..., Case]]:
    cases = {}
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        cases[info.name] = module.make
    return cases
