"""CodeFormer + SR purification (DiffShortcut, paper 001 §4 and Alg. 1 steps 2–3).

1. Face restoration with CodeFormer (Zhou et al. 2022), fidelity weight w = ``fidelity`` 0.5, on images where a face
   is detected (non-faces skip restoration). Pluggable: ``--face-model`` (TorchScript ``f(x, w)`` on 512² in [-1, 1];
   ``none`` skips, ``tiny`` is a stand-in). Approximations: the whole image is restored at 512² (CodeFormer's
   pipeline detects, aligns and pastes back each face with facexlib/RetinaFace), and faces are detected with
   OpenCV's bundled Haar cascade.
2. Resize to 1/4 of the input (128² for the paper's 512² images) and upscale with the SD x4 upscaler: 75 steps,
   guidance 9, noise level 20, prompt "A photo of a {class}" (without ``--class-name``: the empty prompt).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .noisy_upscale import low_resolution, upscale_x4
from .sdedit import prompt_for, resize

PROMPT = "A photo of a {class}"
FACE_RESOLUTION = 512


def load_models(*, device: Any = "cpu", dtype: Any = None, upscaler_model: str = "tiny", face_model: str = "tiny",
                trust_pickle: bool = False, **_: Any):
    from .models import PurifierModels, haar_face_detector, load_face_restorer, load_upscaler

    return PurifierModels(upscaler=load_upscaler(upscaler_model, device, dtype),
                          face=load_face_restorer(face_model, device, trust_pickle), detect_faces=haar_face_detector())


def restore_faces(models, images: torch.Tensor, fidelity: float) -> tuple[torch.Tensor, list[bool]]:
    """Restore the images that contain a face; the others pass through unchanged."""
    faces = models.detect_faces(images) if models.face is not None else [False] * images.shape[0]
    out = images.clone()
    if any(faces):
        index = [i for i, face in enumerate(faces) if face]
        chosen = resize(images[index], (FACE_RESOLUTION, FACE_RESOLUTION)).clamp(0, 1) * 2 - 1
        restored = (models.face(chosen, float(fidelity)).float() + 1) / 2
        out[index] = resize(restored, tuple(images.shape[-2:])).clamp(0, 1).to(out.dtype)
    return out, faces


def purify(images: torch.Tensor, *, models, generators: Sequence[torch.Generator], fidelity: float = 0.5,
           steps: int = 75, guidance: float = 9.0, noise_level: int = 20, prompt: str = PROMPT,
           class_name: str | None = None, **_: Any) -> tuple[torch.Tensor, list[dict]]:
    """Purify ``(B, 3, H, W)`` images in [0, 1]; also returns per image whether a face was restored."""
    height, width = images.shape[-2:]
    restored, faces = restore_faces(models, images.float(), fidelity)
    low = resize(restored, low_resolution((height, width))).clamp(0, 1)
    text = prompt_for(prompt, class_name)
    high = upscale_x4(models.upscaler, low, prompt=text, steps=steps, guidance=guidance, noise_level=noise_level,
                      generators=generators)
    return resize(high, (height, width)).clamp(0, 1), [{"face_restored": bool(f), "prompt": text} for f in faces]
