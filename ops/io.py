"""Image folders in, image folders out: input discovery, faithful decoding and encoding, atomic writes, shards.

Decoding applies the EXIF orientation, keeps the alpha channel and a matching ICC profile aside, and hands the
methods a float RGB tensor ``(3, H, W)`` in [0, 1]. Encoding writes a lossless PNG in the input's own kind of mode
(grayscale stays grayscale, 16-bit stays 16-bit, alpha and ICC profile are written back).
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Iterable, Mapping, Sequence, TextIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import RejectedInput, UsageError

if TYPE_CHECKING:  # torch is imported lazily at run time
    import torch

IMAGE_EXTENSIONS = {
    ".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".webp", ".bmp", ".dib", ".tif", ".tiff", ".gif", ".ppm",
    ".pgm", ".pbm", ".pnm", ".tga", ".ico", ".jp2", ".j2k", ".avif", ".heic", ".heif", ".qoi",
}
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

    @property
    def output_rel(self) -> PurePosixPath:
        return self.rel.with_suffix(".png")


@dataclass
class LoadedImage:
    """A decoded image, oriented, with what is needed to write it back faithfully.

    ``rgb`` is a float32 tensor ``(3, H, W)`` in [0, 1] (grayscale is replicated to three channels);
    ``alpha`` is a float32 array ``(H, W)`` in [0, 1] or ``None``.
    """

    rgb: "torch.Tensor"
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
        items.append(InputItem(path, rel))
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
            stream = stdin if stdin is not None else sys.stdin
            listed = [line.strip() for line in stream if line.strip()]
            sub, sub_notes = collect_inputs(listed, recursive)
            items += sub
            notes += sub_notes
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
    return items, notes


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
    task = _env_int(env, "SLURM_ARRAY_TASK_ID")
    if task is not None:
        count = _env_int(env, "SLURM_ARRAY_TASK_COUNT")
        if count is None:
            raise UsageError("--shard auto: SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT is not "
                             "(Slurm older than 17.02?); pass --shard I/N")
        first = _env_int(env, "SLURM_ARRAY_TASK_MIN")
        step = _env_int(env, "SLURM_ARRAY_TASK_STEP")
        return _array_position("Slurm", task, 0 if first is None else first, step or 1, count,
                               _env_int(env, "SLURM_ARRAY_TASK_MAX"))
    task = _env_int(env, "SGE_TASK_ID")
    if task is not None:
        first = _env_int(env, "SGE_TASK_FIRST")
        last = _env_int(env, "SGE_TASK_LAST")
        step = _env_int(env, "SGE_TASK_STEPSIZE") or 1
        if first is None or last is None:
            raise UsageError("--shard auto: SGE_TASK_ID is set but SGE_TASK_FIRST/SGE_TASK_LAST are not; pass "
                             "--shard I/N")
        return _array_position("Grid Engine", task, first, step, (last - first) // step + 1)
    raise UsageError(f"--shard auto: no array-job variables found; it reads {SHARD_ENV_HELP}. Submit the command "
                     "as an array job (e.g. sbatch --array=0-31) or pass --shard I/N")


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


def read_image(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> LoadedImage:
    """Decode ``path`` faithfully, or raise :class:`RejectedInput` with a one-line reason."""
    import torch

    if path.stat().st_size == 0:
        raise RejectedInput("empty file (0 bytes)")
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
        raise RejectedInput("not an image (or a format Pillow cannot read)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise RejectedInput(f"unreadable or truncated image ({exc})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = previous_limit

    icc = image.info.get("icc_profile")
    transparency = "transparency" in image.info
    image = ImageOps.exif_transpose(image)
    mode = image.mode
    alpha = None
    bits = 8
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        values = np.asarray(image, dtype=np.float64)
        if mode == "I" and values.max(initial=0) <= 255:
            gray, bits = values / 255.0, 8
        else:
            gray, bits = np.clip(values, 0, 65535) / 65535.0, 16
        planes, is_gray = gray[..., None], True
    else:
        if mode == "1":
            image = image.convert("L")
        elif mode == "F":
            image = image.convert("L")
        elif mode == "P":
            image = image.convert("RGBA" if transparency else "RGB")
        elif mode == "PA":
            image = image.convert("RGBA")
        elif mode == "RGBa":
            image = image.convert("RGBA")
        elif mode == "La":
            image = image.convert("LA")
        elif mode not in ("L", "LA", "RGB", "RGBA"):
            image = image.convert("RGBA" if transparency else "RGB")
        if image.mode == "L" and transparency:
            image = image.convert("LA")
        array = np.asarray(image, dtype=np.float64) / 255.0
        if array.ndim == 2:
            array = array[..., None]
        is_gray = image.mode in ("L", "LA")
        if image.mode in ("LA", "RGBA"):
            alpha = array[..., -1].astype(np.float32)
            array = array[..., :-1]
        planes = array
    if mode == "CMYK" or _icc_colour_space(icc) != (b"GRAY" if is_gray else b"RGB "):
        icc = None  # a profile for another colour space would mislabel the written pixels
    rgb = torch.from_numpy(np.ascontiguousarray(planes.transpose(2, 0, 1), dtype=np.float32))
    if rgb.shape[0] == 1:
        rgb = rgb.expand(3, -1, -1).clone()
    return LoadedImage(rgb, alpha, icc, is_gray, bits, mode, notes)


# ------------------------------------------------------------------------------------------------ encoding
def quantize(rgb: "torch.Tensor", like: LoadedImage) -> np.ndarray:
    """Float ``(3, H, W)`` in [0, 1] → the integer array ``(H, W, C)`` that :func:`write_image` stores.

    Grayscale images are written back as the mean of the three channels (a perturbation within ε on every channel
    stays within ε on the mean).
    """
    values = rgb.detach().float().clamp(0, 1).cpu().numpy()
    planes = values.mean(axis=0, keepdims=True) if like.gray else values
    scale = like.max_value
    ints = np.rint(planes.transpose(1, 2, 0) * scale)
    if like.alpha is not None:
        alpha = np.rint(like.alpha[..., None].astype(np.float64) * scale)
        if alpha.shape[:2] != ints.shape[:2]:
            raise ValueError(f"alpha {alpha.shape[:2]} does not match image {ints.shape[:2]}")
        ints = np.concatenate([ints, alpha], axis=2)
    return ints.astype(np.uint16 if like.bits == 16 else np.uint8)


def dequantize(array: np.ndarray, like: LoadedImage) -> "torch.Tensor":
    """Inverse of :func:`quantize` for the colour planes (alpha dropped), as ``(3, H, W)`` float in [0, 1]."""
    import torch

    planes = array[..., :-1] if like.alpha is not None else array
    values = planes.astype(np.float32) / like.max_value
    tensor = torch.from_numpy(np.ascontiguousarray(values.transpose(2, 0, 1)))
    return tensor.expand(3, -1, -1).clone() if tensor.shape[0] == 1 else tensor


def encode_png(array: np.ndarray, like: LoadedImage) -> bytes:
    """Encode a quantized array as PNG bytes in the input's kind of mode, with its ICC profile."""
    if like.bits == 16:
        if array.shape[2] != 1:
            raise ValueError("16-bit output is written for grayscale images only")
        image = Image.fromarray(np.ascontiguousarray(array[..., 0]).astype(np.uint16))  # → mode I;16
    else:
        data = array[..., 0] if array.shape[2] == 1 else array
        image = Image.fromarray(np.ascontiguousarray(data).astype(np.uint8))  # L, LA, RGB or RGBA by shape
    buffer = io.BytesIO()
    params = {"icc_profile": like.icc_profile} if like.icc_profile else {}
    image.save(buffer, format="PNG", **params)
    return buffer.getvalue()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temporary file in the same folder and rename, so readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def write_image(path: Path, rgb: "torch.Tensor", like: LoadedImage) -> np.ndarray:
    """Quantize ``rgb`` like the input, write a PNG atomically, and return the stored integer array."""
    array = quantize(rgb, like)
    atomic_write_bytes(path, encode_png(array, like))
    return array


def read_back(path: Path) -> np.ndarray:
    """The integer array of a written PNG, shaped ``(H, W, C)``, for verifying what was really stored."""
    with Image.open(path) as image:
        array = np.asarray(image)
    return array[..., None] if array.ndim == 2 else array


def iter_chunks(sequence: Sequence, size: int) -> Iterable[list]:
    for start in range(0, len(sequence), max(1, size)):
        yield list(sequence[start : start + max(1, size)])
