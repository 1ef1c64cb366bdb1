"""``cloak rerun OUTPUT/cloak.json -o NEW``: repeat a recorded run — the same command, settings and inputs — into a
new folder (byte-identical outputs when the inputs are unchanged; every random draw comes from the recorded seed).

The manifest's ``run_spec`` (written by :func:`ops.commands.run_command`) holds the command, its full settings and
the inputs as given (relative to the manifest's folder when they share a parent). Inputs whose bytes differ from
the recorded ``source_sha256`` are reported before the run.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UsageError


@dataclass
class Recorded:
    command: str
    settings: Any  # the command's Settings
    inputs: list[str]
    folder: Path
    cwd: Path | None = None  # the recorded run's working directory (relative settings are read against it)
    changed: list[str] = field(default_factory=list)  # inputs whose bytes differ from the record (or are missing)


def load_recorded(manifest: Path | str, **overrides: Any) -> Recorded:
    """Read ``manifest`` (a ``cloak.json`` or its folder) and rebuild the run it records; ``overrides`` replace
    settings (e.g. ``device="cpu"``). A command whose ``-o`` is a file (``cloak score``) records each file it wrote
    with its own run spec in the folder's ``cloak.json``: name that file to repeat its run (the folder's
    ``cloak.json`` repeats the latest; any other file, the folder's run)."""
    from ..manifest import read_manifest
    from . import load

    path = Path(manifest)
    folder = path if path.is_dir() else path.parent
    if not (folder / "cloak.json").is_file() and not (folder / "cloak.json.d").is_dir():
        raise UsageError(f"{manifest}: no cloak.json there")
    data = read_manifest(folder)
    if not data:
        raise UsageError(f"{manifest}: the manifest cannot be read")
    spec = data.get("run_spec")
    if path.is_file() and path.name != "cloak.json":  # an output file: the run that wrote it, if recorded apart
        files = data.get("files") or {}
        record = files.get(path.name) if isinstance(files.get(path.name), dict) else {}
        record = files.get(record.get("written_with"), record)  # score's CSV points to its score file
        spec = (record.get("run_spec") if isinstance(record, dict) else None) or spec
    if not spec:
        raise UsageError(f"{manifest}: it records no run settings (written by a cloak before `cloak rerun` existed); "
                         "rerun the command from its recorded argv instead")
    module = load(spec["command"])
    cwd = data.get("cwd")
    cwd = Path(os.path.normpath(cwd if os.path.isabs(cwd) else folder / cwd)) if cwd else None
    cwd = cwd if cwd is not None and cwd.is_dir() else None
    with _working_directory(cwd):  # settings naming files (--ref refs) are checked where they were given
        settings = module.Settings.from_kwargs(**{**spec["settings"], **overrides})
    given = list(spec.get("inputs", []))
    if cwd is not None and all(entry == "-" or (cwd / entry).exists() for entry in given):
        inputs = given  # as typed, read in the recorded working directory: outputs that name them are identical
    else:  # the project moved: the inputs relative to this manifest's folder
        inputs = [entry if entry == "-" or os.path.isabs(entry) else os.path.normpath(folder / entry)
                  for entry in spec.get("inputs_resolved", given)]
    return Recorded(spec["command"], settings, inputs, folder, cwd, changed_inputs(data, folder))


@contextlib.contextmanager
def in_recorded_folder(recorded: Recorded):
    """Run inside the recorded working directory, so relative settings (``--ref refs``, ``--prompts p.txt``, a
    model folder) name the same files and are written into the outputs exactly as before (byte-identical)."""
    with _working_directory(recorded.cwd):
        yield


@contextlib.contextmanager
def _working_directory(folder: Path | None):
    if folder is None:
        yield
        return
    before = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


def changed_inputs(data: dict[str, Any], folder: Path) -> list[str]:
    """Recorded sources whose current bytes differ from their ``source_sha256`` (or that are gone)."""
    from ..io import file_sha256

    pairs = []
    for record in data.get("files", {}).values():
        if record.get("status") != "done":
            continue
        pairs += list((record.get("sources") or {}).items())  # a score file: every image it scored
        if record.get("source") and record.get("source_sha256"):
            pairs.append((record["source"], record["source_sha256"]))
    changed = set()
    for source, digest in pairs:
        path = Path(source) if os.path.isabs(source) else folder / source
        try:
            if file_sha256(path) != digest:
                changed.add(f"{source}: its bytes changed since the recorded run")
        except OSError:
            changed.add(f"{source}: missing")
    return sorted(changed)


def check_new_output(recorded: Recorded, output: Path) -> None:
    """A rerun writes a new folder: refuse the recorded run's own output. A command that writes beside its ``-o``
    (score's ``--csv``) moves those writes next to the new output (its module's ``rerun_settings``)."""
    from . import load

    target = Path(output).resolve()
    original = recorded.folder.resolve()
    if target == original or (target.suffix and target.parent == original):
        raise UsageError(f"-o {output} is the recorded run's own output; give a new folder (a plain rerun of the "
                         "original command resumes there)")
    move = getattr(load(recorded.command), "rerun_settings", None)
    if move is not None:
        recorded.settings = move(recorded.settings, Path(output))
