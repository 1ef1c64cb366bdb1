"""The ``cloak.json`` manifest every output folder holds: what ran, with what, and what happened to each file.

Records are appended, one JSON line each (fsync'd), to a log of this process's own,
``OUTPUT/cloak.json.d/records-<host>-<pid>-<token>.jsonl``; nothing rewrites ``cloak.json`` per file, so the cost
of a record does not grow with the folder. ``cloak.json`` is the merge of the previous ``cloak.json`` and every log,
written atomically (temp file + rename) when a run starts (resume) and when it ends. Readers (this class, resume)
always merge ``cloak.json`` with the logs present, so a record is never lost, even when two merges race.

Several processes, possibly on several machines (``--shard I/N`` on NFS/Lustre), may share one output folder.
Correctness does not rely on ``flock``: every process appends only to its own log, and a log is deleted only once
it is closed ("end" line, or its process is gone) and no other log is live or ended less than two minutes ago,
i.e. when no other writer can hold a merge that lacks it; otherwise logs stay until a later run merges them.
``flock`` on ``.cloak.json.lock`` is taken as well, only to avoid redundant merges locally.
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import datetime as _dt
import errno
import fcntl
import hashlib
import json
import os
import platform
import secrets
import socket
import sys
import time
import weakref
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from .errors import UsageError
from .io import MANIFEST_NAME, atomic_write_bytes, clean_stale_temporaries, printable
from .provenance import command_argv, shareable_cwd, shareable_path

LOG_DIR = MANIFEST_NAME + ".d"
_OPEN: weakref.WeakSet[Manifest] = weakref.WeakSet()


# What ``cloak rerun`` needs to repeat a run: the command, its full settings and its inputs as given. Set around a
# command's run by :func:`ops.commands.run_command`; every manifest started inside records it.
RUN_SPEC: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("cloak_run_spec", default=None)


def close_all() -> None:
    """Close every manifest this process opened (the CLI does this when a command ends, however it ends)."""
    for manifest in list(_OPEN):
        with contextlib.suppress(Exception):
            manifest.close()


atexit.register(close_all)
ABANDONED_SECONDS = 24 * 3600  # a log from another host untouched this long belongs to a dead process
MERGE_GRACE_SECONDS = 120  # an ended log is kept this long: its owner's final merge may still be landing
FORMAT_VERSION = 1
_TRACKED_PACKAGES = ("cloaklab", "torch", "diffusers", "transformers", "pillow", "numpy", "opencv-python-headless")


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def peak_memory() -> dict[str, float]:
    """This process's peak memory so far in MiB: ``peak_rss_mb`` (resident set, from ``getrusage``) and, once CUDA
    is in use, ``peak_cuda_mb`` (``torch.cuda.max_memory_allocated``). Process-wide, so a record's value is the peak
    of its command up to that file (``cloak report`` shows it as the cost of the step)."""
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    peak = {"peak_rss_mb": round(rss / (2**20 if sys.platform == "darwin" else 2**10), 1)}
    torch = sys.modules.get("torch")  # never import torch just to measure
    with contextlib.suppress(Exception):  # a measurement must never fail a run
        if torch is not None and torch.cuda.is_initialized():
            peak["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return peak


def params_hash(params: dict[str, Any]) -> str:
    """Stable hash of the parameters that change outputs (resume skips a file only when this matches)."""
    text = json.dumps(params, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _host() -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in socket.gethostname())[:40] or "host"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _no_symlink(path: Path, what: str) -> None:
    if path.is_symlink():
        raise UsageError(f"{printable(path)} is a symlink: cloak does not follow symlinks inside the output folder "
                         f"({what}); remove it")


def owns_record(record: dict[str, Any] | None, rel: str) -> bool:
    """Whether a manifest record says cloak wrote (or was writing) the file ``rel``."""
    if not record:
        return False
    return bool(record.get("owned")) or (record.get("status") == "done" and record.get("output") == rel)


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The merged manifest of ``folder`` (``cloak.json`` + record logs, e.g. of a run still going or killed), read
    only; ``None`` when the folder has none or it is unreadable."""
    folder = Path(folder)
    if not (folder / MANIFEST_NAME).is_file() and not (folder / LOG_DIR).is_dir():
        return None
    reader = Manifest.__new__(Manifest)
    reader.folder, reader.path, reader.log_dir = folder, folder / MANIFEST_NAME, folder / LOG_DIR
    reader.command, reader._log_path = None, None
    try:
        return reader.read()
    except Exception:  # noqa: BLE001 - an unreadable manifest is treated as none
        return None


class Manifest:
    """``OUTPUT/cloak.json`` plus this process's append-only record log.

    ``params`` are the output-relevant parameters of this run (their hash decides resume); ``extra`` holds
    provenance that does not (device, batch size, shard). Call :meth:`close` at the end of a run (the runner does)
    to merge the records into ``cloak.json``; a killed run's records are merged by the next run.
    """

    def __init__(self, folder: Path, command: str, params: dict[str, Any], *, seed: int | None = None,
                 model: dict[str, Any] | None = None, extra: dict[str, Any] | None = None,
                 argv: list[str] | None = None, clean_tree: bool = True):
        self.folder = Path(folder)
        self.clean_tree = clean_tree  # False: a folder shared with the user's files; clean its top level only
        self.path = self.folder / MANIFEST_NAME
        self.log_dir = self.folder / LOG_DIR
        self.command = command
        self.params = params
        self.hash = params_hash({"command": command, **params})
        self.seed = seed
        self.model = model or {}
        self.extra = extra or {}
        self.argv = command_argv(argv)  # "cloak", then the arguments as given (ops/provenance.py)
        self.folder.mkdir(parents=True, exist_ok=True)
        for path, what in ((self.path, "the manifest"), (self.log_dir, "the record logs"),
                           (self.folder / f".{MANIFEST_NAME}.lock", "the lock file")):
            _no_symlink(path, what)
        self._log_fd: int | None = None
        self._log_path: Path | None = None
        self._clock = 0.0
        self._snapshot = self.read()
        from .train.distributed import is_main

        self.writable = is_main()  # a data-parallel run's other processes read the manifest but never write it

    # ------------------------------------------------------------------------------------------ file access
    def _base(self) -> dict[str, Any]:
        if not self.path.exists():
            return {"format": FORMAT_VERSION, "command": self.command, "created": _now(), "runs": [], "files": {}}
        try:
            data = json.loads(self.path.read_text())
        except json.JSONDecodeError as exc:
            from .errors import CloakError

            raise CloakError(f"{self.path} is not valid JSON ({exc}); move it away to start a fresh manifest"
                             ) from exc
        data.setdefault("files", {})
        data.setdefault("runs", [])
        return data

    def _logs(self) -> list[Path]:
        if not self.log_dir.is_dir() or self.log_dir.is_symlink():
            return []
        return sorted(p for p in self.log_dir.glob("records-*.jsonl") if p.is_file() and not p.is_symlink())

    @staticmethod
    def _read_log(path: Path) -> tuple[list[dict[str, Any]], bool]:
        """The complete lines of one log (a torn last line from a killed process is ignored) and whether it ended."""
        entries, ended = [], False
        try:
            text = path.read_bytes().decode("utf-8", "replace")
        except OSError:
            return [], False
        for line in text.split("\n"):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if entry.get("k") == "end":
                ended = True
            entries.append(entry)
        return entries, ended

    @staticmethod
    def _apply(data: dict[str, Any], entry: dict[str, Any]) -> None:
        kind, clock = entry.get("k"), entry.get("c", 0.0)
        if kind == "file":
            files = data.setdefault("files", {})
            old = files.get(entry["rel"])
            if old is not None and old.get("clock", 0.0) > clock:
                return  # a newer record was merged already (its log is gone); this old line must not undo it
            record = dict(entry["rec"], clock=clock)
            if owns_record(old, entry["rel"]):
                record["owned"] = True
            files[entry["rel"]] = record
        elif kind == "clash":
            data.setdefault("clashes", {})[entry["source"]] = {**entry["rec"], "clock": clock}
        elif kind == "top":
            if clock >= data.get("top_clock", 0.0):
                data.update(entry["fields"])
                data["top_clock"] = clock
        elif kind == "run":
            runs = data.setdefault("runs", [])
            if not any(run.get("id") == entry["run"].get("id") for run in runs):
                data["runs"] = (runs + [entry["run"]])[-50:]

    def _merged(self) -> tuple[dict[str, Any], dict[Path, bool]]:
        data = self._base()
        entries, status = [], {}
        for path in self._logs():
            lines, ended = self._read_log(path)
            status[path] = ended
            entries += [(entry.get("c", 0.0), path.name, index, entry) for index, entry in enumerate(lines)]
        for *_, entry in sorted(entries, key=lambda e: e[:3]):
            self._apply(data, entry)
        return data, status

    def read(self) -> dict[str, Any]:
        """``cloak.json`` merged with every record log present."""
        return self._merged()[0]

    def _append(self, entry: dict[str, Any], *, durable: bool = True) -> None:
        if not self.writable:
            self._apply(self._snapshot, entry)
            return
        if self._log_fd is None:
            self._open_log()
        self._clock = max(time.time(), self._clock + 1e-6)
        entry = {**entry, "c": self._clock}
        os.write(self._log_fd, (json.dumps(entry, default=str) + "\n").encode())  # one write: whole lines only
        if durable:
            os.fsync(self._log_fd)
        self._apply(self._snapshot, entry)

    def _open_log(self) -> None:
        self.log_dir.mkdir(exist_ok=True)
        _no_symlink(self.log_dir, "the record logs")
        name = f"records-{_host()}-{os.getpid()}-{secrets.token_hex(4)}.jsonl"
        self._log_path = self.log_dir / name
        self._log_fd = os.open(self._log_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_NOFOLLOW,
                               0o666)
        _OPEN.add(self)

    def _is_live(self, path: Path, ended: bool) -> bool:
        """Whether another process may still append to log ``path``, or may be in the middle of a merge that read
        an older state (a log that ended less than ``MERGE_GRACE_SECONDS`` ago counts as live)."""
        if path == self._log_path:
            return False
        if ended:
            try:
                return time.time() - path.stat().st_mtime < MERGE_GRACE_SECONDS
            except OSError:
                return False
        parts = path.stem.split("-")
        try:
            host, pid = "-".join(parts[1:-2]), int(parts[-2])
        except (ValueError, IndexError):
            return True
        if host == _host():
            return _pid_alive(pid)
        try:
            return time.time() - path.stat().st_mtime < ABANDONED_SECONDS
        except OSError:
            return False

    @contextlib.contextmanager
    def _best_effort_lock(self) -> Iterator[None]:
        lock_path = self.folder / f".{MANIFEST_NAME}.lock"
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UsageError(f"{printable(lock_path)} is a symlink: remove it") from None
            raise
        try:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def compact(self, *, own_log_done: bool = False) -> None:
        """Merge every log into ``cloak.json`` (atomic rename) and delete the logs nobody can still need."""
        if not self.writable:
            return
        with self._best_effort_lock():
            _no_symlink(self.path, "the manifest")
            data, status = self._merged()
            data["updated"] = _now()
            atomic_write_bytes(self.path, json.dumps(data, indent=2, default=str).encode() + b"\n", fsync=True)
            self._snapshot = data
            if any(self._is_live(path, ended) for path, ended in status.items()):
                return  # another writer is active: its next merge (or any reader) still needs every log
            for path in status:
                if path == self._log_path and not own_log_done:
                    continue
                with contextlib.suppress(OSError):
                    path.unlink()
            if own_log_done and self._log_path is not None and not self._log_path.exists():
                self._log_path = None
            with contextlib.suppress(OSError):
                self.log_dir.rmdir()

    # ------------------------------------------------------------------------------------------------ API
    def start_run(self) -> None:
        """Record this run's command line, parameters, versions, seed and model, merge what earlier (perhaps
        killed) runs logged into ``cloak.json``, and clean stale temporaries left in the folder."""
        if not self.writable:
            return
        clean_stale_temporaries(self.folder, recursive=self.clean_tree)
        spec = RUN_SPEC.get()
        if spec is not None:
            spec = {**spec, "inputs_resolved": [entry if entry == "-" else shareable_path(entry, self.folder)
                                                for entry in spec.get("inputs_resolved", [])]}
            self._append({"k": "top", "fields": {"run_spec": spec}})
        self._append({"k": "top", "fields": {"command": self.command, "argv": self.argv, "params": self.params,
                                             "params_hash": self.hash, "seed": self.seed,
                                             "cwd": shareable_cwd(self.folder),
                                             "model": self.model, "versions": package_versions()}})
        self._append({"k": "run", "run": {"id": secrets.token_hex(6), "started": _now(), "params_hash": self.hash,
                                          "argv": self.argv, **self.extra}})
        self.compact()

    def close(self) -> None:
        """End this process's log and merge it into ``cloak.json``."""
        if self._log_fd is None:
            return
        self._append({"k": "end"})
        os.close(self._log_fd)
        self._log_fd = None
        _OPEN.discard(self)
        self.compact(own_log_done=True)

    def is_done(self, output_rel: str, source_sha256: str, output_path: Path) -> bool:
        """True when a previous run wrote ``output_rel`` from the same source bytes with the same parameters."""
        record = self._snapshot["files"].get(output_rel)
        return bool(
            record
            and record.get("status") == "done"
            and record.get("params_hash") == self.hash
            and record.get("source_sha256") == source_sha256
            and output_path.exists()
        )

    def owns(self, output_rel: str) -> bool:
        """Whether cloak's manifest says cloak wrote ``output_rel`` (only such files are replaced or deleted)."""
        return owns_record(self._snapshot["files"].get(output_rel), output_rel)

    def record(self, output_rel: str, **fields: Any) -> None:
        """Store (replace) the record of one output file: one appended, fsync'd line, no rewrite of ``cloak.json``.

        A ``status="writing"`` claim (written just before the file) is not fsync'd: a killed process loses no
        written data, and after a power loss the file's own rename is no more durable than the claim.
        """
        if fields.get("source"):
            fields["source"] = shareable_path(fields["source"], self.folder)
        self._append({"k": "file", "rel": output_rel,
                      "rec": {"params_hash": self.hash, "time": _now(), **peak_memory(), **fields}},
                     durable=fields.get("status") != "writing")

    def clash(self, source: str, **fields: Any) -> None:
        """Record an input refused because an earlier input takes its output name (kept apart from ``files`` so
        it never replaces the winner's record)."""
        self._append({"k": "clash", "source": shareable_path(source, self.folder),
                      "rec": {"params_hash": self.hash, "time": _now(), **fields}})

    def update(self, **fields: Any) -> None:
        """Merge top-level fields (e.g. a run summary or training state)."""
        self._append({"k": "top", "fields": fields})

    @property
    def data(self) -> dict[str, Any]:
        """The merged manifest as this process sees it (``cloak.json`` + every log + this run's records)."""
        return self._snapshot

    @property
    def files(self) -> dict[str, Any]:
        return self._snapshot["files"]
