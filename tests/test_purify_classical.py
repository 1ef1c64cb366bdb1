"""The model-free purifiers: published defaults and behaviours that would break if a method were wrong."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from cloaklab.ops.purify import PURIFIERS, get_purifier
from cloaklab.tests.conftest import photo, photo_tensor


def _run(name: str, images: torch.Tensor, **params) -> torch.Tensor:
    spec = get_purifier(name)
    generators = [torch.Generator().manual_seed(index) for index in range(len(images))]
    with torch.no_grad():
        return spec.load().purify(images, generators=generators, **spec.resolve(params))


def test_published_defaults():
    assert PURIFIERS["jpeg"].defaults == {"quality": 75, "jpeg_scale": None}
    assert PURIFIERS["webp"].defaults == {"quality": 75}
    assert PURIFIERS["gaussian"].defaults["kernel"] == 5
    assert PURIFIERS["tvm"].defaults | {} == {"resolution": 64, "drop": 0.02, "tv_weight": 0.01, "iters": 200}
    assert PURIFIERS["adverse-cleaner"].defaults == {"bilateral_iters": 64, "guided_iters": 4, "radius": 4,
                                                      "eps": 16.0}


@pytest.mark.parametrize("fmt,name", [("JPEG", "jpeg"), ("WEBP", "webp")])
def test_lossy_codecs_equal_pillows_encode_decode(fmt, name):
    image = photo("astronaut", 64)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, quality=25)
    expected = np.asarray(Image.open(buffer).convert("RGB"))
    tensor = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    ours = _run(name, tensor, quality=25)[0]
    assert np.array_equal(np.rint(ours.permute(1, 2, 0).numpy() * 255).astype(np.uint8), expected)


@pytest.mark.parametrize("kernel", [3, 5, 9])
def test_gaussian_kernel_size_is_honoured(kernel):
    impulse = torch.zeros(1, 3, 21, 21)
    impulse[..., 10, 10] = 1
    blurred = _run("gaussian", impulse, kernel=kernel)[0, 0]
    support = (blurred > 0).nonzero()
    assert support[:, 0].min() == 10 - kernel // 2 and support[:, 0].max() == 10 + kernel // 2
    assert blurred.sum().item() == pytest.approx(1.0, abs=1e-5)
    sigma = 0.3 * ((kernel - 1) * 0.5 - 1) + 0.8
    reference = cv2.GaussianBlur(impulse[0, 0].numpy(), (kernel, kernel), sigma)
    np.testing.assert_allclose(blurred.numpy(), reference, atol=1e-6)
    with pytest.raises(ValueError, match="odd"):
        _run("gaussian", impulse, kernel=4)


def test_tvm_lowers_total_variation_keeps_size_and_is_seeded():
    from cloaklab.ops.purify.tvm import total_variation_rows_cols

    noisy = (photo_tensor("coffee", 80) + 0.08 * torch.randn(3, 80, 80, generator=torch.Generator().manual_seed(0)))
    noisy = noisy.clamp(0, 1)[None].expand(2, -1, -1, -1).contiguous()
    out = _run("tvm", noisy, iters=60)
    assert out.shape == noisy.shape
    small = torch.nn.functional.interpolate(noisy, size=(64, 64), mode="bicubic", antialias=True).clamp(0, 1)
    small_out = torch.nn.functional.interpolate(out, size=(64, 64), mode="bicubic", antialias=True)
    assert (total_variation_rows_cols(small_out) < 0.9 * total_variation_rows_cols(small)).all()
    # image 0 and 1 are equal but drew different drop masks from their own generators
    assert not torch.equal(out[0], out[1])
    assert torch.equal(out, _run("tvm", noisy, iters=60))


def test_adverse_cleaner_removes_noise_but_keeps_edges():
    clean = photo_tensor("astronaut", 64)[None]
    noise = torch.empty_like(clean).uniform_(-8 / 255, 8 / 255, generator=torch.Generator().manual_seed(0))
    noisy = (clean + noise).clamp(0, 1)
    cleaned = _run("adverse-cleaner", noisy, bilateral_iters=16)
    from cloaklab.ops.metrics.basic import psnr

    assert psnr(cleaned[0], clean[0]) > psnr(noisy[0], clean[0]) + 0.5
    blurred_edges = _run("adverse-cleaner", noisy, bilateral_iters=16, guided_iters=0)
    assert psnr(cleaned[0], clean[0]) > psnr(blurred_edges[0], clean[0]), "the guided filter restores detail"


def test_guided_filter_with_image_as_its_own_guide_and_tiny_eps_is_identity():
    from cloaklab.ops.purify.adverse_cleaner import guided_filter

    image = np.asarray(photo("chelsea", 32), dtype=np.float64)
    np.testing.assert_allclose(guided_filter(image, image, 2, 1e-6), image, atol=1e-2)
