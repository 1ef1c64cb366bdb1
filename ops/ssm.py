"""Semantic sensitivity maps and the timestep / spatial / frequency analyses of paper 000 (§4, App. B–D, I).

SSM (paper 000 Eq. 6): ``SSM(x, t, ê, n) = E_{ê_Δn}[ ‖ε_θ(z_t, t, c) − ε_θ(z_t, t, c_Δn)‖²_ch ]`` where
``c = τ_θ(ê)`` and ``c_Δn`` replaces input embedding ``n`` by a random entry of the embedding dictionary. Replacing
the embedding of position ``n`` by dictionary row ``k`` is the same as replacing the token id by ``k``, so maps are
computed on token ids (random ids drawn from the vocabulary without the special tokens). The expectation also runs
over the noise draw of ``z_t`` (the same ε for ``c`` and every ``c_Δn`` of a draw). A word that tokenizes into
several pieces has all of its pieces replaced at once. Maps are at latent resolution ``(h, w)`` (a latent cell
covers 8×8 pixels); PNGs show them upsampled.

R (paper 000 Eq. 16): ``R_{n,M} = Σ(SSM ⊙ M_z) / Σ SSM`` with the latent mask ``M_z`` (area-resized pixel mask).

All noise, targets and losses come from :mod:`ops.diffusion`. Images are ``(B, 3, H, W)`` in [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import diffusion
from .errors import CloakError, UsageError
from .prompts import expand_multi_vector

PROFILE_TIMESTEPS = 21  # paper 000 Fig. 4/5: 21 interspersed timesteps


# ------------------------------------------------------------------------------------------------ tokens
def load_embedding(pipe, path: Path, token: str) -> None:
    """Add a learned TI embedding (diffusers ``{token: tensor[n, dim]}`` safetensors) to the pipeline."""
    if not Path(path).is_file():
        raise UsageError(f"--embedding {path}: file not found")
    if Path(path).suffix != ".safetensors":
        raise UsageError(f"--embedding {path}: only .safetensors embeddings are loaded (no pickle)")
    from safetensors.torch import load_file

    stored = list(load_file(str(path)))
    try:
        pipe.load_textual_inversion(str(path), token=None if token in stored else token)
    except (ValueError, RuntimeError, KeyError) as exc:
        raise CloakError(f"--embedding {path}: {str(exc).splitlines()[0]}") from None


def ensure_token(pipe, token: str, init_word: str = "object") -> None:
    """Make ``token`` one new vocabulary entry when it is not a single known piece (an untrained TI token starts
    from ``init_word``'s embedding, as TI initialises it)."""
    tokenizer = pipe.tokenizer
    if len(tokenizer(token, add_special_tokens=False).input_ids) == 1 or token in tokenizer.get_vocab():
        return
    init_ids = tokenizer(init_word, add_special_tokens=False).input_ids
    tokenizer.add_tokens([token])
    encoder = pipe.text_encoder
    encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        weight = encoder.get_input_embeddings().weight
        weight[tokenizer.convert_tokens_to_ids(token)] = weight[init_ids].mean(0)


def prompt_ids(pipe, prompt: str) -> torch.Tensor:
    """Token ids ``(1, 77)`` of ``prompt`` (multi-vector TI tokens expanded as diffusers does)."""
    tokenizer = pipe.tokenizer
    prompt = expand_multi_vector(tokenizer, prompt)
    return tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def token_positions(pipe, ids: torch.Tensor, word: str) -> list[int]:
    """Positions in ``ids (1, L)`` of ``word``'s pieces (first occurrence)."""
    word = expand_multi_vector(pipe.tokenizer, word)
    pieces = pipe.tokenizer(word, add_special_tokens=False).input_ids
    row = ids[0].tolist()
    for start in range(len(row) - len(pieces) + 1):
        if pieces and row[start:start + len(pieces)] == pieces:
            return list(range(start + 0, start + len(pieces)))
    raise UsageError(f"token {word!r} is not in the prompt (after tokenization)")


def prompt_words(pipe, ids: torch.Tensor) -> list[tuple[str, list[int]]]:
    """Every non-special position of ``ids`` as ``(piece text, [position])`` — the default tokens to map."""
    tokenizer = pipe.tokenizer
    special = set(tokenizer.all_special_ids)
    return [(tokenizer.convert_ids_to_tokens(int(i)).replace("</w>", ""), [p]) for p, i in enumerate(ids[0].tolist())
            if int(i) not in special]


def replacement_candidates(pipe) -> torch.Tensor:
    """Vocabulary ids a replacement may take: the base dictionary without special and added tokens."""
    tokenizer = pipe.tokenizer
    size = min(tokenizer.vocab_size, pipe.text_encoder.get_input_embeddings().num_embeddings)
    keep = torch.ones(size, dtype=torch.bool)
    keep[[i for i in tokenizer.all_special_ids if i < size]] = False
    return keep.nonzero().flatten()


# ------------------------------------------------------------------------------------------------- SSM
def _text_embeddings(text_encoder, ids: torch.Tensor) -> torch.Tensor:
    return text_encoder(ids.to(text_encoder.device))[0]


def _predict(unet, scheduler, noisy: torch.Tensor, t: int, context: torch.Tensor) -> torch.Tensor:
    steps = torch.full((noisy.shape[0],), int(t), dtype=torch.long)
    model_t = diffusion.timestep_for_model(scheduler, steps).to(noisy.device)
    return unet(noisy.to(unet.dtype), model_t, encoder_hidden_states=context.to(unet.dtype)).sample.float()


@torch.no_grad()
def semantic_sensitivity(pipe, latents: torch.Tensor, ids: torch.Tensor, groups: Sequence[Sequence[int]],
                         timesteps: Sequence[int], samples: int = 4, generator: torch.Generator | None = None,
                         candidates: torch.Tensor | None = None, batch_timesteps: int = 4) -> torch.Tensor:
    """SSM maps ``(T, N, h, w)`` of one image (paper 000 Eq. 6).

    ``latents``: scaled latents ``(1, C, h, w)``; ``ids``: prompt ids ``(1, L)``; ``groups[n]``: the positions
    replaced together for token ``n``; ``samples``: draws of (random replacement, noise) averaged per map;
    ``candidates``: ids a replacement is drawn from (default: the dictionary without special tokens);
    ``batch_timesteps``: timesteps per UNet call (each call is ``batch_timesteps × (1 + N)`` wide; the result does
    not depend on it — all draws of a sample are made first, in order).
    """
    if latents.ndim != 4 or latents.shape[0] != 1:
        raise ValueError(f"expected latents shaped (1, C, h, w), got {tuple(latents.shape)}")
    candidates = replacement_candidates(pipe) if candidates is None else candidates
    generator = generator or torch.Generator().manual_seed(0)
    unet, scheduler, encoder = pipe.unet, pipe.scheduler, pipe.text_encoder
    variants_count = len(groups) + 1
    maps = torch.zeros(len(timesteps), len(groups), *latents.shape[-2:], dtype=torch.float64)
    for _ in range(samples):
        variants = [ids]
        for group in groups:
            changed = ids.clone()
            picks = torch.randint(len(candidates), (len(group),), generator=generator)
            changed[0, list(group)] = candidates[picks]
            variants.append(changed)
        contexts = _text_embeddings(encoder, torch.cat(variants))
        noises = [torch.randn(latents.shape, generator=generator) for _ in timesteps]
        for start in range(0, len(timesteps), max(1, batch_timesteps)):
            chunk = list(range(start, min(len(timesteps), start + max(1, batch_timesteps))))
            steps = torch.tensor([int(timesteps[i]) for i in chunk])
            noise = torch.cat([noises[i] for i in chunk]).to(latents.device, latents.dtype)
            noisy = diffusion.add_noise(scheduler, latents.expand(len(chunk), -1, -1, -1), noise, steps)
            # rows: timestep-major, variant-minor → (len(chunk) · (1 + N), C, h, w)
            inputs = noisy.repeat_interleave(variants_count, dim=0)
            model_t = diffusion.timestep_for_model(scheduler, steps.repeat_interleave(variants_count))
            predictions = unet(inputs.to(unet.dtype), model_t.to(inputs.device),
                               encoder_hidden_states=contexts.repeat(len(chunk), 1, 1).to(unet.dtype)).sample.float()
            predictions = predictions.reshape(len(chunk), variants_count, *predictions.shape[1:])
            difference = ((predictions[:, 1:] - predictions[:, :1]) ** 2).sum(2)
            maps[chunk] += difference.double().cpu()
    return (maps / samples).float()


def sensitivity_ratio(ssm: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``R_{n,M}`` (paper 000 Eq. 16): share of each map's mass inside ``mask`` (``(h, w)`` in [0, 1]).

    ``ssm``: ``(..., h, w)`` non-negative → ``(...)`` in [0, 1] (NaN for an all-zero map)."""
    mask = mask.to(ssm.dtype)
    return (ssm * mask).sum((-2, -1)) / ssm.sum((-2, -1))


def profile_timesteps(num_timesteps: int, count: int = PROFILE_TIMESTEPS) -> list[int]:
    """``count`` equally spaced timesteps from 0 to T−1 (paper 000 Fig. 4: 0, 50, …, 1000)."""
    return [min(num_timesteps - 1, round(i * num_timesteps / (count - 1))) for i in range(count)]


# ----------------------------------------------------------------------------------------------- profiles
@torch.no_grad()
def loss_profile(pipe, latents: torch.Tensor, context: torch.Tensor, timesteps: Sequence[int], samples: int,
                 generator: torch.Generator, mask: torch.Tensor | None = None) -> dict[str, np.ndarray]:
    """Denoising losses of every latent at every timestep: ``loss (B, T, S)``; with a latent ``mask`` ``(B,1,h,w)``
    also the mean squared error per contributing element inside and outside it (paper 000 Fig. 6)."""
    batch = latents.shape[0]
    out = {key: np.zeros((batch, len(timesteps), samples)) for key in
           (("loss", "inside", "outside") if mask is not None else ("loss",))}
    context = context.expand(batch, -1, -1)
    for ti, t in enumerate(timesteps):
        steps = torch.full((batch,), int(t), dtype=torch.long)
        for s in range(samples):
            noise = torch.randn(latents.shape, generator=generator).to(latents.device, latents.dtype)
            noisy = diffusion.add_noise(pipe.scheduler, latents, noise, steps)
            prediction = _predict(pipe.unet, pipe.scheduler, noisy, t, context)
            target = diffusion.training_target(pipe.scheduler, latents, noise, steps)
            out["loss"][:, ti, s] = diffusion.masked_mse(prediction, target).cpu().numpy()
            if mask is not None:
                error = ((prediction - target.float()) ** 2).mean(1, keepdim=True)
                weights = mask.to(error)
                inside = (error * weights).flatten(1).sum(1) / weights.flatten(1).sum(1).clamp_min(1e-12)
                outside = (error * (1 - weights)).flatten(1).sum(1) / (1 - weights).flatten(1).sum(1).clamp_min(1e-12)
                out["inside"][:, ti, s] = inside.cpu().numpy()
                out["outside"][:, ti, s] = outside.cpu().numpy()
    return out


def gradient_profile(pipe, latents: torch.Tensor, ids: torch.Tensor, positions: Sequence[int],
                     timesteps: Sequence[int], samples: int, generator: torch.Generator) -> np.ndarray:
    """‖∂L/∂e‖₂ of the denoising loss w.r.t. the input embedding vectors of the token (its ``positions`` in
    ``ids``), ``(B, T, S)`` (paper 000 Fig. 5). The embedding layer's output is made a leaf through a forward hook,
    so only ``(1, L, D)`` gradients are formed, not a gradient of the whole dictionary."""
    encoder = pipe.text_encoder
    captured: list[torch.Tensor] = []

    def make_leaf(module, args, output):
        leaf = output.detach().requires_grad_(True)
        captured.append(leaf)
        return leaf

    out = np.zeros((latents.shape[0], len(timesteps), samples))
    handle = encoder.get_input_embeddings().register_forward_hook(make_leaf)
    try:
        for b in range(latents.shape[0]):
            for ti, t in enumerate(timesteps):
                for s in range(samples):
                    noise = torch.randn(latents[b:b + 1].shape, generator=generator).to(latents.device, latents.dtype)
                    captured.clear()
                    with torch.enable_grad():
                        context = _text_embeddings(encoder, ids)
                        loss = diffusion.diffusion_loss(pipe.unet, pipe.scheduler, latents[b:b + 1], context,
                                                        torch.tensor([int(t)]), noise).sum()
                        (grad,) = torch.autograd.grad(loss, captured[0])
                    out[b, ti, s] = float(grad[0, list(positions)].double().norm())
    finally:
        handle.remove()
    return out


def perturbation_histogram(clean: Sequence[torch.Tensor], poisoned: Sequence[torch.Tensor], quality: int = 25,
                           limit: int | None = None) -> dict[str, Any]:
    """Histograms of pixel perturbations ``poisoned − clean`` and ``JPEG(poisoned) − clean`` on the 0–255 scale
    (paper 000 Fig. 7/12), one bin per integer level (8-bit data has no finer steps) over ±``limit`` (values beyond
    are counted in ``outside``); with the number of modes of each (peaks of the smoothed histogram)."""
    from .purify.jpeg import compress

    plain, compressed = [], []
    for a, b in zip(clean, poisoned):
        if a.shape != b.shape:
            raise CloakError(f"jpeg-hist: a poisoned image of size {tuple(b.shape[1:])} has a clean twin of size "
                             f"{tuple(a.shape[1:])}")
        plain.append(((b - a) * 255).flatten())
        compressed.append(((compress(b[None], quality)[0] - a) * 255).flatten())
    plain_all, jpeg_all = torch.cat(plain).double().numpy(), torch.cat(compressed).double().numpy()
    if limit is None:
        limit = int(np.ceil(max(np.abs(plain_all).max(), np.quantile(np.abs(jpeg_all), 0.999), 1.0))) + 2
    edges = np.arange(-limit - 0.5, limit + 1.5)
    result: dict[str, Any] = {"edges": edges.tolist(), "quality": quality}
    for key, values in (("poisoned", plain_all), ("jpeg", jpeg_all)):
        counts, _ = np.histogram(values, edges)
        result[key] = {"counts": counts.tolist(), "modes": count_modes(counts), "mean": float(values.mean()),
                       "std": float(values.std()), "outside": int(len(values) - counts.sum())}
    return result


def count_modes(counts: Sequence[float], sigma: float = 1.5, prominence: float = 0.1) -> int:
    """Peaks of a histogram smoothed by a Gaussian of ``sigma`` bins, counting those whose prominence is at least
    ``prominence`` × the highest (quantization spikes of JPEG output are smoothed away)."""
    from scipy.ndimage import gaussian_filter1d
    from scipy.signal import find_peaks

    values = gaussian_filter1d(np.asarray(counts, dtype=float), sigma, mode="constant")
    padded = np.concatenate([[0.0], values, [0.0]])
    peaks, _ = find_peaks(padded, prominence=prominence * values.max() if values.max() > 0 else 1)
    return int(len(peaks))


def radial_power_spectrum(array: torch.Tensor) -> torch.Tensor:
    """Radially averaged power spectrum of ``(..., h, w)`` maps → ``(R,)`` over integer radii 0..min(h,w)//2,
    averaged over the leading dimensions (paper 000 Fig. 13). Power = |FFT|² / (h·w), so white noise of variance σ²
    is flat at σ²."""
    height, width = array.shape[-2:]
    power = torch.fft.fftshift(torch.fft.fft2(array.double()), dim=(-2, -1)).abs() ** 2 / (height * width)
    power = power.reshape(-1, height, width).mean(0)
    fy = torch.arange(height, dtype=torch.float64) - height // 2
    fx = torch.arange(width, dtype=torch.float64) - width // 2
    radius = torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2).round().long()
    count = min(height, width) // 2 + 1
    sums = torch.zeros(count, dtype=torch.float64).index_add_(0, radius.clamp_max(count - 1).flatten(),
                                                              power.flatten() * (radius.flatten() < count))
    hits = torch.zeros(count, dtype=torch.float64).index_add_(0, radius.clamp_max(count - 1).flatten(),
                                                              (radius.flatten() < count).double())
    return sums / hits.clamp_min(1)


def summarize(values: np.ndarray) -> dict[str, list[float]]:
    """Per-timestep median and 50% / 95% bands over all but the timestep axis (``values (B, T, S)``)."""
    flat = np.moveaxis(values, 1, 0).reshape(values.shape[1], -1)
    quantiles = np.quantile(flat, [0.025, 0.25, 0.5, 0.75, 0.975], axis=1)
    return {name: quantiles[i].tolist() for i, name in enumerate(("q025", "q25", "median", "q75", "q975"))}
