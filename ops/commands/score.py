"""``cloak score``: metrics of images against clean references into one score file (+ CSV), or ``--table``: score
files merged into a rows × cols table — the settings, the run and its dry-run plan.

Concepts, references, averaging, the CSV and the table formats are library code in :mod:`ops.score` (``cloak
report`` reads them too); the metrics are :mod:`ops.metrics` (one module per family). ``-o`` names a file here, not
a folder. The score file holds only what the images and settings decide (records, means, params, versions, device),
so the Python API, the CLI and ``cloak rerun`` write the same bytes; the command line, working folder, timings and
the run spec for ``cloak rerun`` go to ``cloak.json`` in the score file's folder, one record per file written.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..metrics import (
    CLIP_DEFAULT,
    CLIPSCORE_W,
    DEFAULT_METRICS,
    DINOV2_DEFAULT,
    FID_DEFAULT_FEATURES,
    LPIPS_DEFAULT_NET,
)
from .base import Event, Plan, RunSummary, Settings, as_input_list, header_problem, no_event

TABLE_TITLE = "cloak score (per concept, then dataset)"


@dataclass(frozen=True, kw_only=True)
class ScoreSettings(Settings):
    """``metrics`` is a comma-separated list of :data:`ops.metrics.METRICS` names (``all-offline`` for every metric
    that needs no download); ``label`` holds ``KEY=VALUE`` strings stored in the score file for ``--table``. With
    ``table`` the inputs are score files and ``rows``/``cols``/``metric``/``average_*`` shape the table. The
    backbone defaults are the metric registry's (:mod:`ops.metrics`). ``class_name`` is the ``--class`` flag
    (``class`` is a Python keyword)."""

    command = "score"
    metrics: str = DEFAULT_METRICS
    ref: Path | None = None
    csv: Path | None = None
    group_by: str = "folder"
    class_name: str | None = None
    prompt: str | None = None
    token: str | None = None
    label: tuple[str, ...] = ()
    dinov2_model: str = DINOV2_DEFAULT
    clip_model: str = CLIP_DEFAULT
    clip_scale: float = CLIPSCORE_W
    clip_prefix: str = ""
    liqe_model: str | None = None
    lpips_net: str = LPIPS_DEFAULT_NET
    fid_features: str = FID_DEFAULT_FEATURES
    arcface_model: str | None = None
    vggface_model: str | None = None
    face_detector: str | None = None
    trust_pickle: bool = False
    table: bool = False
    rows: str | None = None
    cols: str | None = None
    metric: str | None = None
    average_row: str | None = None
    average_exclude: tuple[str, ...] = ()
    recursive: bool = False
    device: str = "auto"
    batch_size: int = 8
    max_pixels: int | None = None

    def check(self) -> None:
        from ..errors import UsageError
        from ..score import check_group_by

        if self.table:
            if not self.rows or not self.cols:
                raise UsageError("--table needs --rows KEY and --cols KEY (label keys of the score files)")
            return
        self.metric_specs()
        check_group_by(self.group_by)
        self.labels()

    def metric_specs(self) -> list[Any]:
        from ..metrics import parse_metrics

        return parse_metrics(self.metrics if isinstance(self.metrics, str) else ",".join(self.metrics))

    def labels(self) -> dict[str, str]:
        """``--label KEY=VALUE`` entries as a dict."""
        from ..errors import UsageError

        labels = {}
        entries = [f"{key}={value}" for key, value in self.label.items()] if isinstance(self.label, Mapping) \
            else self.label  # the Python API may pass {"poison": "adm+"}
        for entry in entries:
            key, sep, value = entry.partition("=")
            if not sep or not key:
                raise UsageError(f"--label {entry!r}: expected KEY=VALUE")
            labels[key.strip()] = value.strip()
        return labels

    def metric_options(self, device: Any) -> dict[str, Any]:
        """The keyword arguments every metric's ``build`` takes (each uses its own)."""
        return {"device": device, "dinov2_model": self.dinov2_model, "clip_model": self.clip_model,
                "clip_scale": self.clip_scale, "clip_prefix": self.clip_prefix, "liqe_model": self.liqe_model,
                "lpips_net": self.lpips_net, "fid_features": self.fid_features, "arcface_model": self.arcface_model,
                "vggface_model": self.vggface_model, "face_detector": self.face_detector,
                "trust_pickle": self.trust_pickle}

    def backbone(self, name: str) -> str | None:
        """The network (or the bundled model) metric ``name`` runs on, as recorded in the score file."""
        aligned = f" (aligned, detector {self.face_detector})" if self.face_detector not in (None, "haar") else ""
        return {"dinov2": self.dinov2_model, "clip": self.clip_model, "clip-iqa": self.clip_model,
                "clip-iqac": self.clip_model, "liqe": self.liqe_model or self.clip_model, "q": self.clip_model,
                "lpips": self.lpips_net, "fid": self.fid_features, "ism": f"{self.arcface_model}{aligned}",
                "ims": f"{self.arcface_model}+{self.vggface_model}{aligned}",
                "fdfr": self.face_detector or "opencv-haar-frontalface-default",
                "brisque": "brisque-bundled-svm"}.get(name)

    def params(self) -> dict[str, Any]:
        """The score file's ``params`` (what decides its numbers)."""
        names = [spec.name for spec in self.metric_specs()]
        return {"metrics": names, "ref": str(self.ref) if self.ref else None, "group_by": self.group_by,
                "class": self.class_name, "prompt": self.prompt, "token": self.token,
                **({"clip_scale": self.clip_scale, "clip_prefix": self.clip_prefix} if "clip" in names else {}),
                "backbones": {name: self.backbone(name) for name in names}}


Settings = ScoreSettings


@dataclass
class ScoreSummary(RunSummary):
    """A score run's summary: the dataset means (score mode) or the merged table (``--table``) ride along in
    ``--json``."""

    dataset: dict[str, Any] | None = None
    table: dict[str, Any] | None = None
    paths: list[Path] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        extra = {"dataset": self.dataset} if self.dataset is not None else {}
        if self.table is not None:
            extra = {"outputs": [str(path) for path in self.paths], **self.table}
        return {**super().as_dict(), **extra}


# --------------------------------------------------------------------------------------------------- inputs
@dataclass
class Gathered:
    """The images to score, the reference images, notes for the user, and the folders they came from."""

    items: list[Any]
    refs: list[Any]
    notes: list[str]


def gather_images(settings: ScoreSettings, inputs: Sequence[str], output: Path) -> Gathered:
    """Collect the images and references and refuse (usage error) an ``-o``/``--csv`` that is a folder, an input or
    a reference file, or an existing file cloak did not write."""
    import sys

    from ..errors import UsageError
    from ..io import check_output_file, collect_inputs
    from ..score import is_score_csv, is_score_output

    if output.exists() and output.is_dir():
        raise UsageError(f"--output {output} is a folder: give a .json file name")
    items, notes = collect_inputs(list(inputs), settings.recursive, sys.stdin)
    refs = []
    if settings.ref is not None:
        if not settings.ref.exists():
            raise UsageError(f"--ref {settings.ref}: not found")
        refs, _ = collect_inputs([str(settings.ref)], True)
    protected = [item.path for item in [*items, *refs]]
    check_output_file(output, protected, "--output", owned=is_score_output)
    if settings.csv is not None:
        check_output_file(settings.csv, protected + [output], "--csv", owned=is_score_csv)
    return Gathered(items, refs, notes)


# ------------------------------------------------------------------------------------------------- the plan
def plan(settings: ScoreSettings, inputs: Sequence[str] | str | Path, output: Path | str) -> Plan:
    """What ``run`` would do, reading only image headers and the score files' JSON."""
    output = Path(output)
    if settings.table:
        return _plan_table(settings, as_input_list(inputs), output)
    gathered = gather_images(settings, as_input_list(inputs), output)
    backbones = {name: settings.backbone(name) for name in settings.params()["metrics"]}
    result = Plan("score", str(output), settings.as_dict(), notes=list(gathered.notes),
                  model=", ".join(f"{name}: {net}" for name, net in backbones.items() if net) or None)
    for item in gathered.items:
        result.inputs.append(str(item.path))
        reason = header_problem(item.path, max_pixels=settings.max_pixels)
        if reason:
            result.rejected.append((item.rel.as_posix(), reason))
    result.run = [output.name] + ([_relative(settings.csv, output.parent)] if settings.csv else [])
    folder, why = record_folder(output, gathered)
    result.notes.append(f"the run would be recorded in {folder / 'cloak.json'}" if folder is not None
                        else f"the run would not be recorded for cloak rerun: {why}")
    return result


def split_manifests(inputs: Sequence[str]) -> tuple[list[str], list[str]]:
    """``--table`` inputs without the ``cloak.json`` manifests a glob such as ``runs/*.json`` picks up beside the
    score files (those are returned second)."""
    from ..io import MANIFEST_NAME

    manifests = [entry for entry in inputs if Path(entry).name == MANIFEST_NAME]
    return [entry for entry in inputs if entry not in manifests], manifests


def _plan_table(settings: ScoreSettings, inputs: list[str], output: Path) -> Plan:
    import json

    from ..score import table_paths

    inputs, manifests = split_manifests(inputs)
    check_table_outputs(table_paths(output), inputs)
    result = Plan("score", str(output), settings.as_dict(), inputs=list(inputs),
                  notes=[f"left out {entry}: the folder's manifest, not a score file" for entry in manifests])
    for entry in inputs:
        try:
            data = json.loads(Path(entry).read_text())
        except (OSError, ValueError) as exc:
            result.rejected.append((entry, f"not a readable score file ({exc})"))
            continue
        if not isinstance(data, dict) or not isinstance(data.get("dataset"), dict):
            result.rejected.append((entry, "field 'dataset' missing (not a cloak score output)"))
    result.run = [path.name for path in table_paths(output)]
    result.notes.append("the .png heatmap is written only with the plot extra (matplotlib)")
    return result


def check_table_outputs(paths: Sequence[Path], inputs: Sequence[str]) -> None:
    """Refuse a ``--table`` output (``.md``/``.csv``/``.png``) that is an input, or that exists and is not recorded
    as cloak's own in its folder's ``cloak.json`` (an earlier table is replaced, a user's file never)."""
    from ..io import check_output_file
    from ..manifest import owns_record, read_manifest

    def owned(path: Path) -> bool:
        data = read_manifest(path.parent) or {}
        return data.get("command") == "score" and owns_record((data.get("files") or {}).get(path.name), path.name)

    for path in paths:
        check_output_file(path, [Path(entry) for entry in inputs], "--output", owned=owned)


# -------------------------------------------------------------------------------------------------- the run
def run(settings: ScoreSettings, inputs: Sequence[str] | str | Path, output: Path | str, *,
        on_event: Event | None = None) -> ScoreSummary:
    """Score the images into the file ``output`` (and ``--csv``), or with ``table`` merge the score files given
    as inputs into ``output``'s ``.md``/``.csv``/``.png``."""
    output, on_event = Path(output), on_event or no_event
    if settings.table:
        return run_table(settings, as_input_list(inputs), output, on_event)
    return run_scores(settings, as_input_list(inputs), output, on_event)


def run_scores(settings: ScoreSettings, inputs: list[str], output: Path, on_event: Event) -> ScoreSummary:
    """Gather → decode the references → score → the score file (+ CSV) and its record → the means on stderr."""
    from ..device import resolve_device
    from ..io import DEFAULT_MAX_PIXELS
    from ..score import References, result_csv, result_json

    gathered = gather_images(settings, inputs, output)
    for note in gathered.notes:
        on_event("note", "", {"message": note})
    device = resolve_device(settings.device)
    started = time.perf_counter()
    references = References.load(gathered.refs, settings.max_pixels or DEFAULT_MAX_PIXELS) \
        if settings.ref is not None else None
    result = score_images(gathered.items, references, settings, device, on_event)
    seconds = time.perf_counter() - started
    document = score_document(settings, result, output, device)
    files = {output: result_json(document)}
    if settings.csv is not None:
        files[settings.csv] = result_csv(result).encode()
    written = write_recorded(files, output, gathered, settings, seconds, len(result["images"]), on_event)
    on_event("done", output.name, {"seconds": seconds})
    on_event("table", TABLE_TITLE, means_table(result))
    rejected = [(item["file"], item["reason"]) for item in result["rejected"]]
    return ScoreSummary(done=written, rejected=rejected, output=output, dataset=result["dataset"])


def run_table(settings: ScoreSettings, inputs: list[str], output: Path, on_event: Event) -> ScoreSummary:
    """Merge score files into a rows × cols table (paper 000 Table 1 layout): ``.md``, ``.csv``, ``.png``."""
    from ..extras import PLOT_SKIPPED
    from ..score import heatmap_png, merge_tables, table_csv, table_markdown, table_paths

    inputs, manifests = split_manifests(inputs)
    for entry in manifests:
        on_event("note", "", {"message": f"left out {entry}: the folder's manifest, not a score file"})
    merged = merge_tables([Path(entry) for entry in inputs], settings.rows, settings.cols, settings.metric,
                          settings.average_row, settings.average_exclude)
    markdown, csv_path, png = table_paths(output)
    check_table_outputs([markdown, csv_path, png], inputs)
    files = {markdown: table_markdown(merged).encode(), csv_path: table_csv(merged).encode()}
    heatmap = heatmap_png(merged)
    if heatmap is not None:
        files[png] = heatmap
    written = write_recorded(files, markdown, None, settings, None, None, on_event)
    on_event("text", "", {"text": files[markdown].decode()})
    if heatmap is None:
        on_event("note", "", {"message": PLOT_SKIPPED})
    return ScoreSummary(done=written, output=markdown, table=merged, paths=list(files))


# ----------------------------------------------------------------------------------------------- the scoring
def score_images(items: Sequence[Any], references: Any, settings: ScoreSettings, device: Any,
                 on_event: Event = no_event) -> dict[str, Any]:
    """Score ``items`` with every metric of ``settings``; return the result (records, concept and dataset means,
    rejected files). Paired/set/concept metrics need ``references`` (:class:`ops.score.References`)."""
    from ..errors import UsageError
    from ..io import iter_chunks
    from ..score import References, aggregate

    specs = settings.metric_specs()
    pending, rejected = concepts_and_prompts(items, settings)
    needs_refs = [spec.name for spec in specs if spec.kind in ("paired", "set", "concept")]
    if needs_refs and references is None:
        raise UsageError(f"{', '.join(needs_refs)} compare against clean images: pass --ref FOLDER")
    references = references or References()
    built = build_metrics(specs, settings.metric_options(device), references, pending)
    records: list[dict[str, Any]] = []
    on_event("start", "", {"total": 1})  # one file is written; the images are its steps
    seen = 0
    for chunk in iter_chunks(pending, settings.batch_size):
        records += finish_rows(score_chunk(chunk, built, references, settings, rejected, on_event), rejected,
                               on_event)
        seen += len(chunk)
        on_event("step", chunk[0][0].rel.as_posix(), {"step": seen, "total": len(pending)})
    concept_level = {metric.name: metric.concept_values() for metric, spec in zip(built, specs)
                     if spec.kind == "concept"}
    concepts, dataset = aggregate(records, [spec.name for spec in specs], concept_level)
    return {"metrics": [spec.name for spec in specs], "images": records, "concepts": concepts, "dataset": dataset,
            "rejected": [{"file": name, "reason": why} for name, why in references.rejected + rejected]}


def concepts_and_prompts(items: Sequence[Any], settings: ScoreSettings) -> tuple[list[tuple], list[tuple]]:
    """``(item, concept, prompt)`` per image — the prompt from ``--prompt`` or the image's ``cloak generate``
    record, its token removed — and the images whose concept cannot be told (rejected, with the reason)."""
    from ..errors import RejectedInput
    from ..score import GenerateRecords, concept_of, record_field, remove_token

    generate = GenerateRecords()
    pending, rejected = [], []
    for item in items:
        record, manifest = generate.lookup(item.path)
        try:
            concept = concept_of(item, settings.group_by, record, manifest)
        except RejectedInput as exc:
            rejected.append((item.rel.as_posix(), str(exc)))
            continue
        token = settings.token or record_field(record, manifest, "token")
        prompt = settings.prompt or record_field(record, manifest, "prompt")
        pending.append((item, concept, remove_token(prompt, token) if prompt else None))
    return pending, rejected


def build_metrics(specs: Sequence[Any], options: dict[str, Any], references: Any, pending: Sequence[tuple]) -> list:
    """Load each metric's backbone; set and concept metrics embed every concept's references once here."""
    from ..errors import CloakError

    ref_sets = {concept: references.for_concept(concept) for concept in dict.fromkeys(c for _, c, _ in pending)}
    built = []
    for spec in specs:
        metric = spec.build(**options)
        if spec.kind in ("set", "concept"):
            missing = [concept for concept, refs in ref_sets.items() if not refs]
            if missing:
                raise CloakError(f"{spec.name}: no clean reference images for concept {missing[0]!r} under --ref "
                                 f"(put them in a subfolder named {missing[0]!r} or use a flat folder)")
            metric.prepare(ref_sets)
        built.append(metric)
    return built


def score_chunk(chunk: Sequence[tuple], built: Sequence[Any], references: Any, settings: ScoreSettings,
                rejected: list[tuple[str, str]], on_event: Event) -> list[dict[str, Any]]:
    """Decode a batch of images and score it with every metric: one row per readable image."""
    from ..errors import RejectedInput
    from ..io import DEFAULT_MAX_PIXELS, read_image
    from ..metrics.base import ImageContext

    images, contexts, rows = [], [], []
    for item, concept, prompt in chunk:
        rel = item.rel.as_posix()
        try:
            rgb = read_image(item.path, settings.max_pixels or DEFAULT_MAX_PIXELS).rgb
        except RejectedInput as exc:
            rejected.append((rel, str(exc)))
            on_event("reject", rel, {"reason": str(exc)})
            continue
        images.append(rgb)
        contexts.append(ImageContext(rel, concept, references.paired(item.rel), prompt, settings.class_name))
        rows.append({"image": rel, "path": str(item.path.resolve()), "concept": concept, "status": "done",
                     "metrics": {}, **({"prompt": prompt} if prompt else {})})
    if images:
        for metric in built:
            for row, value in zip(rows, _metric_values(metric, images, contexts, rows)):
                row["metrics"][metric.name] = value
    return rows


def _metric_values(metric: Any, images: list, contexts: list, rows: list[dict]) -> list:
    """The metric on the batch; when one image lacks what it needs (no face, no reference), one by one, with
    ``None`` and the reason in that row's ``errors``."""
    from ..errors import RejectedInput

    try:
        return metric.score(images, contexts)
    except RejectedInput:
        values = []
        for image, context, row in zip(images, contexts, rows):
            try:
                values += metric.score([image], [context])
            except RejectedInput as exc:
                values.append(None)
                row.setdefault("errors", {})[metric.name] = str(exc)
        return values


def finish_rows(rows: list[dict[str, Any]], rejected: list[tuple[str, str]], on_event: Event) -> list[dict]:
    """A row with a metric error is ``partial`` and its image is listed as rejected (the run exits 3)."""
    for row in rows:
        if row.get("errors"):
            row["status"] = "partial"
            reason = "; ".join(row["errors"].values())
            rejected.append((row["image"], reason))
            on_event("reject", row["image"], {"reason": reason})
    return rows


# ------------------------------------------------------------------------------------------------ the writing
def score_document(settings: ScoreSettings, result: dict[str, Any], output: Path, device: Any) -> dict[str, Any]:
    """The score file: labels, params, versions and device, then the result; image paths relative to the file's
    folder where they share a parent (``ops/provenance.py``)."""
    from ..manifest import package_versions
    from ..provenance import shareable_path

    for row in result["images"]:
        row["path"] = shareable_path(row["path"], output.parent)
    return {"command": "score", "labels": settings.labels(), "params": settings.params(),
            "versions": package_versions(), "device": str(device), **result}


def means_table(result: dict[str, Any]) -> dict[str, Any]:
    """Concept means, then the dataset mean, as rows for the stderr table."""
    def cells(entry: dict) -> list[str]:
        return ["" if entry.get(name) is None else f"{entry[name]:.4f}" for name in result["metrics"]]

    rows = [[concept, str(entry["images"]), *cells(entry)] for concept, entry in result["concepts"].items()]
    rows.append(["dataset", str(result["dataset"]["images"]), *cells(result["dataset"])])
    return {"columns": ["concept", "images", *result["metrics"]], "rows": rows}


def record_folder(output: Path, gathered: Gathered | None) -> tuple[Path | None, str | None]:
    """The folder whose ``cloak.json`` records this run (the output file's), or ``None`` and why not: that folder's
    manifest belongs to another command, or the folder is (inside) an input or reference folder."""
    from ..manifest import read_manifest

    folder = output.parent
    data = read_manifest(folder) or {}
    if data.get("command") not in (None, "score"):
        return None, f"{folder / 'cloak.json'} belongs to cloak {data.get('command')}"
    place = folder.resolve()
    roots = {item.root for item in [*gathered.items, *gathered.refs] if item.root is not None} if gathered else set()
    for root in roots:
        if place == root or root in place.parents:
            return None, f"{folder} is inside the input folder {root}"
    return folder, None


def write_recorded(files: dict[Path, bytes], output: Path, gathered: Gathered | None, settings: ScoreSettings,
                   seconds: float | None, images: int | None, on_event: Event) -> list[str]:
    """Write ``files`` atomically and record each in the ``cloak.json`` of ``output``'s folder (claimed before the
    write, done after, with the command line, timing and run spec); return their names relative to that folder."""
    from ..io import atomic_write_bytes
    from ..manifest import Manifest

    folder, why = record_folder(output, gathered)
    names = [_relative(path, output.parent) for path in files]
    if folder is None:
        on_event("note", "", {"message": f"this run is not recorded for cloak rerun ({why}); write the score file "
                                         "to a folder of its own to record it"})
        for path, data in files.items():
            atomic_write_bytes(path, data)
        return names
    manifest = Manifest(folder, "score", settings.params() if not settings.table else _table_params(settings),
                        extra={"output": output.name}, clean_tree=False)  # the folder may hold anything
    manifest.start_run()
    spec = manifest.data.get("run_spec")
    for name in names:
        manifest.record(name, output=None, status="writing", owned=True)
    for path, data in files.items():
        atomic_write_bytes(path, data)
    run = {"argv": manifest.argv, **({"seconds": round(seconds, 4)} if seconds is not None else {}),
           **({"images": images} if images is not None else {}), **({"run_spec": spec} if spec else {}),
           **({"sources": _source_hashes(gathered, folder)} if gathered is not None else {})}
    for index, name in enumerate(names):  # the run's details once, on the main file; the others point to it
        manifest.record(name, output=name, status="done", owned=True, error=None,
                        **(run if index == 0 else {"written_with": names[0]}))
    manifest.close()
    return names


def _source_hashes(gathered: Gathered, folder: Path) -> dict[str, str]:
    """sha256 of every scored and reference image, by its path relative to the record's folder where they share a
    parent (``cloak rerun`` reports the ones that changed since)."""
    from ..io import file_sha256
    from ..provenance import shareable_path

    hashes = {}
    for item in [*gathered.items, *gathered.refs]:
        path = getattr(item, "path", item)
        try:
            hashes[shareable_path(path, folder)] = file_sha256(Path(path))
        except OSError:
            continue
    return hashes


def _table_params(settings: ScoreSettings) -> dict[str, Any]:
    return {"table": True, "rows": settings.rows, "cols": settings.cols, "metric": settings.metric,
            "average_row": settings.average_row, "average_exclude": list(settings.average_exclude)}


def _relative(path: Path, folder: Path) -> str:
    import os

    return Path(os.path.relpath(os.path.abspath(path), os.path.abspath(folder))).as_posix()


# ---------------------------------------------------------------------------------------------- cloak rerun
def rerun_settings(settings: ScoreSettings, output: Path) -> ScoreSettings:
    """A rerun writes next to its new ``-o``: the CSV moves there too (same name), never over the recorded one."""
    if settings.csv is None or settings.table:
        return settings
    return settings.replace(csv=Path(output).parent / settings.csv.name)
