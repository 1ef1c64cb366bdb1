"""The data model of ``cloak report``: score files and run folders in, plain dataclasses out (no HTML here).

Grid mode reads ``cloak score`` files labelled with ``--label`` (rows × cols, the numbers from
:func:`cloaklab.ops.score.merge_tables`, the code behind ``cloak score --table``) and follows each generated image
back through the ``cloak.json`` manifests that made it:

    score file → image ``path`` → ``cloak generate`` manifest (prompt, seed, ``--embedding``/``--lora``/``--unet``)
    → the ``cloak train-ti``/``train-db`` manifest beside (or up to two folders above) that file (preset: JPEG /
    mask settings; its input folder)
    → ``cloak poison`` manifest of that folder, if any (per-file source, L∞, PSNR, SSIM).

Every link is optional: a missing manifest leaves that part of the page empty, never an error. Relative paths in a
manifest's ``argv`` are resolved against its ``cwd`` (recorded since cloak report exists), then the report's own
working directory.

Run mode reads one ``cloak poison`` (or ``cloak purify``) output folder: each file before and after.
"""

from __future__ import annotations

import json
import math
import os
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..io import MANIFEST_NAME
from ..score import mean, merge_tables

RUN_COMMANDS = ("poison", "purify")


# -------------------------------------------------------------------------------------------------- model
@dataclass
class Sample:
    """One generated image of a cell with its score record."""

    path: Path | None
    image: str  # the score file's relative name
    concept: str
    metrics: dict[str, float | None]
    prompt: str | None = None
    seed: int | None = None
    status: str = "done"


@dataclass
class Training:
    """What one concept's training saw: the clean, the poisoned and the defended (after the preset) image."""

    concept: str
    name: str
    clean: Path | None = None
    poisoned: Path | None = None
    defended: Any = None  # (H, W, 3) uint8 array, rendered from the train-ti settings
    defence: str = ""


@dataclass
class Step:
    """One command of a cell's pipeline (poison, train-ti, generate, score) for one concept."""

    kind: str
    concept: str
    argv: list[str]
    seconds_per_image: float | None = None
    seconds_total: float | None = None
    peak_rss_mb: float | None = None
    peak_cuda_mb: float | None = None
    per: str = "image"  # what seconds_per_image counts: "image", or "step" for training

    @property
    def command_line(self) -> str:
        argv = list(self.argv)
        if argv and Path(argv[0]).name in ("cloak", "__main__.py", "main.py"):
            argv[0] = "cloak"
        return shlex.join(argv)


@dataclass
class Preview:
    """One file of a poison/purify run: original | processed | amplified difference, and its numbers."""

    name: str
    original: Path | None
    processed: Path
    linf: float | None = None
    psnr: float | None = None
    ssim: float | None = None
    seconds: float | None = None
    peak_rss_mb: float | None = None
    peak_cuda_mb: float | None = None


@dataclass
class Run:
    """A poison/purify output folder and its previews."""

    folder: Path
    command: str
    label: str
    argv: list[str]
    previews: list[Preview] = field(default_factory=list)
    params: dict = field(default_factory=dict)


@dataclass
class Cell:
    row: str
    col: str
    values: dict[str, float | None]
    source: Path | None = None
    samples: list[Sample] = field(default_factory=list)
    picks: dict[str, Sample] = field(default_factory=dict)  # best / median / worst
    training: list[Training] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)


@dataclass
class Grid:
    row_key: str
    col_key: str
    metrics: list[str]
    color_metric: str
    pick_metric: str | None
    tables: dict[str, dict]  # metric → merge_tables(...) result
    rows: list[str]
    cols: list[str]
    cells: dict[tuple[str, str], Cell]
    average_row: str | None = None
    runs: list[Run] = field(default_factory=list)


# ------------------------------------------------------------------------------------------ manifests, argv
class Manifests:
    """Manifests read once each: ``cloak.json`` merged with the record logs of a run still going or killed
    (:func:`ops.manifest.read_manifest`, as ``cloak score`` reads them)."""

    def __init__(self) -> None:
        self._cache: dict[Path, dict | None] = {}

    def load(self, folder: Path | None) -> dict | None:
        if folder is None:
            return None
        folder = folder.resolve()
        if folder not in self._cache:
            from ..manifest import read_manifest

            data = read_manifest(folder)
            self._cache[folder] = anchor(data, folder) if isinstance(data, dict) else None
        return self._cache[folder]

    def owner(self, path: Path) -> tuple[Path | None, dict, dict]:
        """``(folder, manifest, record)`` of the nearest manifest above ``path`` that lists it."""
        path = path.resolve()
        for folder in list(path.parents)[:4]:
            manifest = self.load(folder)
            if manifest:
                record = (manifest.get("files") or {}).get(path.relative_to(folder).as_posix())
                if isinstance(record, dict):
                    return folder, manifest, record
        return None, {}, {}


def anchor(data: dict, folder: Path) -> dict:
    """Note where a manifest or score file lives: its relative ``cwd`` and paths are relative to that folder
    (``ops/provenance.py``)."""
    data["_folder"] = str(folder)
    cwd = data.get("cwd")
    if isinstance(cwd, str) and cwd and not Path(cwd).is_absolute():
        data["cwd"] = os.path.normpath(folder / cwd)
    return data


def resolve_path(raw: str | None, manifest: dict | None = None, base: Path | None = None) -> Path | None:
    """A path from a manifest: as written if absolute, else against the manifest's ``cwd`` (argv), its own folder
    (recorded sources), ``base``, the cwd."""
    if not raw:
        return None
    path = Path(raw)
    if path.is_absolute():
        return path if path.exists() else None
    for root in ((manifest or {}).get("cwd"), (manifest or {}).get("_folder"), base, Path.cwd()):
        if root and (Path(root) / path).exists():
            return (Path(root) / path).resolve()
    return None


def option_value(argv: Sequence[str], *names: str) -> str | None:
    """The value of ``--name VALUE`` / ``--name=VALUE`` in ``argv`` (the last one given)."""
    found = None
    for index, token in enumerate(argv):
        for name in names:
            if token == name and index + 1 < len(argv):
                found = argv[index + 1]
            elif token.startswith(name + "="):
                found = token[len(name) + 1:]
    return found


def first_input(argv: Sequence[str], command: str) -> str | None:
    """The first INPUT of ``cloak COMMAND INPUT... [options]``: the token after the command name, else the first
    token that is neither an option nor an option's value."""
    tokens = list(argv)
    start = tokens.index(command) + 1 if command in tokens else 1
    rest = tokens[start:]
    if rest and not rest[0].startswith("-"):
        return rest[0]
    for index, token in enumerate(rest):
        if not token.startswith("-") and index > 0 and not (rest[index - 1].startswith("-")
                                                             and "=" not in rest[index - 1]):
            return token
    return None


def _records_mean(records: Sequence[dict], key: str) -> float | None:
    return mean([r.get(key) for r in records if isinstance(r.get(key), (int, float))])


def _records_max(records: Sequence[dict], key: str) -> float | None:
    values = [r[key] for r in records if isinstance(r.get(key), (int, float))]
    return max(values) if values else None


def _done(manifest: dict) -> list[dict]:
    return [r for r in (manifest.get("files") or {}).values() if isinstance(r, dict) and r.get("status") == "done"]


# ------------------------------------------------------------------------------------------------ inputs
def load_json(path: Path) -> dict | None:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return anchor(data, Path(path).resolve().parent) if isinstance(data, dict) else None


def is_score_file(data: dict | None) -> bool:
    return bool(data) and isinstance(data.get("dataset"), dict) and isinstance(data.get("images"), list)


def discover(inputs: Sequence[Path]) -> tuple[list[Path], list[Path]]:
    """Split the inputs into score files and poison/purify run folders.

    A ``.json`` file must be a ``cloak score`` output; a folder is a run when its ``cloak.json`` says poison or
    purify, otherwise every score file below it (recursively) is taken.
    """
    scores: list[Path] = []
    runs: list[Path] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_file():
            data = load_json(path)
            if path.name == MANIFEST_NAME and not is_score_file(data):
                continue  # the cloak.json a glob such as runs/*.json picks up beside the score files it records
            if not is_score_file(data):
                raise UsageError(f"{path}: not a cloak score file (fields 'dataset' and 'images' missing)")
            scores.append(path)
        elif path.is_dir():
            manifest = load_json(path / MANIFEST_NAME)
            if manifest and manifest.get("command") in RUN_COMMANDS:
                runs.append(path)
                continue
            found = [p for p in sorted(path.rglob("*.json"))
                     if p.name != MANIFEST_NAME and is_score_file(load_json(p))]
            if not found:
                raise UsageError(f"{path}: no cloak score files below it and no poison/purify cloak.json in it")
            scores += found
        else:
            raise UsageError(f"input not found: {raw}")
    if not scores and not runs:
        raise UsageError("no inputs: give cloak score files, folders of them, or a poison/purify output folder")
    return scores, runs


# ------------------------------------------------------------------------------------------------ previews
def read_run(folder: Path, manifests: Manifests, label: str | None = None) -> Run:
    """Every done file of a poison/purify folder as a :class:`Preview` (stats from its record)."""
    folder = Path(folder)
    manifest = manifests.load(folder) or {}
    run = Run(folder=folder, command=str(manifest.get("command", "")), label=label or folder.name,
              argv=list(manifest.get("argv") or []), params=manifest.get("params") or {})
    for name, record in sorted((manifest.get("files") or {}).items()):
        if not isinstance(record, dict) or record.get("status") != "done" or not record.get("output"):
            continue
        processed = folder / record["output"]
        if not processed.is_file():
            continue
        stats = record.get("stats") or {}
        preview = Preview(
            name=name, original=resolve_path(record.get("source"), manifest, folder), processed=processed,
            linf=stats.get("linf"), psnr=stats.get("psnr"), ssim=stats.get("ssim"), seconds=record.get("seconds"),
            peak_rss_mb=record.get("peak_rss_mb"), peak_cuda_mb=record.get("peak_cuda_mb"))
        if preview.original is not None and None in (preview.linf, preview.psnr, preview.ssim):
            try:
                measured = measure(preview.original, preview.processed)
            except (OSError, ValueError):
                measured = (None, None, None)
            preview.linf, preview.psnr, preview.ssim = (
                value if value is not None else new for value, new in
                zip((preview.linf, preview.psnr, preview.ssim), measured))
        run.previews.append(preview)
    return run


def load_pair(original: Path, processed: Path):
    """Both images as float64 ``(H, W, 3)`` arrays in [0, 1], EXIF-oriented; the original resized (bicubic) to the
    processed image's size when they differ."""
    import numpy as np
    from PIL import Image, ImageOps

    with Image.open(processed) as opened:
        after = ImageOps.exif_transpose(opened).convert("RGB")
    with Image.open(original) as opened:
        before = ImageOps.exif_transpose(opened).convert("RGB")
    if before.size != after.size:
        before = before.resize(after.size, Image.BICUBIC)
    return np.asarray(before, dtype=np.float64) / 255, np.asarray(after, dtype=np.float64) / 255


def measure(original: Path, processed: Path) -> tuple[float, float | None, float]:
    """``(L∞ in 1/255 steps, PSNR dB, SSIM)`` of processed vs original (scikit-image, as ``cloak poison`` records
    them); PSNR is None for identical images."""
    from ..metrics.basic import psnr, ssim

    a, b = load_pair(original, processed)
    largest = float(abs(b - a).max())
    return largest * 255, (psnr(b, a) if largest > 0 else None), ssim(b, a)


# ---------------------------------------------------------------------------------------------------- grid
def _label(data: dict, key: str) -> str | None:
    for source in (data.get("labels") or {}, data.get("params") or {}):
        if source.get(key) is not None:
            return str(source[key])
    return None


def _sample_path(record: dict, data: dict, score_path: Path) -> Path | None:
    """The image a score record describes: its ``path``; for older files the relative name under an input
    folder of the score command line."""
    found = resolve_path(record.get("path"), data, score_path.parent)
    if found is not None or not record.get("image"):
        return found
    argv = [t for t in (data.get("argv") or []) if not t.startswith("-")]
    for token in argv:
        folder = resolve_path(token, data, score_path.parent)
        if folder is None or not folder.is_dir():
            continue
        for candidate in (folder / record["image"],
                          folder / record.get("concept", "") / record["image"]):
            if candidate.is_file() and (candidate.parent.name == record.get("concept") or folder.name ==
                                        record.get("concept") or len(Path(record["image"]).parts) > 1):
                return candidate.resolve()
    return None


def _score_step(path: Path, data: dict) -> Step:
    """The score step of a cell: its command line and time from the record of the score file in its folder's
    ``cloak.json`` (files written before that record existed carry ``argv`` and per-image ``seconds`` themselves)."""
    if data.get("argv"):
        records = [r for r in data.get("images") or [] if isinstance(r, dict)]
        return Step("score", "all", list(data["argv"]), _records_mean(records, "seconds"),
                    sum(r.get("seconds") or 0 for r in records))
    from ..manifest import read_manifest

    record = ((read_manifest(Path(path).parent) or {}).get("files") or {}).get(Path(path).name) or {}
    seconds, images = record.get("seconds"), record.get("images")
    per_image = seconds / images if isinstance(seconds, (int, float)) and images else None
    return Step("score", "all", list(record.get("argv") or []), per_image, seconds)


def pick_samples(samples: Sequence[Sample], metric: str | None, higher_is_better: bool) -> dict[str, Sample]:
    """Best, median and worst sample by ``metric`` (samples without a value are left out)."""
    scored = [s for s in samples if metric and isinstance(s.metrics.get(metric), (int, float))
              and math.isfinite(s.metrics[metric])]
    if not scored:
        return {}
    ordered = sorted(scored, key=lambda s: s.metrics[metric], reverse=higher_is_better)
    return {"best": ordered[0], "median": ordered[(len(ordered) - 1) // 2], "worst": ordered[-1]}


def defended_image(image_path: Path, train_params: dict, masks: Path | None) -> Any:
    """The training image after the train-ti preset's input transform, as ``(H, W, 3)`` uint8: the JPEG round trip
    of ``--preset jpeg``/``szt`` (the same :func:`load_instance_images` call training makes), and, with a loss mask,
    the area outside the (dilated) mask darkened to show what the loss ignores."""
    from pathlib import PurePosixPath

    import numpy as np
    from PIL import Image

    from ..io import InputItem
    from ..train.data import load_instance_images

    with Image.open(image_path) as opened:
        size = min(opened.size)
    resolution = max(8, (int(train_params.get("resolution") or size) // 8) * 8)
    masked = masks is not None and train_params.get("mask_mode") not in (None, "none")
    data = load_instance_images([InputItem(image_path, PurePosixPath(image_path.name))], resolution,
                                jpeg_quality=train_params.get("jpeg"), jpeg_scale=train_params.get("jpeg_scale"),
                                mask_dir=masks if masked else None, dilate=int(train_params.get("dilate") or 0))
    array = data.images[0].permute(1, 2, 0).clamp(0, 1).numpy()
    if data.masks is not None:
        mask = data.masks[0][0].numpy()[..., None]
        array = array * (0.3 + 0.7 * mask)
    return (array * 255).round().astype(np.uint8)


def _follow(sample_paths: Sequence[Path], manifests: Manifests) -> dict[str, Any]:
    """The manifests behind one concept's generated images of one cell."""
    found: dict[str, Any] = {"generate": None, "train": None, "train_folder": None, "train_input": None,
                             "poison": None, "poison_folder": None, "records": {}}
    for path in sample_paths:
        folder, manifest, record = manifests.owner(path)
        if manifest.get("command") == "generate":
            found["records"][path] = record
            if found["generate"] is None:
                found["generate"], found["generate_folder"] = manifest, folder
    generate = found["generate"]
    if generate is None:
        return found
    argv = generate.get("argv") or []
    trained = None
    for flag in ("--embedding", "--lora", "--unet"):  # TI file; DreamBooth/LoRA file or folder
        trained = resolve_path(option_value(argv, flag), generate)
        if trained is not None:
            break
    train = train_folder = None
    for folder in ((trained, trained.parent, trained.parent.parent) if trained is not None else ()):
        train = manifests.load(folder) if folder.is_dir() else None
        if train and train.get("command") in ("train-ti", "train-db"):
            train_folder = folder
            break
    if train_folder is None:
        return found
    found["train"], found["train_folder"] = train, train_folder
    train_input = resolve_path(first_input(train.get("argv") or [], str(train["command"])), train)
    found["train_input"] = train_input
    poison = manifests.load(train_input) if train_input is not None and train_input.is_dir() else None
    if poison and poison.get("command") == "poison":
        found["poison"], found["poison_folder"] = poison, train_input
    elif poison:  # e.g. a cloak purify output: neither clean nor poisoned; only the defended image is shown
        found["other_input"] = str(poison.get("command"))
    return found


def _training(concept: str, lineage: dict, render_defended: bool) -> Training | None:
    train, train_input = lineage["train"], lineage["train_input"]
    if train is None or train_input is None or not train_input.is_dir():
        return None
    params = train.get("params") or {}
    names = [n for n in params.get("inputs") or [] if (train_input / n).is_file()]
    if not names:
        names = sorted(p.name for p in train_input.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not names:
        return None
    name = names[0]
    entry = Training(concept=concept, name=name)
    poison = lineage["poison"]
    if poison is not None:
        entry.poisoned = train_input / name
        record = (poison.get("files") or {}).get(Path(name).with_suffix(".png").as_posix()) or {}
        entry.clean = resolve_path(record.get("source"), poison, train_input)
    elif lineage.get("other_input"):
        entry.defence = f"input: a cloak {lineage['other_input']} output; "
    else:
        entry.clean = train_input / name
    parts = [f"{entry.defence}preset {params.get('preset') or 'custom'}"]
    if params.get("jpeg"):
        parts.append(f"JPEG q{params['jpeg']}")
    if params.get("mask_mode") not in (None, "none"):
        parts.append(f"loss mask (dilate {params.get('dilate') or 0})")
    if params.get("t_sampler") not in (None, "uniform"):
        parts.append(f"t {params['t_sampler']} ρ {params.get('t_param')}")
    entry.defence = ", ".join(parts)
    if render_defended:
        masks = resolve_path(params.get("masks"), train)
        try:
            entry.defended = defended_image(train_input / name, params, masks)
        except Exception:  # noqa: BLE001 - a preview must not stop the report (e.g. a moved mask folder)
            entry.defended = None
    return entry


def _steps(concept: str, lineage: dict) -> list[Step]:
    steps = []
    poison = lineage["poison"]
    if poison is not None:
        done = _done(poison)
        steps.append(Step("poison", concept, list(poison.get("argv") or []), _records_mean(done, "seconds"),
                          sum(r.get("seconds") or 0 for r in done), _records_max(done, "peak_rss_mb"),
                          _records_max(done, "peak_cuda_mb")))
    train = lineage["train"]
    if train is not None:
        done = _done(train)
        steps_done = sum(int(r.get("steps") or 0) for r in done)
        total = sum(r.get("seconds") or 0 for r in done)
        steps.append(Step(str(train.get("command")), concept, list(train.get("argv") or []),
                          None, total, _records_max(done, "peak_rss_mb"), _records_max(done, "peak_cuda_mb")))
        steps[-1].seconds_per_image = total / steps_done if steps_done else None
        steps[-1].per = "step"
    generate = lineage["generate"]
    if generate is not None:
        records = list(lineage["records"].values())
        steps.append(Step("generate", concept, list(generate.get("argv") or []), _records_mean(records, "seconds"),
                          sum(r.get("seconds") or 0 for r in records), _records_max(records, "peak_rss_mb"),
                          _records_max(records, "peak_cuda_mb")))
    return steps


def build_grid(score_paths: Sequence[Path], rows: str = "poison", cols: str = "defense",
               metric: str | None = None, pick: str | None = None, average_row: str | None = None,
               average_exclude: Sequence[str] = (), render_defended: bool = True) -> Grid:
    """Read the score files into a :class:`Grid`.

    The values of every metric come from :func:`merge_tables` (so a cell shows exactly what
    ``cloak score --table --metric M`` prints); ``metric`` (default: the first file's first metric) colours the
    cells, ``pick`` (default ``metric``) chooses the best / median / worst generated samples.
    """
    from ..metrics import METRICS

    documents = [(Path(p), load_json(Path(p)) or {}) for p in score_paths]
    metrics: list[str] = []
    for _, data in documents:
        metrics += [m for m in data.get("metrics") or [] if m not in metrics and m in data.get("dataset", {})]
    if not metrics:
        raise UsageError("the score files name no metrics")
    color_metric = metric or metrics[0]
    if color_metric not in metrics:
        raise UsageError(f"--metric {color_metric}: not in the score files (they have {', '.join(metrics)})")
    pick = pick or color_metric
    if pick not in metrics:
        raise UsageError(f"--pick {pick}: not in the score files (they have {', '.join(metrics)})")
    shown = [color_metric] + [m for m in metrics if m != color_metric]
    tables = {}
    for name in shown:
        having = [p for p, data in documents if name in (data.get("dataset") or {})]
        tables[name] = merge_tables(having, rows, cols, name, average_row, average_exclude)
    main = tables[color_metric]
    manifests = Manifests()
    cells: dict[tuple[str, str], Cell] = {}
    higher = METRICS[pick].higher_is_better if pick in METRICS else True
    runs: dict[Path, Run] = {}
    for path, data in documents:
        row, col = _label(data, rows), _label(data, cols)
        values = {name: tables[name]["cells"].get(row, {}).get(col) for name in shown
                  if col in tables[name]["cells"].get(row, {})}
        cell = Cell(row=row, col=col, values=values, source=path)
        by_concept: dict[str, list[Sample]] = {}
        for record in data.get("images") or []:
            sample = Sample(path=_sample_path(record, data, path), image=str(record.get("image")),
                            concept=str(record.get("concept")), metrics=dict(record.get("metrics") or {}),
                            prompt=record.get("prompt"), status=str(record.get("status", "done")))
            cell.samples.append(sample)
            by_concept.setdefault(sample.concept, []).append(sample)
        for concept, samples in by_concept.items():
            lineage = _follow([s.path for s in samples if s.path is not None], manifests)
            for sample in samples:
                record = lineage["records"].get(sample.path.resolve() if sample.path else None) or {}
                sample.prompt = record.get("prompt") or sample.prompt
                sample.seed = record.get("seed")
            training = _training(concept, lineage, render_defended)
            if training is not None:
                cell.training.append(training)
            cell.steps += _steps(concept, lineage)
            if lineage["poison_folder"] is not None and lineage["poison_folder"] not in runs:
                runs[lineage["poison_folder"]] = read_run(lineage["poison_folder"], manifests,
                                                          f"{row} · {concept}")
        cell.steps.append(_score_step(path, data))
        cell.picks = pick_samples(cell.samples, pick, higher)
        cells[(row, col)] = cell
    if average_row:
        cells.update({(average_row, col): Cell(row=average_row, col=col, values={
            name: tables[name]["cells"][average_row].get(col) for name in shown
            if col in tables[name]["cells"][average_row]}) for col in main["cols"]})
    row_order = list(dict.fromkeys(r for table in tables.values() for r in table["rows"]))
    col_order = list(dict.fromkeys(c for table in tables.values() for c in table["cols"]))
    if average_row in row_order:  # keep the average last
        row_order = [r for r in row_order if r != average_row] + [average_row]
    return Grid(row_key=rows, col_key=cols, metrics=shown, color_metric=color_metric, pick_metric=pick,
                tables=tables, rows=row_order, cols=col_order, cells=cells,
                average_row=average_row, runs=sorted(runs.values(), key=lambda r: r.label))
