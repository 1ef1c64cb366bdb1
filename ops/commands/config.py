"""``--config FILE``: settings from a TOML or YAML file instead of a long list of flags.

Keys are the long flag names (``jpeg-scale`` or ``jpeg_scale``); a table named after the command (``[purify]``)
applies to that command only and wins over the top level, so one file can serve a whole grid. Stdlib + PyYAML (a
dependency of huggingface-hub) only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import UsageError
from . import COMMANDS


def read_config(path: Path, command: str) -> dict[str, Any]:
    """The settings in ``path`` for ``command`` (snake_case keys); a malformed file is a usage error."""
    if not path.is_file():
        raise UsageError(f"--config {path}: not found")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10
                raise UsageError(f"--config {path}: TOML needs Python 3.11 or later here; use a YAML file") from None
            data = tomllib.loads(text)
        elif path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            raise UsageError(f"--config {path}: give a .toml, .yaml or .yml file")
    except UsageError:
        raise
    except Exception as exc:  # noqa: BLE001 - a parse error of either format is the user's to fix
        raise UsageError(f"--config {path}: cannot parse it ({type(exc).__name__}: {exc})") from exc
    if not isinstance(data, dict):
        raise UsageError(f"--config {path}: the top level must be a table of settings")
    commands = set(COMMANDS) | {name.replace("-", "_") for name in COMMANDS} | {"report", "rerun"}
    values = {key: item for key, item in data.items() if key not in commands}
    section = data.get(command) or data.get(command.replace("-", "_")) or {}
    if not isinstance(section, dict):
        raise UsageError(f"--config {path}: [{command}] must be a table")
    values.update(section)
    return {str(key).replace("-", "_"): item for key, item in values.items()}
