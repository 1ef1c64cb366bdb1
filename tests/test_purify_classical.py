"""The model-free purifiers: published defaults and behaviours that would break if a method were wrong."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

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
    assert PURIFIERS["gaussian"].defaults == {"sigma": 5.0}
    assert PURIFIERS["tvm"].defaults | {} == {"resolution": 64, "drop": 0.02, "tv_weight": 0.01, "iters": 200}
    assert PURIFIERS["adverse-cleaner"].defaults == {"bilateral_iters": 64, "guided_iters": 4, "radius": 4,
                                                      "eps": 16.0}



def test_library_defaults_equal_the_registrys():
    """``purify(...)`` called from Python (no CLI) must run the published defaults pinned above and in
    test_purify_models: every keyword default of a purifier's ``purify`` equals its registry default."""
    import importlib
    import inspect

    checked = 0
    for name, spec in PURIFIERS.items():
        parameters = inspect.signature(importlib.import_module(f"cloaklab.ops.purify.{spec.module}").purify).parameters
        for key, value in spec.defaults.items():
            if key in parameters and parameters[key].default is not inspect.Parameter.empty:
                assert parameters[key].default == value, (name, key)
                checked += 1
    assert checked >= 60

@pytest.mark.parametrize("fmt,name", [("JPEG", "jpeg"), ("WEBP", "webp")])
def test_lossy_codecs_equal_pillows_encode_decode(fmt, name):
    image = photo("astronaut", 64)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, quality=25)
    expected = np.asarray(Image.open(buffer).convert("RGB"))
    tensor = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    ours = _run(name, tensor, quality=25)[0]
    assert np.array_equal(np.rint(ours.permute(1, 2, 0).numpy() * 255).astype(np.uint8), expected)


def test_gaussian_is_diffshortcuts_pillow_blur_on_a_real_photo():
    """DiffShortcut ``defenses/gau.py``: ``ImageFilter.GaussianBlur(radius=5)`` — Pillow's radius is σ."""
    from skimage.metrics import peak_signal_noise_ratio

    image = photo("astronaut", 512)
    expected = np.asarray(image.filter(ImageFilter.GaussianBlur(5)))
    tensor = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    ours = np.rint(_run("gaussian", tensor)[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    assert np.array_equal(ours, expected)
    # a σ = 5 blur costs ~20 dB on a 512 px photo (issue 19: DiffShortcut's gives 20.1 dB; a 5×5 kernel gave 28.7)
    assert 19.0 < peak_signal_noise_ratio(np.asarray(image), ours) < 21.5


@pytest.mark.parametrize("sigma", [2.0, 5.0])
def test_gaussian_sigma_is_the_standard_deviation_in_pixels(sigma):
    """A blurred step edge's derivative is the 1-D kernel; its variance must be σ² (closed form)."""
    step = torch.zeros(1, 3, 9, 81)
    step[..., 40:] = 1
    row = _run("gaussian", step, sigma=sigma)[0, 0, 4].double().numpy()
    slope = np.diff(row)
    position = np.arange(len(slope))
    mean = (slope * position).sum() / slope.sum()
    variance = (slope * (position - mean) ** 2).sum() / slope.sum()
    assert slope.sum() == pytest.approx(1.0, abs=1e-6)
    assert variance == pytest.approx(sigma**2, rel=0.05)
    from cloaklab.ops.errors import UsageError

    for bad in (0.0, -1.0, float("nan")):  # issue 17: --sigma 0|-1|nan are usage errors
        with pytest.raises(UsageError, match="--sigma"):
            _run("gaussian", step, sigma=bad)


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



def test_tvm_refills_exactly_the_dropped_pixels():
    """Guo et al.'s TVM: pixels are dropped with probability ``drop`` (the Bernoulli draw typed here from a fresh
    generator of the image's seed); the fidelity term pins the kept ones, TV re-fills the dropped ones."""
    noisy = (photo_tensor("coffee", 32) + 0.1 * torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(0)))
    noisy = noisy.clamp(0, 1)[None]
    out = _run("tvm", noisy, resolution=32, drop=0.3, iters=100)
    dropped = (torch.rand(1, 32, 32, generator=torch.Generator().manual_seed(0)) < 0.3)[0]
    change = (out - noisy).abs()[0].mean(0)
    assert 0.2 < float(dropped.float().mean()) < 0.4
    assert change[dropped].mean() > 20 * change[~dropped].mean()

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



def test_guided_filter_equals_he_et_al_on_a_grey_guide():
    """He et al.'s guided filter written out (scipy box means, reflected borders as cv2.BORDER_REFLECT): with the
    grey guide repeated in 3 channels, the colour filter's (Σ + εI)⁻¹ acts on (1,1,1) with eigenvalue 3σ² + ε, so it
    equals the grey filter with ε/3 (a = cov/(σ² + ε/3), b = p̄ − a Ī, q = ā I + b̄)."""
    from scipy.ndimage import uniform_filter

    from cloaklab.ops.purify.adverse_cleaner import guided_filter

    rng = np.random.default_rng(0)
    rows = np.mgrid[0:24, 0:24][0]
    grey = 128 + 3 * np.sin(rows / 3.0) + rng.normal(0, 1.5, (24, 24))  # low variance: ε matters
    source = grey + rng.normal(0, 2.0, (24, 24))
    radius, eps = 2, 16.0

    def box(a):
        return uniform_filter(a, size=2 * radius + 1, mode="reflect")

    mean_i, mean_p = box(grey), box(source)
    a = (box(grey * source) - mean_i * mean_p) / (box(grey * grey) - mean_i**2 + eps / 3)
    b = mean_p - a * mean_i
    expected = box(a) * grey + box(b)
    ours = guided_filter(np.repeat(grey[..., None], 3, 2), source[..., None], radius, eps)[..., 0]
    np.testing.assert_allclose(ours, expected, atol=1e-6)

def test_total_variation_by_hand():
    """Guo et al.'s row/column TV (p = 2): ‖row₁ − row₀‖₂ + ‖col₁ − col₀‖₂ per channel, summed over channels."""
    from cloaklab.ops.purify.tvm import total_variation_rows_cols

    image = torch.tensor([[[0.0, 3.0], [4.0, 0.0]], [[1.0, 1.0], [1.0, 1.0]]])[None]
    # channel 0: rows differ by (4, −3) → 5, columns by (3, −4) → 5; channel 1 is flat → 0
    assert total_variation_rows_cols(image).item() == pytest.approx(10.0, abs=1e-5)


def test_adverse_cleaner_stages_equal_opencv_and_scipy():
    """Stage 1 = 64 × cv2.bilateralFilter(d 5, σ_color 8, σ_space 8) on the 8-bit image as float32 (AdverseCleaner's
    clean.py filters ``imread(...).astype(np.float32)``: rounding to uint8 between iterations stalls the smoothing).
    Stage 2's guided filter with a flat guide has a = 0 and b = mean(p), so it is a box mean of box means:
    scipy's uniform_filter twice (mode reflect = OpenCV's BORDER_REFLECT)."""
    from scipy.ndimage import uniform_filter

    from cloaklab.ops.purify.adverse_cleaner import guided_filter

    image = photo_tensor("astronaut", 32)[None]
    pixels = np.rint(image[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    expected = pixels.astype(np.float32)
    for _ in range(64):
        expected = cv2.bilateralFilter(expected, 5, 8, 8)
    ours = _run("adverse-cleaner", image, guided_iters=0)[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(ours, np.clip(expected, 0, 255) / 255, atol=1e-6)

    source = np.asarray(photo("chelsea", 24), dtype=np.float64)
    flat = np.full_like(source, 77.0)
    twice = np.stack([uniform_filter(uniform_filter(source[..., c], 9, mode="reflect"), 9, mode="reflect")
                      for c in range(3)], -1)
    np.testing.assert_allclose(guided_filter(flat, source, 4, 16.0), twice, atol=1e-6)


def test_tiled_guided_filter_equals_the_whole_image_filter():
    from cloaklab.ops.purify import adverse_cleaner

    rng = np.random.default_rng(3)
    guide = (rng.random((90, 30, 3)) * 255).astype(np.uint8)
    source = rng.random((90, 30, 3)) * 255
    whole = adverse_cleaner.guided_filter(guide.astype(np.float64), source, 4, 16.0)
    tiled = source.astype(np.float32)
    previous = adverse_cleaner.TILE_PIXELS
    adverse_cleaner.TILE_PIXELS = 30 * 10  # many tiles, each shorter than twice the halo
    try:
        adverse_cleaner.guided_filter_inplace(guide, tiled, 4, 16.0)
    finally:
        adverse_cleaner.TILE_PIXELS = previous
    np.testing.assert_allclose(tiled, whole, atol=1e-3)


def test_none_returns_every_pixel_unchanged():
    image = photo_tensor("coffee", 24)[None]
    out = _run("none", image)
    assert torch.equal(out, image) and out.data_ptr() != image.data_ptr()
