"""Cosine similarity between embeddings — shared by the metrics (CLIP, DINOv2, faces, toy-sim) and the toy model's
evaluation, which sits below the metrics package and must not import it."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarities ``(N, M)`` between rows of ``a (N, D)`` and ``b (M, D)`` (computed in fp32)."""
    return F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T
