"""Gaussian blur purifier (paper 001 App. C.1; DiffShortcut passes kernel 5).

``sigma=None`` derives σ from the kernel size as OpenCV and torchvision do: ``0.3·((k − 1)/2 − 1) + 0.8``.
Borders are reflected.
"""

from __future__ import annotations

import torch
from torchvision.transforms.functional import gaussian_blur


def purify(images: torch.Tensor, *, kernel: int = 5, sigma: float | None = None,
           generators: list[torch.Generator] | None = None) -> torch.Tensor:
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"--kernel must be a positive odd number, got {kernel}")
    sigma = sigma if sigma is not None else 0.3 * ((kernel - 1) * 0.5 - 1) + 0.8
    output = torch.empty_like(images)
    for channel in range(images.shape[1]):  # one plane at a time bounds the padded copy of a large photo
        output[:, channel: channel + 1] = gaussian_blur(images[:, channel: channel + 1], kernel_size=[kernel, kernel],
                                                        sigma=[sigma, sigma])
    return output.clamp_(0, 1)
