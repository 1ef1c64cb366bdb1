"""How manifests and score files record the command and its paths so that a results folder can be shared.

* ``argv[0]`` is ``cloak`` (not the virtual environment's absolute path of the entry point, nor ``__main__.py``);
  the other arguments are kept as the user typed them (they are relative to the recorded ``cwd``).
* ``cwd`` and per-file paths (``source``, a score record's ``path``) are written relative to the output folder
  when the path and the output share a folder below the top level (``/home/me/proj/photos`` seen from
  ``/home/me/proj/out`` is ``../photos``), and as given otherwise (``/tmp/x`` seen from ``/home/me/out``).
  Readers (``cloak report``) resolve a relative ``cwd`` and relative paths against the manifest's own folder.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path, PurePath

PROG = "cloak"


def command_argv(argv: Sequence[str] | None = None) -> list[str]:
    """``sys.argv`` with the program recorded as ``cloak``."""
    argv = list(sys.argv if argv is None else argv)
    return [PROG, *argv[1:]] if argv else [PROG]


def shareable_path(path: str | os.PathLike, base: str | os.PathLike) -> str:
    """``path`` relative to the folder ``base`` when both lie under a common folder below the top level, else
    ``path`` as given. Relative inputs are taken against the current directory; symlinks are not resolved."""
    given = str(path)
    absolute = os.path.abspath(given)
    base_abs = os.path.abspath(base)
    try:
        common = os.path.commonpath([absolute, base_abs])
    except ValueError:  # different drives (Windows)
        return given
    if len(PurePath(common).parts) < 3:  # "/" or "/home": nothing the two share worth keeping
        return given
    return Path(os.path.relpath(absolute, base_abs)).as_posix()


def shareable_cwd(base: str | os.PathLike) -> str:
    """The working directory, relative to the output folder ``base`` where possible."""
    return shareable_path(os.getcwd(), base)
