"""Single images in memory, for notebooks: :func:`poison_image` and :func:`purify_image` (exposed as
``cloaklab.poison_image`` and ``cloaklab.purify_image``).

Each takes a ``PIL.Image`` and returns a new one of the same size with the pixels the folder command writes for that
image (``cloak poison`` / ``cloak purify``, same settings):

* the image is decoded as the folder command decodes a file (:func:`ops.io.image_from_pil`: EXIF orientation
  applied, alpha and ICC profile kept) and comes back in the mode cloak writes for it — L, LA, RGB, RGBA or I;16
  (a palette image comes back RGB or RGBA, CMYK as RGB), with the input's ICC profile in ``image.info``;
* randomness: the folder run seeds each file with ``ops.io.item_seed(seed, rel)``, ``rel`` being the file's name
  relative to its input folder (``"photo.jpg"``, or ``"sub/photo.jpg"`` with ``--recursive``; a file named on the
  command line: its name). Pass ``name=rel`` to get that file's pixels; without ``name`` the image's generator is
  seeded with ``seed`` itself (a different draw from any folder file);
* networks are reused: pass a loaded diffusers pipeline (``model=pipe``) or a purifier's networks (``models=``,
  from its module's ``load_models``); a model *name* is loaded on the first call and kept for the next call with
  the same name, device and dtype (one pipeline and one purifier set at a time; :func:`clear_cache` drops them).

Settings are the command's, by their CLI names in snake_case (``eps=8``, ``steps=50``, ``robust="jpeg"``,
``quality=25`` …), validated as the CLI validates them; folder-only settings (``recursive``, ``shard``,
``overwrite``, ``batch_size``, ``max_pixels``, ``preview``, ``clean_dir``) are refused, and so are set-level
attacks, which need the whole set (use ``cloaklab.poison(folder, output)``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

from .errors import RejectedInput, UsageError

FOLDER_ONLY = ("recursive", "shard", "overwrite", "batch_size", "max_pixels", "preview", "clean_dir")
_CACHE: dict[str, tuple[Any, Any]] = {}  # kind → (key, loaded networks): one entry per kind


def poison_image(image: Any, attack: str | None = "adm+", model: Any = None, seed: int = 0, *,
                 name: str | None = None, on_step: Callable[[int, int], None] | None = None,
                 **settings: Any) -> Any:
    """``image`` protected by ``attack`` (``None``: the artist preset, as ``cloak poison`` without ``--attack``).

    ``model``: a loaded diffusers pipeline (reused as is), a model name (``"tiny"``, ``"toy"``, a Hub id or path;
    loaded once and cached) or ``None`` (``CLOAK_MODEL`` or SD 1.5). ``name``: the relative name of the folder file
    to reproduce (see the module docstring). ``on_step(step, total)`` sees the PGD steps. ``settings``: the attack's
    parameters and ``cloak poison``'s per-image flags (``eps``, ``steps``, ``t_range``, ``target``, ``robust``,
    ``resolution``, ``native_size``, ``mask`` (a mask file), ``device``, ``dtype`` …).

    >>> import cloaklab
    >>> from PIL import Image
    >>> cloaked = cloaklab.poison_image(Image.new("RGB", (64, 48), "gray"), model="tiny", steps=1)
    >>> cloaked.size, cloaked.mode
    ((64, 48), 'RGB')
    """
    from .attacks.engine import step_hook
    from .attacks.native import native_mask
    from .commands.poison import AttackRun, PoisonSettings, attack_images
    from .io import image_from_pil
    from .models import native_resolution

    _refuse_folder_settings("poison", settings)
    named = model is None or isinstance(model, (str, Path))
    chosen = PoisonSettings.from_kwargs(attack=attack, seed=seed, model=str(model) if named and model else None,
                                        **settings)
    spec = chosen.spec()
    if spec.set_level:
        raise UsageError(f"--attack {spec.name} is set-level: it optimizes a whole set together; run "
                         "cloaklab.poison(folder, output) instead")
    pipe = _pipeline(chosen) if named else model
    resolution = native_resolution(pipe) if chosen.resolution is None else chosen.resolution
    loaded = image_from_pil(image)
    _check_size(loaded, 8, aspect=resolution > 0)
    job = _job(loaded, seed, name)
    run = AttackRun.create(spec.name, chosen.resolved(), resolution=resolution, robust_transforms=chosen.transforms(),
                           eot_samples=chosen.eot_samples, jpeg_quality=chosen.jpeg_quality,
                           native=chosen.native_size, native_crops=chosen.native_crops, eval_draws=0,
                           checkpointing=chosen.checkpointing, pipe=pipe)
    mask = None
    if chosen.mask is not None:
        if not Path(chosen.mask).is_file():
            raise UsageError(f"--mask {chosen.mask}: give one mask file for a single image")
        mask = native_mask(Path(chosen.mask), tuple(loaded.rgb.shape[1:]))
    with step_hook(on_step):
        processed = attack_images(run, [job], [mask])[0]
    return _to_pil(processed.rgb, loaded)


def purify_image(image: Any, method: str = "jpeg", seed: int = 0, models: Any = None, *, name: str | None = None,
                 **settings: Any) -> Any:
    """``image`` purified by ``method`` (a purifier of ``cloak purify``) with its parameters in ``settings``
    (``quality=25``, ``sigma=2``, ``t=60`` …, plus ``model``, ``device``, ``dtype``).

    ``models``: the networks of a model-based method as its module's ``load_models`` returns them (reused as is);
    ``None`` loads them on the first call and keeps them for the next call with the same settings.

    >>> import cloaklab
    >>> from PIL import Image
    >>> cloaklab.purify_image(Image.new("L", (40, 30), 128), "jpeg", quality=25).mode
    'L'
    """
    import torch

    from .commands.purify import PurifySettings
    from .device import resolve_device, resolve_dtype
    from .io import image_from_pil
    from .purify import get_purifier

    _refuse_folder_settings("purify", settings)
    chosen = PurifySettings.from_kwargs(method=method, seed=seed, **settings)
    spec = get_purifier(chosen.method)
    module = spec.load()
    params = chosen.resolved()
    device = resolve_device(chosen.device)
    dtype = resolve_dtype(chosen.dtype, device)
    if models is None and hasattr(module, "load_models"):
        key = (spec.name, chosen.model, str(device), str(dtype), chosen.trust_pickle,
               tuple(sorted((k, repr(v)) for k, v in params.items())))
        models = _cached("purifier", key, lambda: module.load_models(
            device=device, dtype=dtype, model=chosen.model, trust_pickle=chosen.trust_pickle, **params))
    loaded = image_from_pil(image)
    _check_size(loaded, spec.min_size, aspect=False)
    generator = torch.Generator().manual_seed(_job_seed(seed, name))
    with torch.no_grad():
        purified = module.purify(loaded.rgb[None].to(device), generators=[generator], **params,
                                 **({"models": models} if models is not None else {}))
    if isinstance(purified, tuple):  # (images, per-image stats)
        purified = purified[0]
    return _to_pil(purified[0].float().cpu(), loaded)


def clear_cache() -> None:
    """Drop the networks kept from a call that loaded them by name."""
    _CACHE.clear()


# ---------------------------------------------------------------------------------------------------- steps
def _refuse_folder_settings(command: str, settings: dict[str, Any]) -> None:
    given = sorted(key for key in settings if key.replace("-", "_") in FOLDER_ONLY)
    if given:
        raise UsageError(f"{command}: {', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} to folders only "
                         f"(use cloaklab.{command}(inputs, output) for a folder)")


def _pipeline(settings: Any) -> Any:
    """The pipeline of ``settings.model`` on its device and dtype, loaded once per name/device/dtype."""
    from .device import resolve_device, resolve_dtype
    from .models import check_available, default_model

    model = settings.model or default_model()
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    check_available(model)

    def load() -> Any:
        from . import models

        return models.load_pipeline(model, device=device, dtype=dtype, trust_pickle=settings.trust_pickle)

    return _cached("pipeline", (model, str(device), str(dtype), settings.trust_pickle), load)


def _cached(kind: str, key: Any, load: Callable[[], Any]) -> Any:
    if kind not in _CACHE or _CACHE[kind][0] != key:
        _CACHE.pop(kind, None)  # release the previous networks before loading others
        _CACHE[kind] = (key, load())
    return _CACHE[kind][1]


def _job_seed(seed: int, name: str | None) -> int:
    """The folder run's seed of the file named ``name`` (``ops.io.item_seed``), or ``seed`` itself."""
    from .io import item_seed

    return item_seed(seed, PurePosixPath(name)) if name is not None else int(seed)


def _job(loaded: Any, seed: int, name: str | None) -> Any:
    """An :class:`ops.runner.ImageJob` for one in-memory image (nothing is read or written through it)."""
    from .io import InputItem
    from .runner import ImageJob

    rel = PurePosixPath(name or "image.png")
    return ImageJob(InputItem(Path(rel), rel), loaded, _job_seed(seed, name), Path(rel.with_suffix(".png").name), "")


def _check_size(loaded: Any, min_size: int, *, aspect: bool) -> None:
    """The folder runner's rejections of a too-small photo (and of an extreme aspect ratio where the command
    resizes to a working size), as :class:`RejectedInput`."""
    from .validate import check_aspect

    width, height = loaded.size
    if min(width, height) < min_size:
        raise RejectedInput(f"image is {width}x{height}; this method needs at least {min_size} px per side")
    if aspect:
        check_aspect(width, height)


def _to_pil(rgb: Any, like: Any) -> Any:
    """What a reader of the folder command's PNG sees: quantized like the input, encoded, decoded by Pillow."""
    import io

    from PIL import Image

    from .io import encode_png, quantize

    image = Image.open(io.BytesIO(encode_png(quantize(rgb, like), like)))
    image.load()
    return image
