"""Gaussian blur purifier (paper 001 App. C.1; DiffShortcut passes kernel 5).

``sigma=None`` derives σ from the kernel size as OpenCV and torchvision do: ``0.3·((k − 1)/2 − 1) + 0.8``.
Borders are reflected (OpenCV BORDER_REFLECT_101, what torchvision's ``gaussian_blur`` pads with).
"""

from __future__ import annotations

import cv2
import numpy as np
import torch


def purify(images: torch.Tensor, *, kernel: int = 5, sigma: float | None = None,
           generators: list[torch.Generator] | None = None) -> torch.Tensor:
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"--kernel must be a positive odd number, got {kernel}")
    sigma = sigma if sigma is not None else 0.3 * ((kernel - 1) * 0.5 - 1) + 0.8
    # OpenCV on one float32 plane at a time (reflected borders = torchvision's gaussian_blur "reflect" padding):
    # a large photo gets no padded or float64 copy.
    output = torch.empty(images.shape, dtype=torch.float32)
    for index, image in enumerate(images.detach().float().cpu()):
        for channel in range(image.shape[0]):
            plane = np.ascontiguousarray(image[channel].numpy())
            output[index, channel] = torch.from_numpy(cv2.GaussianBlur(plane, (kernel, kernel), sigmaX=sigma,
                                                                       sigmaY=sigma,
                                                                       borderType=cv2.BORDER_REFLECT_101))
    return output.clamp_(0, 1).to(images.device, images.dtype)
