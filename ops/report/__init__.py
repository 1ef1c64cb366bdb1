"""``cloak report``: one self-contained HTML page (``OUT/index.html`` + ``OUT/thumbs/``) of a poison × defence grid
or of one poison/purify run. :mod:`.model` reads the runs into dataclasses, :mod:`.html` renders them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UsageError
from ..io import MANIFEST_NAME, atomic_write_bytes
from .html import THUMB_DIR, Thumbnails, grid_page, run_page
from .model import Grid, Manifests, build_grid, discover, load_json, read_run

INDEX_NAME = "index.html"


@dataclass
class ReportSettings:
    inputs: Sequence[Path]
    output: Path
    rows: str = "poison"
    cols: str = "defense"
    metric: str | None = None
    pick: str | None = None
    average_row: str | None = None
    average_exclude: Sequence[str] = field(default_factory=tuple)
    thumb_size: int = 128
    preview_size: int = 256
    title: str | None = None


def check_output(output: Path, inputs: Sequence[Path]) -> None:
    """OUT must not be an input folder (or inside one), and an existing OUT must be empty or an earlier report."""
    out = Path(output).resolve()
    for raw in inputs:
        folder = Path(raw).resolve()
        if folder.is_dir() and (out == folder or folder in out.parents):
            raise UsageError(f"--output {output} is inside the input folder {raw}: choose another folder")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output {output} is a file: give a folder")
    if (out / THUMB_DIR).is_symlink():  # thumbnails are written and pruned there: never in a folder it points to
        raise UsageError(f"--output {output}: {THUMB_DIR} is a symlink; remove it (cloak does not follow links "
                         "inside its output folder)")
    if out.is_dir() and any(out.iterdir()):
        previous = load_json(out / MANIFEST_NAME)
        if not previous or previous.get("command") != "report":
            raise UsageError(f"--output {output} exists and holds files cloak report did not write: "
                             "choose an empty or new folder")


def run(settings: ReportSettings) -> dict:
    """Write the report; returns ``{"index", "mode", "thumbnails", "cells"|"runs"}``."""
    if settings.thumb_size < 16 or settings.preview_size < 16:
        raise UsageError("--thumb-size and --preview-size must be at least 16 px")
    score_paths, run_folders = discover(settings.inputs)
    if score_paths and run_folders:
        raise UsageError("give either cloak score files (grid) or poison/purify folders (single run), not both")
    check_output(settings.output, settings.inputs)
    out = Path(settings.output)
    out.mkdir(parents=True, exist_ok=True)
    thumbs = Thumbnails(out, settings.thumb_size)
    if score_paths:
        grid = build_grid(score_paths, settings.rows, settings.cols, settings.metric, settings.pick,
                          settings.average_row, settings.average_exclude)
        title = settings.title or f"cloak report: {grid.row_key} × {grid.col_key}"
        page = grid_page(grid, thumbs, title, settings.preview_size)
        summary = {"mode": "grid", "rows": grid.rows, "cols": grid.cols,
                   "cells": sum(1 for cell in grid.cells.values() if cell.source is not None)}
    else:
        manifests = Manifests()
        runs = [read_run(folder, manifests, str(folder)) for folder in run_folders]
        title = settings.title or f"cloak report: {', '.join(str(f) for f in run_folders)}"
        page = run_page(runs, thumbs, title, settings.preview_size)
        summary = {"mode": "run", "runs": [str(f) for f in run_folders],
                   "images": sum(len(r.previews) for r in runs)}
    index = out / INDEX_NAME
    atomic_write_bytes(index, page.encode("utf-8"))
    _prune_thumbnails(out, {p.name for p in thumbs.written} | _referenced(page))
    import json

    from ..manifest import _now, package_versions
    from ..provenance import command_argv

    atomic_write_bytes(out / MANIFEST_NAME, json.dumps({
        "format": 1, "command": "report", "argv": command_argv(), "updated": _now(), "versions": package_versions(),
        "inputs": [str(Path(p).resolve()) for p in settings.inputs],
        "files": {INDEX_NAME: {"status": "done"}}, **summary}, indent=2, default=str).encode() + b"\n")
    return {"index": str(index), "thumbnails": len(_referenced(page)), **summary}


def _referenced(page: str) -> set[str]:
    import re

    return set(re.findall(rf'src="{THUMB_DIR}/([0-9a-f]+\.png)"', page))


def _prune_thumbnails(out: Path, keep: set[str]) -> None:
    """Remove thumbnails an earlier report wrote that this page no longer uses (only our hash-named PNGs)."""
    import re

    folder = out / THUMB_DIR
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        if re.fullmatch(r"[0-9a-f]{20}\.png", path.name) and path.name not in keep and not path.is_symlink():
            path.unlink()


__all__ = ["Grid", "ReportSettings", "run"]
