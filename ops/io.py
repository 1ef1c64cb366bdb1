"""Image folders in, image folders out: input discovery, faithful decoding and encoding, atomic writes, shards.

Decoding applies the EXIF orientation, keeps the alpha channel and a matching ICC profile aside, and hands the
methods a float RGB tensor ``(3, H, W)`` in [0, 1]. Encoding writes a lossless PNG in the input's own kind of mode
(grayscale stays grayscale, 16-bit stays 16-bit, alpha and ICC profile are written back).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, TextIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import RejectedInput, UsageError

if TYPE_CHECKING:  # torch is imported lazily at run time
    import torch

# Files whose extension says they are not images are skipped silently inside folders; anything else is tried.
NON_IMAGE_EXTENSIONS = {
    ".txt", ".json", ".jsonl", ".md", ".rst", ".csv", ".tsv", ".yaml", ".yml", ".toml", ".ini", ".cfg", ".xml",
    ".html", ".htm", ".pdf", ".py", ".sh", ".log", ".xmp", ".db", ".zip", ".tar", ".gz", ".tgz", ".bz2", ".xz",
    ".7z", ".mp4", ".mov", ".avi", ".mkv", ".webm", ".mp3", ".wav", ".flac", ".npy", ".npz", ".pt", ".pth",
    ".ckpt", ".safetensors", ".bin", ".lock", ".tmp", ".part",
}
DEFAULT_MAX_PIXELS = 2**27  # ≈134 MP: larger files are treated as decompression bombs unless --max-pixels says so
MANIFEST_NAME = "cloak.json"


@dataclass(frozen=True)
class InputItem:
    """One input file and the relative name its outputs take (``sub/photo.jpg`` → ``OUT/sub/photo.png``)."""

    path: Path
    rel: PurePosixPath
    root: Path | None = None  # the input folder it was found in (None: named as a file)
    clash_with: str | None = None  # set on a file whose output name an earlier input (in sorted order) takes

    @property
    def output_rel(self) -> PurePosixPath:
        return self.rel.with_suffix(".png")


@dataclass
class LoadedImage:
    """A decoded image, oriented, with what is needed to write it back faithfully.

    ``rgb`` is a float32 tensor ``(3, H, W)`` in [0, 1] (grayscale is replicated to three channels);
    ``alpha`` is a float32 array ``(H, W)`` in [0, 1] or ``None``.
    """

    rgb: torch.Tensor
    alpha: np.ndarray | None
    icc_profile: bytes | None
    gray: bool
    bits: int
    source_mode: str
    warnings: list[str] = field(default_factory=list)

    @property
    def size(self) -> tuple[int, int]:
        """``(width, height)`` after orientation."""
        return int(self.rgb.shape[2]), int(self.rgb.shape[1])

    @property
    def max_value(self) -> int:
        return 65535 if self.bits == 16 else 255


# ----------------------------------------------------------------------------------------------- discovery
def _is_hidden(rel: PurePosixPath) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def _scan_folder(folder: Path, recursive: bool) -> tuple[list[InputItem], int]:
    root = folder.resolve()
    items, skipped_dirs = [], 0
    walker = sorted(folder.rglob("*")) if recursive else sorted(folder.iterdir())
    for path in walker:
        rel = PurePosixPath(path.relative_to(folder).as_posix())
        if _is_hidden(rel):
            continue
        if path.is_dir():
            skipped_dirs += 0 if recursive else 1
            continue
        if not path.is_file() or path.suffix.lower() in NON_IMAGE_EXTENSIONS:
            continue
        items.append(InputItem(path, rel, root))
    return items, skipped_dirs


def collect_inputs(
    inputs: Sequence[str], recursive: bool = False, stdin: TextIO | None = None
) -> tuple[list[InputItem], list[str]]:
    """Expand files, folders and ``-`` (one path per line on stdin) into sorted input items.

    Returns the items and warnings for the user. Missing paths are usage errors; files named explicitly are kept
    whatever their extension (a non-image is then rejected when decoded).
    """
    items: list[InputItem] = []
    notes: list[str] = []
    for raw in inputs:
        if raw == "-":
            listed, listed_notes = _listed_inputs(stdin if stdin is not None else sys.stdin, recursive)
            items += listed
            notes += listed_notes
            continue
        path = Path(raw)
        if path.is_dir():
            found, skipped_dirs = _scan_folder(path, recursive)
            items += found
            if skipped_dirs:
                notes.append(f"{path}: {skipped_dirs} subfolder(s) skipped (use --recursive)")
        elif path.is_file():
            items.append(InputItem(path, PurePosixPath(path.name)))
        else:
            raise UsageError(f"input not found: {raw}")
    if not items:
        raise UsageError("no input images found (give files, folders, or - for paths on stdin)")
    items.sort(key=lambda item: (item.rel.as_posix(), str(item.path)))
    return mark_clashes(items), notes


def _listed_inputs(stream: TextIO, recursive: bool) -> tuple[list[InputItem], list[str]]:
    """The inputs of a ``-``: one path per line of ``stream`` (blank lines ignored), expanded like arguments."""
    listed = [line.strip() for line in stream if line.strip()]
    # A listed path that does not exist is that file's rejection (the runner cannot read it), not an abort.
    present = [entry for entry in listed if Path(entry).exists()]
    items = [InputItem(Path(entry), PurePosixPath(Path(entry).name)) for entry in listed if not Path(entry).exists()]
    if not present:
        return items, []
    found, notes = collect_inputs(present, recursive)
    return items + found, notes


def mark_clashes(items: Sequence[InputItem]) -> list[InputItem]:
    """Drop repeats of one file (the same file reached twice is not a clash) and mark name clashes.

    Run on the whole sorted input set before sharding, so every shard agrees on the winner: the first input (in
    sorted order) with an output name keeps it; later ones carry ``clash_with`` and are rejected by the runner.
    """
    seen: set[Path] = set()
    owners: dict[str, str] = {}
    marked: list[InputItem] = []
    for item in items:
        real = item.path.resolve()
        if real in seen:
            continue
        seen.add(real)
        name = item.output_rel.as_posix()
        if name in owners:
            item = replace(item, clash_with=owners[name])
        else:
            owners[name] = str(item.path)
        marked.append(item)
    return marked


# Array-job variables of the schedulers ``--shard auto`` understands, in the order they are tried.
SHARD_ENV_HELP = ("Slurm (SLURM_ARRAY_TASK_ID with SLURM_ARRAY_TASK_MIN/_STEP/_COUNT) or Grid Engine "
                  "(SGE_TASK_ID with SGE_TASK_FIRST/_LAST/_STEPSIZE)")


def _env_int(environ: Mapping[str, str], name: str) -> int | None:
    raw = environ.get(name, "").strip()
    if not raw or raw.lower() == "undefined":  # Grid Engine sets SGE_TASK_ID=undefined outside array jobs
        return None
    try:
        return int(raw)
    except ValueError:
        raise UsageError(f"--shard auto: {name}={raw!r} is not an integer") from None


def _array_position(scheduler: str, task: int, first: int, step: int, count: int,
                    last: int | None = None) -> tuple[int, int]:
    offset = task - first
    irregular = last is not None and first + (count - 1) * step != last  # e.g. sbatch --array=1,3,7
    if irregular or step < 1 or count < 1 or offset < 0 or offset % step or offset // step >= count:
        raise UsageError(f"--shard auto: {scheduler} task {task} is not on the evenly spaced array "
                         f"{first}, {first}+{step}, … ({count} tasks); for a hand-picked list of task ids pass "
                         f"--shard I/N yourself")
    return offset // step + 1, count


def shard_from_environment(environ: Mapping[str, str] | None = None) -> tuple[int, int]:
    """The ``(I, N)`` of this array task from the scheduler's variables (``--shard auto``).

    Slurm: ``sbatch --array=0-31`` (or ``1-32``, ``0-62:2``) runs tasks whose ``SLURM_ARRAY_TASK_ID`` counts from
    ``SLURM_ARRAY_TASK_MIN`` (0 when unset) in steps of ``SLURM_ARRAY_TASK_STEP`` (1 when unset) up to
    ``SLURM_ARRAY_TASK_MAX``; ``SLURM_ARRAY_TASK_COUNT`` tasks in all. Grid Engine (SGE, UGE, Son of GE):
    ``qsub -t 1-32[:step]`` sets ``SGE_TASK_ID`` and
    ``SGE_TASK_FIRST``/``SGE_TASK_LAST``/``SGE_TASK_STEPSIZE``. The task's position on its array (1-based) is I and
    the number of tasks is N, so the tasks of one array cover every input exactly once, whatever the first id.
    PBS (``PBS_ARRAY_INDEX``) and LSF (``LSB_JOBINDEX``) give no task count, so they are not read: pass --shard
    I/N there. Resubmitting one task alone (``--array=5``) makes it an array of one, i.e. shard 1/1 (the whole
    folder; finished files are skipped): resubmit the original range instead, or pass --shard 6/32.
    """
    env = os.environ if environ is None else environ
    position = _slurm_position(env) or _grid_engine_position(env)
    if position is not None:
        return position
    raise UsageError(f"--shard auto: no array-job variables found; it reads {SHARD_ENV_HELP}. Submit the command "
                     "as an array job (e.g. sbatch --array=0-31) or pass --shard I/N")


def _slurm_position(env: Mapping[str, str]) -> tuple[int, int] | None:
    """``(I, N)`` of a Slurm array task; ``None`` outside one."""
    task = _env_int(env, "SLURM_ARRAY_TASK_ID")
    if task is None:
        return None
    count = _env_int(env, "SLURM_ARRAY_TASK_COUNT")
    if count is None:
        raise UsageError("--shard auto: SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT is not "
                         "(Slurm older than 17.02?); pass --shard I/N")
    first = _env_int(env, "SLURM_ARRAY_TASK_MIN")
    step = _env_int(env, "SLURM_ARRAY_TASK_STEP")
    return _array_position("Slurm", task, 0 if first is None else first, step or 1, count,
                           _env_int(env, "SLURM_ARRAY_TASK_MAX"))


def _grid_engine_position(env: Mapping[str, str]) -> tuple[int, int] | None:
    """``(I, N)`` of a Grid Engine array task (SGE, UGE, Son of GE); ``None`` outside one."""
    task = _env_int(env, "SGE_TASK_ID")
    if task is None:
        return None
    first = _env_int(env, "SGE_TASK_FIRST")
    last = _env_int(env, "SGE_TASK_LAST")
    step = _env_int(env, "SGE_TASK_STEPSIZE") or 1
    if first is None or last is None:
        raise UsageError("--shard auto: SGE_TASK_ID is set but SGE_TASK_FIRST/SGE_TASK_LAST are not; pass "
                         "--shard I/N")
    return _array_position("Grid Engine", task, first, step, (last - first) // step + 1)


def parse_shard(spec: str | None, environ: Mapping[str, str] | None = None) -> tuple[int, int] | None:
    """``"I/N"`` (1-based) → ``(I, N)``; ``"auto"`` → from the scheduler's array variables (see
    :func:`shard_from_environment`); ``None`` passes through."""
    if not spec:
        return None
    if spec.strip().lower() == "auto":
        return shard_from_environment(environ)
    try:
        index, count = (int(part) for part in spec.split("/"))
    except ValueError:
        raise UsageError(f"--shard {spec!r}: expected I/N (e.g. 1/4) or auto") from None
    if count < 1 or not 1 <= index <= count:
        raise UsageError(f"--shard {spec!r}: need 1 <= I <= N")
    return index, count


def shard_label(shard: tuple[int, int] | None) -> str | None:
    """``(I, N)`` → ``"I/N"`` for manifests (so ``--shard auto`` records the shard it resolved to)."""
    return None if shard is None else f"{shard[0]}/{shard[1]}"


def select_shard(items: Sequence[InputItem], shard: tuple[int, int] | None) -> list[InputItem]:
    """Deterministic round-robin split of the sorted inputs: shard I of N takes items I-1, I-1+N, …"""
    if shard is None:
        return list(items)
    index, count = shard
    return [item for position, item in enumerate(items) if position % count == index - 1]


def check_output_location(inputs: Sequence[str], output: Path) -> None:
    """Refuse an OUTPUT equal to or inside an input folder (outputs would be read back as inputs)."""
    out = output.resolve()
    for raw in inputs:
        if raw == "-":
            continue
        source = Path(raw).resolve()
        if source.is_dir() and (out == source or source in out.parents):
            raise UsageError(f"output folder {output} is inside input folder {raw}: choose a folder outside it")
        if source.is_file() and out == source:
            raise UsageError(f"output {output} is an input file")


def check_outputs(output: Path, items: Sequence[InputItem]) -> None:
    """Refuse a run whose writes could land on its inputs, however they arrived (files, folders, ``-``, ``..``,
    symlinks): OUTPUT equal to or inside an input folder, or an output path that resolves to an input file."""
    out = Path(output).resolve()
    roots = {item.root for item in items if item.root is not None}
    for root in sorted(roots):
        if out == root or root in out.parents:
            raise UsageError(f"output folder {printable(output)} is inside input folder {printable(root)}: "
                             "choose a folder outside it")
    sources = {item.path.resolve(): item for item in items}
    for item in items:
        target = (out / item.output_rel).resolve()
        if target in sources:
            raise UsageError(f"output {printable(target)} would replace the input {printable(sources[target].path)}: "
                             "choose another output folder (inputs are never modified)")


def check_output_file(output: Path, protected: Iterable[Path], flag: str = "--output",
                      owned: Callable[[Path], bool] | None = None) -> None:
    """Refuse a single output file that is (resolves to) an input or reference file, or that exists and is not
    cloak's own output (``owned(path)`` decides; without it any existing file is refused)."""
    if not str(output).strip():
        raise UsageError(f"{flag}: give a file name")
    target = Path(output).resolve()
    for path in protected:
        if Path(path).resolve() == target:
            raise UsageError(f"{flag} {printable(output)} is an input or reference file: choose another name")
    if os.path.lexists(output):
        if Path(output).is_symlink() or not Path(output).is_file():
            raise UsageError(f"{flag} {printable(output)} exists and is not a regular file: choose another name")
        if owned is None or not owned(Path(output)):
            raise UsageError(f"{flag} {printable(output)} exists and was not written by cloak: move it away or "
                             "choose another name")


def output_path(root: Path, rel: str | PurePosixPath) -> Path:
    """``root / rel`` for writing, refusing a symlink anywhere below ``root`` (writes never follow links inside
    OUTPUT) and anything but a regular file at the target."""
    root = Path(root)
    current = root
    parts = PurePosixPath(str(rel)).parts
    for index, part in enumerate(parts):
        current = current / part
        if current.is_symlink():
            raise RejectedInput(f"{printable(current)} is a symlink inside the output folder; cloak does not write "
                                "through symlinks (remove it)")
        if index < len(parts) - 1 and current.exists() and not current.is_dir():
            raise RejectedInput(f"{printable(current)} is in the way (not a folder)")
    if current.exists() and not current.is_file():
        raise RejectedInput(f"{printable(current)} exists and is not a regular file")
    return current


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def printable(text: object) -> str:
    """``text`` with control characters (newline, ESC, …) escaped, so a file name cannot forge lines on stderr."""
    return _CONTROL.sub(lambda match: match.group().encode("unicode_escape").decode("ascii"), str(text))


def safe_join(root: Path, rel: str | PurePosixPath) -> Path:
    """Join a data-supplied relative name under ``root``, refusing absolute names and ``..`` escapes."""
    rel = PurePosixPath(str(rel))
    if rel.is_absolute() or any(part == ".." for part in rel.parts):
        raise UsageError(f"refusing path {str(rel)!r}: names from data must stay inside {root}")
    target = (root / rel).resolve()
    if root.resolve() not in target.parents and target != root.resolve():
        raise UsageError(f"refusing path {str(rel)!r}: it resolves outside {root}")
    return root / rel


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def item_seed(seed: int, rel: PurePosixPath | str) -> int:
    """A per-file seed from the run seed and the file's relative name, so shards and resumed runs draw alike."""
    digest = hashlib.sha256(f"{seed}:{rel}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**63 - 1)


# ------------------------------------------------------------------------------------------------ decoding
def _icc_colour_space(profile: bytes | None) -> bytes | None:
    return profile[16:20] if profile and len(profile) >= 20 else None


def _png_header(path: Path) -> tuple[int, int] | None:
    """``(bit depth, colour type)`` from a PNG's IHDR, or ``None`` for other files."""
    with open(path, "rb") as handle:
        head = handle.read(26)
    if len(head) < 26 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return None
    return head[24], head[25]


def _read_deep(path: Path, fmt: str | None) -> np.ndarray | None:
    """The samples of a file Pillow would narrow to 8 bits (16-bit RGB/RGBA PNG; 16-bit, float or RGB float TIFF),
    as an ``(H, W[, C])`` array in RGB(A) order and the file's own dtype; ``None`` when Pillow reads it faithfully."""
    if fmt in (None, "PNG"):
        header = _png_header(path)
        if header is not None and header[0] == 16 and header[1] in (2, 6):
            import cv2

            array = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            if array is None:
                raise RejectedInput("unreadable 16-bit PNG")
            return array[..., [2, 1, 0, 3][: array.shape[2]]]
    if fmt in (None, "TIFF") and path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        try:
            array = tifffile.imread(path, key=0)
        except Exception as exc:  # noqa: BLE001 - any decoder fault is this file's rejection
            raise RejectedInput(f"unreadable TIFF ({exc})") from None
        if array.ndim == 3 and array.shape[0] in (3, 4) and array.shape[2] not in (3, 4):
            array = np.moveaxis(array, 0, -1)  # planar-configured samples
        return array
    return None


_EXIF_TRANSPOSE = {  # EXIF orientation → the numpy equivalent of ImageOps.exif_transpose
    2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
    5: lambda a: a.swapaxes(0, 1), 6: lambda a: np.rot90(a, -1), 7: lambda a: np.rot90(a, 1)[::-1],
    8: lambda a: np.rot90(a, 1),
}


def _unit_scale(raw: np.ndarray) -> tuple[float, int]:
    """How integer or float samples map to [0, 1] — divide by the returned scale — and the bit depth written back
    (8 or 16), or a rejection.

    uint8 → /255; uint16 → /65535; other integers (e.g. int32 TIFF) → 8-bit when every sample is in 0..255, 16-bit
    when in 0..65535, else rejected; floats must be finite and already in [0, 1] (they are written as 16-bit)."""
    if raw.dtype == np.uint8:
        return 255.0, 8
    if raw.dtype == np.uint16:
        return 65535.0, 16
    if raw.dtype == np.bool_:
        return 1.0, 8
    low, high = (raw.min(initial=0), raw.max(initial=0)) if raw.size else (0, 0)
    if np.issubdtype(raw.dtype, np.integer):
        if low >= 0 and high <= 255:
            return 255.0, 8
        if low >= 0 and high <= 65535:
            return 65535.0, 16
        raise RejectedInput(f"{raw.dtype} samples span {low}..{high}, beyond 16 bits; convert it to 8- or 16-bit "
                            "first (cloak does not guess a scale)")
    if np.issubdtype(raw.dtype, np.floating):
        if not np.isfinite(raw).all():
            raise RejectedInput("float image with NaN or infinite samples")
        if low < 0 or high > 1:
            raise RejectedInput(f"float image with samples in [{float(low):.4g}, {float(high):.4g}]; only float "
                                "images in [0, 1] are read (convert it first)")
        return 1.0, 16
    raise RejectedInput(f"unsupported sample type {raw.dtype}")


# Pillow modes whose samples may be deeper than Pillow keeps (16-bit or float): read again by :func:`_read_deep`.
_DEEP_CANDIDATE_MODES = ("RGB", "RGBA", "F", "I", "I;16", "I;16B", "I;16L", "I;16N")
_PILLOW_DEEP_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")  # gray samples Pillow keeps at full depth


def read_image(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> LoadedImage:
    """Decode ``path`` faithfully, or raise :class:`RejectedInput` with a one-line reason.

    8-bit files come back at 8 bits; 16-bit files (grayscale, RGB and RGBA PNG/TIFF) and float TIFFs with samples in
    [0, 1] come back as 16-bit images (written back as 16-bit PNGs); other depths are rejected, never clipped.

    Steps: open with the pixel limit (:func:`_open_limited`); re-read samples Pillow would narrow
    (:func:`_read_deep`); orient and normalize them to gray/RGB(A) samples (:func:`_oriented_deep`,
    :func:`_pillow_deep`, :func:`_pillow_conversions`); scale them to float planes in [0, 1] (:func:`_unit_planes`);
    keep the ICC profile only when it matches the written colour space.
    """
    if path.stat().st_size == 0:
        raise RejectedInput("empty file (0 bytes)")
    image, notes = _open_limited(path, max_pixels)
    deep = None
    if image is None or image.mode in _DEEP_CANDIDATE_MODES:
        deep = _read_deep(path, image.format if image is not None else None)
    if image is None and deep is None:
        raise RejectedInput("not an image (or a format Pillow cannot read)")
    return _decode(image, deep, notes, max_pixels)


def image_from_pil(image: Image.Image) -> LoadedImage:
    """Decode an image already in memory as :func:`read_image` decodes a file (EXIF orientation, modes, alpha, ICC
    profile; the first frame of an animation). Pillow holds colour at 8 bits, so there is no 16-bit colour here."""
    image.load()
    notes = ["animated image: only the first frame is processed"] if getattr(image, "n_frames", 1) > 1 else []
    return _decode(image, None, notes, DEFAULT_MAX_PIXELS)


def _decode(image: Image.Image | None, deep: np.ndarray | None, notes: list[str], max_pixels: int) -> LoadedImage:
    """The :class:`LoadedImage` of an opened Pillow image, or of ``deep`` samples (with ``image`` for its EXIF)."""
    icc = image.info.get("icc_profile") if image is not None else None
    transparency = image is not None and "transparency" in image.info
    mode = image.mode if image is not None else f"TIFF {deep.dtype}"
    if deep is not None:
        raw = _oriented_deep(deep, image.getexif().get(0x0112) if image is not None else None, max_pixels)
        is_gray = raw.ndim == 2
    elif image.mode in _PILLOW_DEEP_MODES:
        raw, is_gray = _pillow_deep(image), True
    else:
        image = ImageOps.exif_transpose(image)
        for target in _pillow_conversions(image.mode, transparency):
            image = image.convert(target)  # rebinding frees each intermediate image
        raw, is_gray = np.asarray(image), image.mode in ("L", "LA")
    rgb, alpha, bits = _unit_planes(raw)
    del raw, deep
    if mode == "CMYK" or _icc_colour_space(icc) != (b"GRAY" if is_gray else b"RGB "):
        icc = None  # a profile for another colour space would mislabel the written pixels
    if rgb.shape[0] == 1:
        rgb = rgb.expand(3, -1, -1).clone()
    return LoadedImage(rgb, alpha, icc, is_gray, bits, mode, notes)


def _open_limited(path: Path, max_pixels: int) -> tuple[Image.Image | None, list[str]]:
    """Open and load ``path`` with Pillow under the decompression-bomb limit ``max_pixels`` (restored after);
    ``None`` when Pillow cannot identify it (a float RGB TIFF may still be read by :func:`_read_deep`)."""
    previous_limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    notes: list[str] = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
            if getattr(image, "n_frames", 1) > 1:
                notes.append("animated image: only the first frame is processed")
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise RejectedInput(
            f"decompression-bomb-sized image (more than {max_pixels} pixels); pass --max-pixels to allow it"
        ) from None
    except UnidentifiedImageError:
        return None, notes
    except (OSError, SyntaxError, ValueError) as exc:
        raise RejectedInput(f"unreadable or truncated image ({exc})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = previous_limit
    return image, notes


def _oriented_deep(deep: np.ndarray, orientation: int | None, max_pixels: int) -> np.ndarray:
    """Samples from :func:`_read_deep` as gray ``(H, W)`` or RGB(A) ``(H, W, 3|4)``, checked against the pixel limit
    and turned by the EXIF ``orientation``."""
    if deep.ndim == 3 and deep.shape[2] == 1:
        deep = deep[..., 0]
    if deep.ndim not in (2, 3) or (deep.ndim == 3 and deep.shape[2] not in (3, 4)):
        raise RejectedInput(f"unsupported sample layout {deep.shape} (expected gray, RGB or RGBA)")
    if deep.shape[0] * deep.shape[1] > max_pixels:
        raise RejectedInput(f"decompression-bomb-sized image (more than {max_pixels} pixels); pass "
                            "--max-pixels to allow it")
    return _EXIF_TRANSPOSE.get(orientation, lambda a: a)(deep)


def _pillow_deep(image: Image.Image) -> np.ndarray:
    """The oriented gray samples of a 32-bit integer, 16-bit or float Pillow image, in native byte order."""
    raw = np.asarray(ImageOps.exif_transpose(image))
    return raw.astype(raw.dtype.newbyteorder("="))


def _pillow_conversions(mode: str, transparency: bool) -> list[str]:
    """The Pillow modes an 8-bit image of ``mode`` is converted through, in order, to become L, LA, RGB or RGBA
    (a palette or gray image with a transparent colour gains an alpha channel).

    >>> _pillow_conversions("P", True), _pillow_conversions("1", True), _pillow_conversions("RGB", False)
    (['RGBA'], ['L', 'LA'], [])
    """
    steps = []
    if mode == "1":
        steps.append("L")
    elif mode == "P":
        steps.append("RGBA" if transparency else "RGB")
    elif mode in ("PA", "RGBa"):
        steps.append("RGBA")
    elif mode == "La":
        steps.append("LA")
    elif mode not in ("L", "LA", "RGB", "RGBA"):
        steps.append("RGBA" if transparency else "RGB")
    if (steps[-1] if steps else mode) == "L" and transparency:
        steps.append("LA")
    return steps


def _unit_planes(raw: np.ndarray) -> tuple[torch.Tensor, np.ndarray | None, int]:
    """Gray/RGB(A) samples → float32 colour planes ``(1|3, H, W)`` and alpha ``(H, W)`` in [0, 1], and the bit depth
    written back (:func:`_unit_scale`). One plane at a time: no full-size float64 or duplicate float copy."""
    import torch

    scale, bits = _unit_scale(raw)
    planes = raw[..., None] if raw.ndim == 2 else raw
    colour = 1 if planes.shape[2] in (1, 2) else 3
    rgb = torch.empty((colour, planes.shape[0], planes.shape[1]), dtype=torch.float32)
    for channel in range(colour):
        np.divide(planes[..., channel], np.float32(scale), out=rgb[channel].numpy(), dtype=np.float32,
                  casting="unsafe")
    alpha = None
    if planes.shape[2] in (2, 4):
        alpha = np.divide(planes[..., -1], np.float32(scale), dtype=np.float32, casting="unsafe")
    return rgb, alpha, bits


# ------------------------------------------------------------------------------------------------ encoding
def quantize(rgb: torch.Tensor, like: LoadedImage) -> np.ndarray:
    """Float ``(3, H, W)`` in [0, 1] → the integer array ``(H, W, C)`` that :func:`write_image` stores.

    Grayscale images are written back as the mean of the three channels (a perturbation within ε on every channel
    stays within ε on the mean).
    """
    values = rgb.detach().float().cpu()
    scale = like.max_value
    dtype = np.uint16 if like.bits == 16 else np.uint8
    height, width = values.shape[-2:]
    channels = (1 if like.gray else 3) + (1 if like.alpha is not None else 0)
    if like.alpha is not None and like.alpha.shape[:2] != (height, width):
        raise ValueError(f"alpha {like.alpha.shape[:2]} does not match image {(height, width)}")
    out = np.empty((height, width, channels), dtype=dtype)
    # Plane by plane (float32, in place): a large photo never gets a full-size float64 copy.
    planes = [values.numpy().mean(axis=0)] if like.gray else [values[c].numpy() for c in range(3)]
    if like.alpha is not None:
        planes.append(like.alpha)
    for index, plane in enumerate(planes):
        scaled = np.clip(plane, 0, 1, dtype=np.float32) * np.float32(scale)
        out[..., index] = np.rint(scaled, out=scaled)
    return out


def encode_png(array: np.ndarray, like: LoadedImage) -> bytes:
    """Encode a quantized array as PNG bytes in the input's kind of mode, with its ICC profile."""
    if like.bits == 16 and array.shape[2] > 1:
        return _encode_png16_colour(np.ascontiguousarray(array).astype(np.uint16), like.icc_profile)
    if like.bits == 16:
        image = Image.fromarray(np.ascontiguousarray(array[..., 0]).astype(np.uint16))  # → mode I;16
    else:
        data = array[..., 0] if array.shape[2] == 1 else array
        image = Image.fromarray(np.ascontiguousarray(data).astype(np.uint8))  # L, LA, RGB or RGBA by shape
    buffer = io.BytesIO()
    params = {"icc_profile": like.icc_profile} if like.icc_profile else {}
    image.save(buffer, format="PNG", **params)
    return buffer.getvalue()


def _encode_png16_colour(array: np.ndarray, icc_profile: bytes | None) -> bytes:
    """16-bit gray+alpha, RGB or RGBA PNG (Pillow writes these only at 8 bits): OpenCV's encoder, plus an iCCP
    chunk after IHDR for the profile."""
    import struct
    import zlib

    import cv2

    if array.shape[2] == 2:  # gray + alpha: OpenCV has no LA, so store it as RGBA with equal channels
        array = np.concatenate([np.repeat(array[..., :1], 3, axis=2), array[..., 1:]], axis=2)
    order = [2, 1, 0, 3][: array.shape[2]]
    ok, encoded = cv2.imencode(".png", np.ascontiguousarray(array[..., order]))
    if not ok:
        raise ValueError("OpenCV could not encode the 16-bit PNG")
    data = encoded.tobytes()
    if icc_profile:
        body = b"icc\x00\x00" + zlib.compress(icc_profile)
        chunk = struct.pack(">I", len(body)) + b"iCCP" + body + struct.pack(">I", zlib.crc32(b"iCCP" + body))
        data = data[:33] + chunk + data[33:]  # signature (8) + IHDR (25)
    return data


_UMASK: int | None = None


def current_umask() -> int:
    """The process umask (read once; ``os.umask`` can only be read by setting it)."""
    global _UMASK
    if _UMASK is None:
        _UMASK = os.umask(0o022)
        os.umask(_UMASK)
    return _UMASK


def atomic_write_bytes(path: Path, data: bytes, *, fsync: bool = False) -> None:
    """Write via a temporary file in the same folder and rename, so readers never see a partial file.

    The file gets the mode a plain ``open`` would give (0666 less the umask; ``mkstemp`` alone gives 0600). The
    rename replaces a symlink at ``path`` itself, never the file it points to.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.{_temp_owner()}-", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        os.fchmod(handle, 0o666 & ~current_umask())
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            if fsync:
                stream.flush()
                os.fsync(stream.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


TEMP_SUFFIX = ".part"
# what cloak's own temporaries look like: ``.NAME.HOST-PID-RANDOM.part`` (atomic_write_bytes; older versions
# ``.NAME.RANDOM.part``), ``NAME.safetensors.tmp`` and ``step-NNNNNN.tmp`` (training); anything else is the user's
_TEMP_NAMES = re.compile(r"^\..+\.[A-Za-z0-9_-]{4,}\.part$|^.+\.safetensors\.tmp$|^step-\d{6}\.tmp$")
_TEMP_OWNER = re.compile(r"\.([0-9a-f]{8})-(\d+)-[A-Za-z0-9_]+\.part$")
STALE_SECONDS = 3600


def _host_tag() -> str:
    import socket

    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _temp_owner() -> str:
    return f"{_host_tag()}-{os.getpid()}"


def _owner_gone(name: str) -> bool:
    """Whether a temporary's name says it belongs to a process of this host that no longer runs."""
    match = _TEMP_OWNER.search(name)
    if not match or match.group(1) != _host_tag():
        return False
    pid = int(match.group(2))
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def clean_stale_temporaries(folder: Path, max_age: float = STALE_SECONDS, *, recursive: bool = True) -> list[Path]:
    """Delete cloak's temporaries under ``folder`` left by killed runs: those of a process of this host that is gone,
    and any older than ``max_age`` seconds (a younger one of another host may belong to a run still going).
    Symlinked folders are not entered; ``recursive=False`` looks at ``folder`` itself only (a folder cloak shares with
    the user's files, such as a score file's). Returns what was removed."""
    removed: list[Path] = []
    cutoff = time.time() - max_age
    for parent, dirs, files in os.walk(folder, followlinks=False):
        dirs[:] = [d for d in dirs if recursive and not os.path.islink(os.path.join(parent, d))]
        for name in files:
            if not _TEMP_NAMES.match(name):
                continue
            path = Path(parent) / name
            try:
                info = path.lstat()
                if path.is_symlink() or (info.st_mtime > cutoff and not _owner_gone(name)):
                    continue
                path.unlink()
                removed.append(path)
            except OSError:
                continue
    return removed


def save_safetensors(tensors: dict, path: Path | str, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file`` with a byte-stable header (keys sorted; the library's metadata order follows
    a per-process hash seed), written atomically with the user's umask."""
    from safetensors.torch import save

    blob = save({name: tensor.contiguous() for name, tensor in tensors.items()}, metadata=metadata or None)
    length = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + length])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    atomic_write_bytes(Path(path), len(text).to_bytes(8, "little") + text + blob[8 + length :])


def write_image(path: Path, rgb: torch.Tensor, like: LoadedImage) -> np.ndarray:
    """Quantize ``rgb`` like the input, write a PNG atomically, and return the stored integer array."""
    array = quantize(rgb, like)
    atomic_write_bytes(path, encode_png(array, like))
    return array


def read_back(path: Path) -> np.ndarray:
    """The integer array of a written PNG, shaped ``(H, W, C)``, for verifying what was really stored."""
    deep = _read_deep(path, "PNG")
    if deep is not None:
        return deep
    with Image.open(path) as image:
        array = np.asarray(image)
    return array[..., None] if array.ndim == 2 else array


def iter_chunks(sequence: Sequence, size: int) -> Iterable[list]:
    for start in range(0, len(sequence), max(1, size)):
        yield list(sequence[start : start + max(1, size)])
