"""The ``cloak.json`` manifest every output folder holds: what ran, with what, and what happened to each file.

Several processes may share one output folder (``--shard I/N`` under ``make -j``), so every update re-reads the
file under an exclusive lock and replaces it atomically.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import os
import platform
import sys
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from .io import MANIFEST_NAME, atomic_write_bytes

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


class Manifest:
    """Read-merge-write access to ``OUTPUT/cloak.json``.

    ``params`` are the output-relevant parameters of this run (their hash decides resume); ``extra`` holds
    provenance that does not (device, batch size, shard).
    """

    def __init__(self, folder: Path, command: str, params: dict[str, Any], *, seed: int | None = None,
                 model: dict[str, Any] | None = None, extra: dict[str, Any] | None = None,
                 argv: list[str] | None = None):
        self.folder = Path(folder)
        self.path = self.folder / MANIFEST_NAME
        self.command = command
        self.params = params
        self.hash = params_hash({"command": command, **params})
        self.seed = seed
        self.model = model or {}
        self.extra = extra or {}
        self.argv = list(sys.argv if argv is None else argv)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._snapshot = self.read()

    # ------------------------------------------------------------------------------------------ file access
    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        lock_path = self.folder / f".{MANIFEST_NAME}.lock"
        with open(lock_path, "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                data = self.read()
                yield data
                data["updated"] = _now()
                atomic_write_bytes(self.path, json.dumps(data, indent=2, default=str).encode() + b"\n")
                self._snapshot = data
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def read(self) -> dict[str, Any]:
        if not self.path.exists():
            return {"format": FORMAT_VERSION, "command": self.command, "created": _now(), "runs": [], "files": {}}
        try:
            data = json.loads(self.path.read_text())
        except json.JSONDecodeError as exc:
            from .errors import CloakError

            raise CloakError(f"{self.path} is not valid JSON ({exc}); move it away to start a fresh manifest")
        data.setdefault("files", {})
        data.setdefault("runs", [])
        return data

    # ------------------------------------------------------------------------------------------------ API
    def start_run(self) -> None:
        """Record this run's command line, parameters, versions, seed and model at the top of the manifest."""
        with self._locked() as data:
            data["command"] = self.command
            data["argv"] = self.argv
            data["cwd"] = os.getcwd()  # relative paths in argv are relative to it (cloak report follows them)
            data["params"] = self.params
            data["params_hash"] = self.hash
            data["seed"] = self.seed
            data["model"] = self.model
            data["versions"] = package_versions()
            run = {"started": _now(), "params_hash": self.hash, "argv": self.argv, **self.extra}
            data["runs"] = (data["runs"] + [run])[-50:]

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

    def record(self, output_rel: str, **fields: Any) -> None:
        """Store (replace) the record of one output file (with the process's peak memory so far)."""
        with self._locked() as data:
            data["files"][output_rel] = {"params_hash": self.hash, "time": _now(), **peak_memory(), **fields}

    def update(self, **fields: Any) -> None:
        """Merge top-level fields (e.g. a run summary or training state)."""
        with self._locked() as data:
            data.update(fields)

    @property
    def files(self) -> dict[str, Any]:
        return self._snapshot["files"]
