"""What every command's run shares: typed settings, the run summary, the dry-run plan and the folder preamble.

Each command is one module of this package (``ops/commands/<name>.py``) with a frozen :class:`Settings` subclass and
``run(settings, inputs, output, *, on_event=None) -> RunSummary``; ``plan(settings, inputs, output) -> Plan`` answers
``--dry-run`` without loading a model or writing anything. The CLI (``cli/``) turns flags into settings and prints
what ``run`` reports; the Python API (``import cloaklab``) calls the same ``run``. Stdlib only at import time.
"""

from __future__ import annotations

import dataclasses
import enum
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar

from ..errors import UsageError

Event = Callable[[str, str, dict], None]


def no_event(kind: str, name: str, info: dict) -> None:
    """The default ``on_event``: ignore progress."""
    return None


# ---------------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True, kw_only=True)
class Settings:
    """Base of every command's settings: frozen, each default stated once, validated on construction.

    ``command`` names the command (its flag table in :mod:`ops.validate`); ``params`` carries the chosen method's
    own parameters where a command has methods (poison, purify), resolved against that method's defaults by the
    command module. Values out of range raise :class:`~ops.errors.UsageError` naming the flag (the CLI's exit 2).
    """

    command: ClassVar[str] = ""

    def __post_init__(self) -> None:
        from ..validate import check_command_flags

        for spec in dataclasses.fields(self):
            value = getattr(self, spec.name)
            if isinstance(value, enum.Enum):
                value = value.value
            if isinstance(value, str) and "Path" in str(spec.type) and spec.name != "output":
                value = Path(value)
            if isinstance(value, list):
                value = tuple(value)
            object.__setattr__(self, spec.name, value)
        check_command_flags(self.command, {spec.name: getattr(self, spec.name) for spec in dataclasses.fields(self)})
        self.check()

    def check(self) -> None:
        """Extra cross-field checks of a command (override)."""

    # -- construction from loose keyword arguments (the Python API, --config files, cloak rerun)
    @classmethod
    def names(cls) -> list[str]:
        return [spec.name for spec in dataclasses.fields(cls)]

    @classmethod
    def from_kwargs(cls, **values: Any) -> Settings:
        """Build settings from snake_case keyword arguments (the CLI's flag names; dashes are accepted too). Where
        the command has methods (a ``params`` field), other keys are the method's parameters, checked against it;
        elsewhere an unknown key is an error naming the valid ones."""
        values = {key.replace("-", "_"): value for key, value in values.items()}
        fields = set(cls.names())
        extra = {key: value for key, value in values.items() if key not in fields}
        known = {key: value for key, value in values.items() if key in fields}
        if extra:
            if "params" not in fields:
                raise UsageError(f"{cls.command.replace('_', '-')}: unknown setting(s) {', '.join(sorted(extra))} "
                                 f"(valid: {', '.join(sorted(fields))})")
            known["params"] = {**dict(known.get("params") or {}), **extra}
        return cls(**known)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready settings (paths as strings, tuples as lists): what the manifest records for ``cloak rerun``."""
        return {spec.name: _plain(getattr(self, spec.name)) for spec in dataclasses.fields(self)}

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (tuple, list)):
        return [_plain(item) for item in value]
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    return value


# ------------------------------------------------------------------------------------------------ run summary
@dataclass
class RunSummary:
    """What a run did: output names written, skipped as done, rejected and failed inputs (with reasons), the output
    folder or file, and the manifest records of the files written. ``exit_code`` is the CLI's."""

    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    output: Path | None = None
    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """0 all done · 1 a fault left outputs unwritten · 3 some inputs rejected, the rest done."""
        if self.failed:
            return 1
        return 3 if self.rejected else 0

    @property
    def outputs(self) -> list[Path]:
        """Paths of the files this run wrote (``done``), under the output folder."""
        if self.output is None:
            return []
        base = self.output if self.output.is_dir() or not self.output.suffix else self.output.parent
        return [base / name for name in self.done]

    def check(self) -> RunSummary:
        """Raise :class:`PartialRun` when an input was rejected or failed (the CLI's exit 3 or 1); return self."""
        if self.exit_code:
            raise PartialRun(self)
        return self

    def as_dict(self) -> dict[str, Any]:
        return {
            "done": self.done,
            "skipped": self.skipped,
            "rejected": [{"file": name, "reason": why} for name, why in self.rejected],
            "failed": [{"file": name, "reason": why} for name, why in self.failed],
            "exit_code": self.exit_code,
        }


class PartialRun(Exception):
    """A run that finished with rejected or failed inputs (``summary`` says which); the CLI exits 3 or 1."""

    def __init__(self, summary: RunSummary):
        self.summary = summary
        self.exit_code = summary.exit_code
        parts = [f"{len(summary.rejected)} rejected"] if summary.rejected else []
        parts += [f"{len(summary.failed)} failed"] if summary.failed else []
        first = (summary.failed or summary.rejected)[0]
        super().__init__(f"{', '.join(parts)} (first: {first[0]}: {first[1]})")


def attach_records(summary: RunSummary, folder: Path) -> RunSummary:
    """Fill ``summary.records`` from the folder's merged manifest (the records of the files it names as done)."""
    from ..manifest import read_manifest

    data = read_manifest(Path(folder)) or {}
    files = data.get("files", {})
    summary.records = {name: files[name] for name in summary.done if name in files}
    return summary


# ------------------------------------------------------------------------------------------------- dry-run plan
@dataclass
class Plan:
    """What a run would do (``--dry-run``): nothing loaded, nothing written."""

    command: str
    output: str
    settings: dict[str, Any]
    model: str | None = None
    inputs: list[str] = field(default_factory=list)  # after sharding
    run: list[str] = field(default_factory=list)  # output names that would be written
    skipped: list[str] = field(default_factory=list)  # already done with the same settings and source bytes
    rejected: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"dry_run": True, "command": self.command.replace("_", "-"), "output": self.output,
                "model": self.model, "settings": self.settings, "inputs": self.inputs, "would_write": self.run,
                "skipped": self.skipped, "rejected": [{"file": name, "reason": why} for name, why in self.rejected],
                "notes": self.notes}

    def lines(self) -> list[str]:
        """The human-readable plan (stdout)."""
        out = [f"cloak {self.command.replace('_', '-')} --dry-run: nothing is loaded or written",
               f"output: {self.output}"]
        if self.model:
            out.append(f"model that would load: {self.model}")
        out.append("settings: " + ", ".join(f"{key}={value!r}" for key, value in self.settings.items()))
        out.append(f"inputs ({len(self.inputs)}):")
        out += [f"  {name}" for name in self.inputs]
        out.append(f"would write ({len(self.run)}):")
        out += [f"  {name}" for name in self.run]
        out.append(f"skipped as done ({len(self.skipped)}):")
        out += [f"  {name}" for name in self.skipped]
        out.append(f"rejected ({len(self.rejected)}):")
        out += [f"  {name}: {why}" for name, why in self.rejected]
        out += [f"note: {note}" for note in self.notes]
        from ..io import printable

        return [printable(line) for line in out]


# ------------------------------------------------------------------------------------- folder commands' preamble
def as_input_list(inputs: str | Path | Iterable[str | Path]) -> list[str]:
    """The API accepts one path or many; the CLI passes a list of strings (``-`` = paths on stdin)."""
    if isinstance(inputs, (str, Path)):
        return [str(inputs)]
    return [str(entry) for entry in inputs]


def gather(inputs: Sequence[str], output: Path, *, recursive: bool, shard: str | None, stdin: Any = None,
           on_event: Event | None = None):
    """Collect, check and shard the inputs of a folder command: ``(items after sharding, notes, shard spec)``;
    with ``on_event`` (a run) each note is also reported as a ``note`` event.

    Refuses (usage error) an OUTPUT inside an input folder or any output path that resolves to an input."""
    from ..io import check_output_location, check_outputs, collect_inputs, parse_shard, select_shard

    shard_spec = parse_shard(shard)
    check_output_location(inputs, output)
    items, notes = collect_inputs(inputs, recursive, stdin if stdin is not None else sys.stdin)
    check_outputs(output, items)
    for note in notes if on_event is not None else ():
        on_event("note", "", {"message": note})
    return select_shard(items, shard_spec), notes, shard_spec


def plan_folder(command: str, settings: Settings, items: Sequence[Any], output: Path, params: dict[str, Any], *,
                overwrite: bool = False, model: str | None = None, notes: Sequence[str] = (),
                min_size: int = 1, max_pixels: int | None = None) -> Plan:
    """The dry-run plan of a command that writes ``OUTPUT/<rel>.png`` per input (the runner's decisions, read only):
    name clashes, outputs cloak does not own, unreadable or too-small files are rejected; a file whose record has
    the same parameter hash and source bytes is skipped as done. ``params`` must be what the run records as its
    manifest parameters (their hash decides resume)."""
    from ..io import file_sha256, safe_join
    from ..manifest import owns_record, params_hash, read_manifest

    plan = Plan(command, str(output), settings.as_dict(), model=model, notes=list(notes))
    data = read_manifest(Path(output)) or {"files": {}}
    digest_of_run = params_hash({"command": command, **params})
    for item in items:
        plan.inputs.append(str(item.path))
        out_rel = PurePosixPath(item.output_rel).as_posix()
        if item.clash_with is not None:
            plan.rejected.append((str(item.path), f"its output name {out_rel} is already taken by {item.clash_with}"))
            continue
        try:
            target = safe_join(Path(output), out_rel)
        except Exception as exc:  # noqa: BLE001 - a name that escapes the folder: the run rejects it the same way
            plan.rejected.append((str(item.path), str(exc)))
            continue
        record = data["files"].get(out_rel)
        if target.exists() and not owns_record(record, out_rel):
            plan.rejected.append((str(item.path), f"{target} exists and was not written by cloak"))
            continue
        try:
            digest = file_sha256(item.path)
        except OSError as exc:
            plan.rejected.append((str(item.path), f"cannot read file ({exc.strerror or exc})"))
            continue
        if (not overwrite and record and record.get("status") == "done" and record.get("params_hash") ==
                digest_of_run and record.get("source_sha256") == digest and target.exists()):
            plan.skipped.append(out_rel)
            continue
        reason = header_problem(item.path, min_size, max_pixels)
        if reason:
            plan.rejected.append((str(item.path), reason))
            continue
        plan.run.append(out_rel)
    return plan


def header_problem(path: Path, min_size: int = 1, max_pixels: int | None = None) -> str | None:
    """Why the runner would reject ``path`` judging from its header only (no pixels are decoded); ``max_pixels``
    ``None`` = :data:`ops.io.DEFAULT_MAX_PIXELS`."""
    from PIL import Image

    from ..io import DEFAULT_MAX_PIXELS

    max_pixels = max_pixels or DEFAULT_MAX_PIXELS
    try:
        with Image.open(path) as image:
            width, height = image.size
    except Exception as exc:  # noqa: BLE001 - anything Pillow cannot open is rejected when the run decodes it
        return f"not a readable image ({type(exc).__name__})"
    if width * height > max_pixels:
        return f"image is {width}x{height}, more than --max-pixels {max_pixels}"
    if min(width, height) < min_size:
        return f"image is {width}x{height}; this method needs at least {min_size} px per side"
    return None


def header(on_event: Event, model: str, device: Any, dtype: Any, size: Any, notes: Iterable[str] = ()) -> None:
    """The run's first line (model, device, dtype, working size), then the model's note, if it has one, and
    ``notes`` (what collecting the inputs noticed), each a ``note`` event."""
    from ..models import model_note

    on_event("header", "", {"model": model, "device": device, "dtype": dtype, "size": size})
    for note in ([model_note(model)] if model_note(model) else []) + list(notes):
        on_event("note", "", {"message": note})


def resolve_model(settings: Any) -> tuple[str, int, dict[str, Any]]:
    """The model's name, the working resolution (``settings.resolution`` or the model's own) and the manifest's
    model record, nothing loaded; a model that cannot be found is its one-line error now, before an output folder
    is made."""
    from ..models import check_available, default_model, model_info, native_resolution

    name = settings.model or default_model()
    check_available(name)
    return name, settings.resolution or native_resolution(name), model_info(name).as_dict()


def model_problems(model: str) -> list[str]:
    """The dry-run note for a model the run could not load from this machine (``[]`` when it can):
    :func:`ops.models.check_available`'s one line, without loading anything."""
    from ..errors import ModelNotFoundError
    from ..models import check_available

    try:
        check_available(model)
    except ModelNotFoundError as exc:
        return [f"the run would stop: {exc}"]
    return []


# ------------------------------------------------------------------------------------------ shared setting groups
@dataclass(frozen=True, kw_only=True)
class FolderSettings(Settings):
    """Settings of a command that reads image files and folders (``--recursive`` … ``--max-pixels``)."""

    recursive: bool = False
    overwrite: bool = False
    shard: str | None = None
    batch_size: int = 1
    max_pixels: int | None = None


@dataclass(frozen=True, kw_only=True)
class ModelSettings(Settings):
    """Settings of a command that may run a network (``--model``, ``--device``, ``--dtype``, ``--seed``)."""

    model: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0
    trust_pickle: bool = False
