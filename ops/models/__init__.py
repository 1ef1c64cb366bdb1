"""Model loading: ``load_pipeline(model, device, dtype)`` for every way a user names Stable Diffusion weights.

Accepted ``model`` values:
  * ``tiny`` — the tiny random pipeline built in code (:mod:`.tiny`), offline;
  * ``toy`` — the project-trained toy-world model shipped in ``ops/toy/weights`` (a diffusers folder), offline;
  * ``sd15-shaped`` — Stable Diffusion 1.5's architecture with random weights (:mod:`.shaped`), offline: for
    timing and memory (benchmarks, GPU smoke runs) without downloading weights; its images are noise;
  * a local diffusers folder (has ``model_index.json``);
  * a single checkpoint file: ``.safetensors`` always, ``.ckpt``/``.pt``/``.bin`` only with ``trust_pickle``
    (pickle can run code);
  * a Hugging Face Hub id (default ``stable-diffusion-v1-5/stable-diffusion-v1-5``), honouring ``HF_HUB_OFFLINE``
    and the local cache.
Missing weights raise :class:`ModelNotFoundError` with one line: what, where, and how to provide it.
"""

from __future__ import annotations

import contextlib
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ModelNotFoundError, UsageError

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin"}
BUILTIN_MODELS = ("tiny", "toy", "sd15-shaped")


def default_model() -> str:
    return os.environ.get("CLOAK_MODEL", DEFAULT_MODEL)


@dataclass
class ModelInfo:
    """What the manifest records about the model: the name given, its kind, and a revision or content hash."""

    name: str
    kind: str
    revision: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "revision": self.revision}


def _missing(model: str, where: str) -> ModelNotFoundError:
    offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True") else ""
    return ModelNotFoundError(
        f"model {model!r} not found {where}{offline}: download it into the Hugging Face cache (HF_HOME) on a "
        "connected machine, pass a local diffusers folder or .safetensors file, or use --model toy (offline, built in)"
    )


def model_info(model: str) -> ModelInfo:
    """Describe ``model`` for the manifest without loading it."""
    if model == "toy":
        from .toy_weights import weights_revision

        return ModelInfo(model, "builtin", weights_revision())
    if model in BUILTIN_MODELS:
        return ModelInfo(model, "builtin", "seed0")
    path = Path(model)
    if path.is_dir():
        return ModelInfo(str(path.resolve()), "folder")
    if path.is_file():
        stat = path.stat()
        return ModelInfo(str(path.resolve()), "file", f"{stat.st_size}-{int(stat.st_mtime)}")
    return ModelInfo(model, "hub")


# Native image sizes of well-known Hub ids, for when their configs are not on this machine yet (a download is due).
KNOWN_RESOLUTIONS = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": 512, "runwayml/stable-diffusion-v1-5": 512,
    "CompVis/stable-diffusion-v1-4": 512, "stabilityai/stable-diffusion-2-base": 512,
    "stabilityai/stable-diffusion-2-1-base": 512, "stabilityai/stable-diffusion-2": 768,
    "stabilityai/stable-diffusion-2-1": 768, "stabilityai/stable-diffusion-xl-base-1.0": 1024,
    "stabilityai/stable-diffusion-xl-refiner-1.0": 1024, "stabilityai/sdxl-turbo": 512,
}
BUILTIN_RESOLUTIONS = {"tiny": 64, "toy": 64, "sd15-shaped": 512}
FALLBACK_RESOLUTION = 512  # SD 1.x, the default family (single-file checkpoints carry no config)


def config_file(model: str, name: str) -> Path | None:
    """``<subfolder>/config.json`` of a local diffusers folder or of a Hub id in the local cache (no network)."""
    path = Path(model)
    if path.is_dir():
        candidate = path / name
        return candidate if candidate.is_file() else None
    if path.is_file() or model.count("/") != 1:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(model, name)
    except Exception:  # noqa: BLE001 - a malformed id or cache: no config, fall back
        return None
    return Path(found) if isinstance(found, str) else None


def native_resolution(model: Any) -> int:
    """The model's own image size in px: ``unet.config.sample_size × vae_scale_factor`` (SD 1.x 512, SD 2.1-v 768,
    SDXL 1024, ``tiny``/``toy`` 64, ``sd15-shaped`` 512).

    ``model`` is a loaded pipeline or a model name as ``load_pipeline`` takes it; for a name it reads the UNet and
    VAE configs without loading weights (local folder or the Hugging Face cache), then :data:`KNOWN_RESOLUTIONS`,
    then 512. The VAE's scale factor is ``2 ** (len(block_out_channels) - 1)`` as diffusers computes it.
    """
    import json

    if hasattr(model, "unet"):
        factor = getattr(model, "vae_scale_factor", None)
        if factor is None:
            factor = 2 ** (len(model.vae.config.block_out_channels) - 1)
        sample = model.unet.config.sample_size
        sample = sample[0] if isinstance(sample, (list, tuple)) else sample
        return int(sample) * int(factor)
    model = str(model or default_model())
    if model in BUILTIN_RESOLUTIONS:
        return BUILTIN_RESOLUTIONS[model]
    if model.endswith("/"):
        model = model.rstrip("/")
    unet_file, vae_file = config_file(model, "unet/config.json"), config_file(model, "vae/config.json")
    if unet_file is not None:
        try:
            sample = json.loads(unet_file.read_text()).get("sample_size")
            blocks = json.loads(vae_file.read_text()).get("block_out_channels") if vae_file else None
            sample = sample[0] if isinstance(sample, (list, tuple)) else sample
            if sample:
                return int(sample) * 2 ** (len(blocks) - 1 if blocks else 3)
        except (OSError, ValueError, TypeError):
            pass
    return KNOWN_RESOLUTIONS.get(model, FALLBACK_RESOLUTION)


def model_note(model: str) -> str | None:
    """A one-line caveat to print once when a run starts (``tiny``/``sd15-shaped``: random weights)."""
    if model in ("tiny", "sd15-shaped"):
        return (f"--model {model} has random weights: its outputs give no protection and mean nothing (use it for "
                "plumbing and timing; --model toy is the offline model that learned something)")
    return None


def check_available(model: str) -> None:
    """Raise the one-line :class:`ModelNotFoundError` now, before an output folder or manifest is created, when
    ``model`` cannot be loaded from this machine: a missing path, a folder without ``model_index.json``, or a Hub id
    that is not in the cache while ``HF_HUB_OFFLINE`` is set. (Online, an uncached id is downloaded at load time.)"""
    if model in BUILTIN_MODELS:
        return
    path = Path(model)
    if path.is_file():
        return
    if path.is_dir():
        if not (path / "model_index.json").exists():
            raise ModelNotFoundError(f"{model} is a folder but not a diffusers pipeline (no model_index.json)")
        return
    if model.count("/") > 1 or model.startswith((".", "/", "~")) or path.suffix.lower() in (
            PICKLE_SUFFIXES | {".safetensors"}):
        raise _missing(model, "on disk")
    if os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True", "ON", "YES", "yes", "on") \
            and config_file(model, "model_index.json") is None:
        raise _missing(model, "in the Hugging Face cache")


_QUIET = {"on": False}
LIBRARY_LOGGERS = ("diffusers", "transformers", "peft", "huggingface_hub", "accelerate")
QUIET_ENV = (("HF_HUB_DISABLE_PROGRESS_BARS", "1"), ("DIFFUSERS_VERBOSITY", "error"),
             ("TRANSFORMERS_VERBOSITY", "error"), ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1"),
             ("HF_HUB_VERBOSITY", "error"))


@contextmanager
def quiet_libraries(enabled: bool = True):
    """Silence the libraries' logging, warnings and progress bars inside the block (the CLI runs every command in
    it unless ``--verbose``/``--debug``): environment switches for libraries imported later, their loggers at ERROR,
    Python warnings (deprecations, offline fallbacks) ignored, and ``load_pipeline`` loading weights inside
    :func:`quiet_loading`. Everything is restored afterwards (the CLI runs in-process in tests)."""
    import logging
    import sys
    import warnings

    if not enabled:
        yield
        return
    saved_env = {key: os.environ.get(key) for key, _ in QUIET_ENV}
    imported = {name for name in LIBRARY_LOGGERS if name in sys.modules}
    levels = {name: logging.getLogger(name).level for name in LIBRARY_LOGGERS}
    diffusers_bars = None
    if "diffusers" in sys.modules:
        from diffusers.utils import logging as diffusers_logging

        diffusers_bars = diffusers_logging.is_progress_bar_enabled()
        diffusers_logging.disable_progress_bar()
    for key, value in QUIET_ENV:
        os.environ.setdefault(key, value)
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    previous, _QUIET["on"] = _QUIET["on"], True
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore",
                                    module=r"(diffusers|transformers|peft|huggingface_hub|accelerate|torch)\b")
            yield
    finally:
        _QUIET["on"] = previous
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        for name in LIBRARY_LOGGERS:  # imported during the block: back to the library's default (WARNING)
            logging.getLogger(name).setLevel(levels[name] if name in imported else logging.WARNING)
        if diffusers_bars:
            from diffusers.utils import logging as diffusers_logging

            diffusers_logging.enable_progress_bar()


@contextmanager
def quiet_loading():
    """Silence library chatter while loading (offline fallbacks, deprecations and download bars would print several
    lines around our one-line error; torch.hub even writes its download notice to stdout, which is for data)."""
    import io
    import warnings
    from contextlib import redirect_stderr, redirect_stdout

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    levels = diffusers_logging.get_verbosity(), transformers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings(), redirect_stderr(io.StringIO()), redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        diffusers_logging.set_verbosity(levels[0])
        transformers_logging.set_verbosity(levels[1])


def load_pipeline(model: str | None = None, device: Any = "cpu", dtype: Any = None, *, trust_pickle: bool = False,
                  pipeline_class: Any = None, **kwargs: Any):
    """Load a diffusers text-to-image pipeline onto ``device`` in ``dtype`` (fp32 when ``None``).

    ``pipeline_class`` defaults to ``DiffusionPipeline`` for folders and Hub ids (so SD 1.x/2.x/XL all load) and to
    ``StableDiffusionPipeline`` for single files.
    """
    import torch

    model = model or default_model()
    dtype = dtype or torch.float32
    if model == "tiny":
        from .tiny import build_tiny_pipeline

        pipe = build_tiny_pipeline()
    elif model == "sd15-shaped":
        from .shaped import build_sd15_shaped_pipeline

        pipe = build_sd15_shaped_pipeline(device=device)
    else:
        if model == "toy":
            from .toy_weights import weights_folder

            model_path = str(weights_folder())
        else:
            model_path = model
        with quiet_loading() if _QUIET["on"] else contextlib.nullcontext():
            pipe = _load_external(model_path, dtype, trust_pickle, pipeline_class, **kwargs)
    pipe = pipe.to(device)
    if dtype != torch.float32 or model != "tiny":
        pipe = cast(pipe, dtype)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    if getattr(pipe, "safety_checker", None) is not None:
        pipe.safety_checker = None  # research outputs are judged by metrics, not filtered
    return pipe


def cast(module: Any, dtype: Any) -> Any:
    """``module.to(dtype=dtype)`` for a diffusers model or pipeline, without diffusers' warning on every cast ("There
    are modules in … that should be kept in float32: []" — an empty list for the SD models cloaklab loads)."""
    with quiet_loading():
        return module.to(dtype=dtype)


def _load_external(model: str, dtype: Any, trust_pickle: bool, pipeline_class: Any, **kwargs: Any):
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    path = Path(model)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in PICKLE_SUFFIXES and not trust_pickle:
            raise UsageError(f"{model} is a pickle checkpoint, which can run code when loaded: convert it to "
                             ".safetensors, or pass --trust-pickle if you trust its source")
        if suffix != ".safetensors" and suffix not in PICKLE_SUFFIXES:
            raise UsageError(f"{model}: single-file checkpoints must be .safetensors (or .ckpt with --trust-pickle)")
        loader = pipeline_class or StableDiffusionPipeline
        try:
            return loader.from_single_file(str(path), torch_dtype=dtype, **kwargs)
        except (OSError, ValueError) as exc:
            raise ModelNotFoundError(
                f"could not load single-file checkpoint {model}: {str(exc).splitlines()[0]} (single files need the "
                "model's config: keep the original model's config in the HF cache, or convert to a diffusers folder)"
            ) from None
    loader = pipeline_class or DiffusionPipeline
    if path.is_dir():
        if not (path / "model_index.json").exists():
            raise ModelNotFoundError(f"{model} is a folder but not a diffusers pipeline (no model_index.json)")
        where = f"in folder {model}"
    elif model.count("/") > 1 or model.startswith((".", "/", "~")):
        raise _missing(model, "on disk")
    else:
        where = "in the Hugging Face cache" if os.environ.get("HF_HUB_OFFLINE") else "locally or on the Hub"
    try:
        return loader.from_pretrained(model, torch_dtype=dtype, safety_checker=None, **kwargs)
    except (OSError, ValueError) as exc:
        if path.is_dir():
            raise ModelNotFoundError(f"could not load pipeline folder {model}: {str(exc).splitlines()[0]}") from None
        raise _missing(model, where) from None
