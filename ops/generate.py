"""Seeded text-to-image generation from a base model, a TI embedding, a LoRA, or a DreamBooth pipeline folder — the
library part: job lists and seeds, pipeline loading, the sampler call. The folder run of ``cloak generate`` (resume,
``--only``, shards, manifest, PNG writes) is :mod:`ops.commands.generate`.

Every image has its own seed, drawn from ``(seed, prompt index, image index)`` (:func:`image_seed`), so image ``k``
of prompt ``j`` comes out the same whether it is generated in a batch, in a shard, or alone after deleting it.
Outputs are ``OUT/p{j:02d}_i{k:03d}.png`` (0-based indices); ``cloak.json`` records, per file, the prompt with the
token filled in, its template, the token, the seed, both indices, the negative prompt and the sampler settings.

Sampling is the diffusers pipeline call itself (DDIM with η = 0 by default, or DPM-Solver++), 50 steps, CFG 7.5
(METHODS.md § Generation). With a negative prompt, diffusers' guidance ``ε_neg + g (ε_c − ε_neg)`` equals paper 001
Eq. 6 ``(1 + w) ε_c − w ε_neg`` with ``w = g − 1``.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import CloakError, UsageError
from .prompts import expand_multi_vector, fill

# torch, diffusers and safetensors are imported inside the functions: ``cloak generate --help``, the settings and the
# dry run read the sampler list and the defaults below without them.
SCHEDULERS = ("ddim", "dpm", "pndm", "euler", "model")  # ``model``: keep the model's own sampler
DEFAULT_SCHEDULER = "ddim"
DEFAULT_STEPS = 50
DEFAULT_GUIDANCE = 7.5
DEFAULT_ETA = 0.0  # DDIM η: 0 = deterministic


@dataclass(frozen=True)
class GenerationJob:
    """One image to generate: ``p{prompt_index:02d}_i{image_index:03d}.png``."""

    prompt_index: int
    image_index: int
    template: str
    token: str
    prompt: str
    negative_prompt: str | None
    seed: int

    @property
    def name(self) -> str:
        return output_name(self.prompt_index, self.image_index)


def output_name(prompt_index: int, image_index: int) -> str:
    return f"p{prompt_index:02d}_i{image_index:03d}.png"


def image_seed(seed: int, prompt_index: int, image_index: int) -> int:
    """The seed of image ``image_index`` of prompt ``prompt_index`` (independent of batching and sharding)."""
    digest = hashlib.sha256(f"generate:{seed}:{prompt_index}:{image_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**63 - 1)


def plan_jobs(templates: Sequence[str], token: str, num_per_prompt: int, seed: int,
              negative_prompt: str | None = None, without: str | None = None) -> list[GenerationJob]:
    """All images of a run, prompt-major: ``len(templates) × num_per_prompt`` jobs. ``without`` (DiffShortcut's
    negative token) appends ", without {without}" to every prompt (:func:`ops.prompts.without_suffix`)."""
    from .prompts import without_suffix

    if num_per_prompt < 1:
        raise UsageError("--num-per-prompt must be at least 1")
    return [GenerationJob(j, k, template, token, without_suffix(fill(template, token), without),
                          negative_prompt or None, image_seed(seed, j, k))
            for j, template in enumerate(templates) for k in range(num_per_prompt)]


# ----------------------------------------------------------------------------------------------- loading
def embedding_token(path: Path) -> str | None:
    """The token a TI file was saved under: the key of a diffusers ``{token: tensor}`` file, else the ``token``
    metadata entry (``cloak train-ti`` writes it, also for SDXL ``{clip_l, clip_g}`` files), else ``None``."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
            metadata = handle.metadata() or {}
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise UsageError(f"--embedding {path}: not a readable .safetensors file ({exc})") from None
    known = {"emb_params", "string_to_param", "clip_l", "clip_g"}
    if len(keys) == 1 and keys[0] not in known:
        return keys[0]
    return metadata.get("token")


def _load_embedding(pipe, path: Path, token: str, stored: str | None) -> None:
    """diffusers ``load_textual_inversion``; SDXL files (``clip_l`` + ``clip_g``) load once per text encoder."""
    keys = set()
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            keys = set(handle.keys())
    if {"clip_l", "clip_g"} <= keys:
        if getattr(pipe, "text_encoder_2", None) is None:
            raise UsageError(f"--embedding {path} is an SDXL embedding (clip_l + clip_g): use an SDXL --model")
        from safetensors.torch import load_file

        state = load_file(str(path))
        pipe.load_textual_inversion(state["clip_l"], token=token, text_encoder=pipe.text_encoder,
                                    tokenizer=pipe.tokenizer)
        pipe.load_textual_inversion(state["clip_g"], token=token, text_encoder=pipe.text_encoder_2,
                                    tokenizer=pipe.tokenizer_2)
        return
    # a diffusers {token: tensor} file loads under its own key unless another token is asked for
    stored_key = stored if stored in keys else None
    if stored_key is not None:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            width = handle.get_slice(stored_key).get_shape()[-1]
        expected = pipe.text_encoder.get_input_embeddings().weight.shape[-1]
        if width != expected:
            raise UsageError(f"--embedding {path}: vectors are {width}-d but this model's text encoder is "
                             f"{expected}-d (trained for another model?)")
    pipe.load_textual_inversion(str(path), token=None if token == stored_key else token)


def set_scheduler(pipe, name: str) -> None:
    """Swap the pipeline's sampler, keeping the model's noise schedule (``model`` keeps its own sampler)."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, PNDMScheduler

    classes = {"ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler, "pndm": PNDMScheduler,
               "euler": EulerDiscreteScheduler}
    if name == "model":
        return
    if name not in classes:
        raise UsageError(f"--scheduler {name!r}: choose one of {', '.join(SCHEDULERS)}")
    pipe.scheduler = classes[name].from_config(pipe.scheduler.config)


def load_generation_pipeline(model: str | None, device: Any, dtype: Any, *, embedding: Path | None = None,
                             token: str | None = None, lora: Path | None = None, scheduler: str = "ddim",
                             unet: Path | None = None, text_encoder: Path | None = None,
                             trust_pickle: bool = False):
    """Base pipeline (Hub id, folder — a DreamBooth output included — file, or ``tiny``) + optional TI and LoRA.

    ``unet`` / ``text_encoder`` are diffusers/transformers model folders that replace the base model's parts (what
    ``cloak train-db --save-trained-only`` writes). Returns ``(pipe, token)`` where ``token`` is the embedding's
    token when ``token`` was not given.
    """
    from .models import load_pipeline

    pipe = load_pipeline(model, device, dtype, trust_pickle=trust_pickle)
    for name, folder in (("unet", unet), ("text_encoder", text_encoder)):
        if folder is not None:
            _replace_part(pipe, name, Path(folder))
    if embedding is not None:
        embedding = Path(embedding)
        if not embedding.is_file():
            raise UsageError(f"--embedding {embedding}: file not found")
        stored = embedding_token(embedding) if embedding.suffix == ".safetensors" else None
        if embedding.suffix != ".safetensors" and not trust_pickle:
            raise UsageError(f"--embedding {embedding}: only .safetensors (pass --trust-pickle for a .bin/.pt)")
        token = token or stored
        if not token:
            raise UsageError(f"--embedding {embedding}: cannot tell its token; pass --token")
        try:
            _load_embedding(pipe, embedding, token, stored)
        except (ValueError, RuntimeError, KeyError) as exc:
            raise CloakError(f"--embedding {embedding}: {str(exc).splitlines()[0]}") from None
    if lora is not None:
        lora = Path(lora)
        weights = lora / "pytorch_lora_weights.safetensors" if lora.is_dir() else lora
        if not weights.is_file():
            raise UsageError(f"--lora {lora}: no pytorch_lora_weights.safetensors there")
        try:
            pipe.load_lora_weights(str(weights.parent), weight_name=weights.name)
        except (ValueError, RuntimeError, KeyError, OSError) as exc:
            raise CloakError(f"--lora {lora}: {str(exc).splitlines()[0]}") from None
    set_scheduler(pipe, scheduler)
    return pipe, token


def _replace_part(pipe, name: str, folder: Path) -> None:
    """Swap ``pipe.<name>`` for the model saved in ``folder`` (same class, same device and dtype)."""
    current = getattr(pipe, name)
    if not (folder / "config.json").is_file():
        raise UsageError(f"--{name.replace('_', '-')} {folder}: not a saved model folder (no config.json)")
    try:
        replacement = type(current).from_pretrained(str(folder))
    except (OSError, ValueError, RuntimeError) as exc:
        raise CloakError(f"--{name.replace('_', '-')} {folder}: {str(exc).splitlines()[0]}") from None
    setattr(pipe, name, replacement.to(device=current.device, dtype=current.dtype).eval())
    pipe.register_modules(**{name: getattr(pipe, name)})


def artifact_digest(path: Path | None) -> str | None:
    """Content hash of an embedding or LoRA (so a retrained one is not mistaken for the old one on resume)."""
    if path is None:
        return None
    path = Path(path)
    from .io import file_sha256

    if path.is_dir():
        weights = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
        return "-".join(file_sha256(file)[:16] for file in weights) or None
    return file_sha256(path)[:16]


# ---------------------------------------------------------------------------------------------- sampling
def sample(pipe, jobs: Sequence[GenerationJob], *, steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE,
           height: int | None = None, width: int | None = None, eta: float = DEFAULT_ETA,
           lora_scale: float | None = None, on_step: Callable[[int, int], None] | None = None):
    """Images ``(B, 3, H, W)`` in [0, 1] for ``jobs``, each from its own ``torch.Generator`` (CPU-seeded);
    ``on_step(step, total)`` after each sampling step (1-based) when the pipeline takes ``callback_on_step_end``."""
    import torch

    generators = [torch.Generator("cpu").manual_seed(job.seed) for job in jobs]
    negatives = [job.negative_prompt or "" for job in jobs]
    kwargs: dict[str, Any] = {"eta": eta}  # the pipeline passes η only to samplers that take it (DDIM)
    if lora_scale is not None:
        kwargs["cross_attention_kwargs"] = {"scale": lora_scale}
    if on_step is not None and "callback_on_step_end" in inspect.signature(pipe.__call__).parameters:
        def step_end(_pipe: Any, index: int, _timestep: Any, tensors: dict) -> dict:
            on_step(index + 1, getattr(_pipe, "num_timesteps", None) or steps)
            return tensors

        kwargs["callback_on_step_end"] = step_end
    tokenizer = pipe.tokenizer
    with torch.no_grad():
        result = pipe(prompt=[expand_multi_vector(tokenizer, job.prompt) for job in jobs],
                      negative_prompt=[expand_multi_vector(tokenizer, text) for text in negatives]
                      if any(negatives) else None,
                      num_inference_steps=steps, guidance_scale=guidance, height=height, width=width,
                      generator=generators, output_type="pt", **kwargs)
    return result.images.float().clamp(0, 1)
