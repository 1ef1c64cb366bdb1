"""``cloak score``'s library: concepts, references, per-concept then dataset means, the CSV, and result tables.
The run itself (gathering, the metric loop, the score file, its manifest) is :mod:`ops.commands.score`; ``cloak
report`` reads the means and table cells through the functions here.

Averaging follows paper 000 §5.1.3: "metrics first averaged across all generated images per concept and then across
all concepts in a dataset" — so a concept with 100 images weighs as much as one with 5. Undefined values (``None``:
no face for ISM, a NaN) are left out of a mean; set metrics (FID) have one value per concept.

Concepts: by default the first subfolder of each image's relative path (or, for a flat folder, the folder's own
name); ``group_by="none"`` puts everything in one concept, ``field:NAME`` takes a field of the ``cloak generate``
record of the image (e.g. ``field:token``), ``regex:PATTERN`` the first group (or whole match) of PATTERN searched
in the relative path. Clean references (``--ref``) are grouped the same way by their first subfolder; a flat
reference folder serves every concept. Paired metrics match images and references by relative path without the
extension (``sub/x.png`` ↔ ``sub/x.jpg``), or by a unique stem.

Prompts for ``clip`` come from the ``cloak.json`` that ``cloak generate`` writes next to its images: the per-file
record's ``prompt`` (the token already filled in) and ``token`` (or the manifest's ``params.token``). Assumed record
layout (agreed with the generate command): ``files[<rel>] = {"prompt": ..., "token": ..., ...}``; a ``stats`` or
``params`` sub-dict with those keys is read too. The token is removed from the prompt before scoring.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from .errors import RejectedInput, UsageError
from .io import InputItem, read_image

FLAT = "*"


# ---------------------------------------------------------------------------------------------- grouping
def remove_token(prompt: str, token: str | None) -> str:
    """``"a <R*> on the beach"`` minus ``<R*>`` → ``"a on the beach"`` (spaces collapsed)."""
    if token:
        prompt = prompt.replace(token, " ")
    return re.sub(r"\s+", " ", prompt).strip()


def record_field(record: dict, manifest: dict, key: str) -> Any:
    for source in (record, record.get("stats") or {}, record.get("params") or {}, manifest.get("params") or {}):
        if isinstance(source, dict) and source.get(key) not in (None, ""):
            return source[key]
    return None


class GenerateRecords:
    """Finds the ``cloak generate`` record of an image: the nearest ``cloak.json`` above it that lists it."""

    def __init__(self) -> None:
        self._manifests: dict[Path, dict | None] = {}

    def _load(self, folder: Path) -> dict | None:
        if folder not in self._manifests:
            from .manifest import read_manifest

            self._manifests[folder] = read_manifest(folder)  # cloak.json plus the record logs of a killed run
        return self._manifests[folder]

    def lookup(self, path: Path) -> tuple[dict, dict]:
        """``(record, manifest)`` for ``path``; empty dicts when no manifest lists it."""
        path = path.resolve()
        for folder in list(path.parents)[:4]:
            manifest = self._load(folder)
            if manifest:
                record = (manifest.get("files") or {}).get(path.relative_to(folder).as_posix())
                if isinstance(record, dict):
                    return record, manifest
        return {}, {}


def concept_of(item: InputItem, group_by: str, record: dict, manifest: dict) -> str:
    """The concept an image belongs to (see the module docstring)."""
    if group_by == "none":
        return "all"
    if group_by == "folder":
        return item.rel.parts[0] if len(item.rel.parts) > 1 else (item.path.parent.name or "all")
    if group_by.startswith("field:"):
        value = record_field(record, manifest, group_by[6:])
        if value is None:
            raise RejectedInput(f"--group-by {group_by}: its cloak generate record has no field {group_by[6:]!r}")
        return str(value)
    if group_by.startswith("regex:"):
        match = re.search(group_by[6:], item.rel.as_posix())
        if not match:
            raise RejectedInput(f"--group-by {group_by}: the pattern does not match {item.rel}")
        return match.group(1) if match.groups() else match.group(0)
    raise UsageError(f"--group-by {group_by!r}: use folder, none, field:NAME or regex:PATTERN")


def check_group_by(group_by: str) -> None:
    if group_by in ("folder", "none") or group_by.startswith("field:"):
        return
    if group_by.startswith("regex:"):
        try:
            re.compile(group_by[6:])
        except re.error as exc:
            raise UsageError(f"--group-by {group_by!r}: bad regular expression ({exc})") from None
        return
    raise UsageError(f"--group-by {group_by!r}: use folder, none, field:NAME or regex:PATTERN")


@dataclass
class References:
    """Clean reference images, decoded once: by concept (``*`` = flat folder, for all) and by name."""

    by_concept: dict[str, list] = field(default_factory=dict)
    by_key: dict[str, Any] = field(default_factory=dict)
    by_stem: dict[str, list] = field(default_factory=dict)
    rejected: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def load(cls, items: Sequence[InputItem], max_pixels: int) -> References:
        refs = cls()
        for item in items:
            try:
                rgb = read_image(item.path, max_pixels).rgb
            except RejectedInput as exc:
                refs.rejected.append((f"ref:{item.rel}", str(exc)))
                continue
            concept = item.rel.parts[0] if len(item.rel.parts) > 1 else FLAT
            refs.by_concept.setdefault(concept, []).append(rgb)
            refs.by_key[item.rel.with_suffix("").as_posix()] = rgb
            refs.by_stem.setdefault(item.rel.stem, []).append(rgb)
        return refs

    def for_concept(self, concept: str) -> list:
        return self.by_concept.get(concept) or self.by_concept.get(FLAT) or []

    def paired(self, rel: PurePosixPath):
        found = self.by_key.get(rel.with_suffix("").as_posix())
        if found is None and len(self.by_stem.get(rel.stem, [])) == 1:
            found = self.by_stem[rel.stem][0]
        return found


# --------------------------------------------------------------------------------------------- averaging
def mean(values: Sequence[float | None]) -> float | None:
    kept = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return sum(kept) / len(kept) if kept else None


def aggregate(records: Sequence[dict], metrics: Sequence[str],
              concept_level: dict[str, dict[str, float | None]] | None = None) -> tuple[dict, dict]:
    """Per-concept means of the per-image values, then the dataset mean = the mean of the concept means.

    ``concept_level[metric][concept]`` supplies set metrics (FID) directly. Returns ``(concepts, dataset)`` where
    ``concepts[c] = {"images": n, metric: value}`` and ``dataset = {"concepts": k, "images": n, metric: value}``.
    """
    concept_level = concept_level or {}
    order: list[str] = []
    for record in records:
        if record["concept"] not in order:
            order.append(record["concept"])
    concepts: dict[str, dict] = {}
    for concept in order:
        rows = [r for r in records if r["concept"] == concept and r.get("status", "done") == "done"]
        entry: dict[str, Any] = {"images": len(rows)}
        for metric in metrics:
            if metric in concept_level:
                entry[metric] = concept_level[metric].get(concept)
            else:
                entry[metric] = mean([r["metrics"].get(metric) for r in rows])
        concepts[concept] = entry
    dataset: dict[str, Any] = {"concepts": len(concepts), "images": sum(c["images"] for c in concepts.values())}
    for metric in metrics:
        dataset[metric] = mean([entry[metric] for entry in concepts.values()])
    return concepts, dataset


# ------------------------------------------------------------------------------------------------ writing
def _cell(value: Any, digits: int = 4) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def result_csv(result: dict) -> str:
    """Rows for every image, then every concept mean, then the dataset mean (column ``level``)."""
    metrics = result["metrics"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["level", "concept", "image", "images", *metrics])
    for row in result["images"]:
        writer.writerow(["image", row["concept"], row["image"], 1, *(_cell(row["metrics"].get(m), 6) for m in metrics)])
    for concept, entry in result["concepts"].items():
        writer.writerow(["concept", concept, "", entry["images"], *(_cell(entry.get(m), 6) for m in metrics)])
    dataset = result["dataset"]
    writer.writerow(["dataset", "", "", dataset["images"], *(_cell(dataset.get(m), 6) for m in metrics)])
    return buffer.getvalue()


CSV_HEADER = "level,concept,image,images"


def is_score_output(path: Path) -> bool:
    """Whether ``path`` is a score file cloak wrote (``cloak score`` replaces only those)."""
    try:
        with open(path, "rb") as handle:
            data = json.loads(handle.read(64 << 20))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("command") == "score"


def is_score_csv(path: Path) -> bool:
    """Whether ``path`` is a score CSV cloak wrote."""
    try:
        with open(path, "rb") as handle:
            return handle.read(len(CSV_HEADER)).decode("utf-8", "replace") == CSV_HEADER
    except OSError:
        return False


def result_json(document: dict) -> bytes:
    """The score file's bytes (indented JSON, one trailing newline)."""
    return json.dumps(document, indent=2, default=str).encode() + b"\n"


# -------------------------------------------------------------------------------------------- table merge
def _label(data: dict, key: str, path: Path) -> str:
    for source in (data.get("labels") or {}, data.get("params") or {}):
        if key in source and source[key] is not None:
            return str(source[key])
    raise UsageError(f"{path}: no label {key!r} (score it with --label {key}=VALUE)")


def merge_tables(paths: Sequence[Path], rows: str, cols: str, metric: str | None = None,
                 average_row: str | None = None, exclude: Sequence[str] = ()) -> dict[str, Any]:
    """Dataset means of several score files as a rows × cols table (paper 000 Table 1 layout).

    Each file's cell is ``dataset[metric]``; its row and column labels come from ``labels`` (``--label``) or
    ``params``. ``average_row`` adds a row averaging the others, leaving out ``exclude`` (paper 000's "Psn Avg"
    over the poisons, without "clean"). Returns ``{"metric", "rows", "cols", "cells": {row: {col: value}}}``.
    """
    cells: dict[str, dict[str, float | None]] = {}
    row_order: list[str] = []
    col_order: list[str] = []
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise UsageError(f"--table {path}: not a readable score file ({exc})") from None
        if not isinstance(data.get("dataset"), dict):
            raise UsageError(f"--table {path}: field 'dataset' missing (not a cloak score output)")
        chosen = metric or (data.get("metrics") or [None])[0]
        if chosen is None or chosen not in data["dataset"]:
            raise UsageError(f"--table {path}: field 'dataset.{chosen}' missing (pick one with --metric)")
        metric = chosen
        row, col = _label(data, rows, path), _label(data, cols, path)
        if col in cells.get(row, {}):
            raise UsageError(f"--table: two files give cell ({row}, {col}); the second is {path}")
        row_order += [row] if row not in row_order else []
        col_order += [col] if col not in col_order else []
        cells.setdefault(row, {})[col] = data["dataset"][metric]
    if average_row:
        kept = [row for row in row_order if row not in set(exclude)]
        cells[average_row] = {col: mean([cells[row].get(col) for row in kept]) for col in col_order}
        row_order.append(average_row)
    return {"metric": metric, "row_key": rows, "col_key": cols, "rows": row_order, "cols": col_order,
            "cells": cells}


def table_markdown(table: dict, digits: int = 2) -> str:
    header = f"| {table['row_key']} \\ {table['col_key']} | " + " | ".join(table["cols"]) + " |"
    lines = [f"{table['metric']}", "", header, "|" + "---|" * (len(table["cols"]) + 1)]
    for row in table["rows"]:
        lines.append(f"| {row} | " + " | ".join(_cell(table["cells"][row].get(c), digits) for c in table["cols"])
                     + " |")
    return "\n".join(lines) + "\n"


def table_csv(table: dict) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([f"{table['row_key']}\\{table['col_key']}", *table["cols"]])
    for row in table["rows"]:
        writer.writerow([row, *(_cell(table["cells"][row].get(c), 6) for c in table["cols"])])
    return buffer.getvalue()


def heatmap_png(table: dict) -> bytes | None:
    """A heatmap PNG of the table (matplotlib, Agg), values printed in the cells; ``None`` when the optional extra
    ``plot`` (matplotlib) is not installed."""
    import numpy as np

    from .extras import pyplot

    plt = pyplot()
    if plt is None:
        return None
    values = np.array([[np.nan if table["cells"][r].get(c) is None else table["cells"][r][c] for c in table["cols"]]
                       for r in table["rows"]], dtype=float)
    figure, axes = plt.subplots(figsize=(1.2 + 0.9 * len(table["cols"]), 1.0 + 0.45 * len(table["rows"])))
    image = axes.imshow(values, cmap="viridis", aspect="auto")
    axes.set_xticks(range(len(table["cols"])), table["cols"], rotation=45, ha="right")
    axes.set_yticks(range(len(table["rows"])), table["rows"])
    axes.set_xlabel(table["col_key"])
    axes.set_ylabel(table["row_key"])
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            if not np.isnan(values[i, j]):
                axes.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=8, color="white")
    figure.colorbar(image, ax=axes, label=table["metric"])
    axes.set_title(table["metric"])
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    plt.close(figure)
    return buffer.getvalue()


def table_paths(output: Path) -> list[Path]:
    """``output`` (.md, .csv, .png, .json or a stem) → ``[stem.md, stem.csv, stem.png]``."""
    output = Path(output)
    stem = output.with_suffix("") if output.suffix.lower() in (".md", ".csv", ".png", ".json") else output
    return [stem.with_suffix(".md"), stem.with_suffix(".csv"), stem.with_suffix(".png")]
