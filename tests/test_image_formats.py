"""Deep and float images are read and written faithfully, or rejected with one line — never destroyed."""

from __future__ import annotations

import cv2
import numpy as np
import tifffile

from cloaklab.ops.io import read_image, write_image


def _rng():
    return np.random.default_rng(7)


def test_16_bit_rgb_and_rgba_pngs_stay_16_bit_losslessly(tmp_path):
    for channels in (3, 4):
        samples = (_rng().random((12, 18, channels)) * 65535).astype(np.uint16)
        source = tmp_path / f"deep{channels}.png"
        cv2.imwrite(str(source), samples[..., [2, 1, 0, 3][:channels]])  # OpenCV stores BGR(A)
        image = read_image(source)
        assert image.bits == 16
        expected = samples[..., :3].astype(np.float64) / 65535
        assert np.abs(image.rgb.permute(1, 2, 0).numpy() - expected).max() < 1e-6
        written = tmp_path / f"out{channels}.png"
        write_image(written, image.rgb, image)
        back = cv2.imread(str(written), cv2.IMREAD_UNCHANGED)
        assert back.dtype == np.uint16
        np.testing.assert_array_equal(back[..., [2, 1, 0, 3][:channels]], samples)


def test_float_tiff_in_unit_range_keeps_its_values(tmp_path):
    gray = _rng().random((10, 14)).astype(np.float32)
    colour = _rng().random((10, 14, 3)).astype(np.float32)
    tifffile.imwrite(tmp_path / "gray.tif", gray)
    tifffile.imwrite(tmp_path / "colour.tif", colour, photometric="rgb")
    image = read_image(tmp_path / "gray.tif")
    assert np.abs(image.rgb[0].numpy() - gray).max() < 1e-6 and image.gray
    write_image(tmp_path / "gray.png", image.rgb, image)
    stored = cv2.imread(str(tmp_path / "gray.png"), cv2.IMREAD_UNCHANGED)
    assert stored.dtype == np.uint16 and np.abs(stored / 65535 - gray).max() <= 0.5 / 65535 + 1e-7
    image = read_image(tmp_path / "colour.tif")
    assert np.abs(image.rgb.permute(1, 2, 0).numpy() - colour).max() < 1e-6


def test_images_that_cannot_be_converted_faithfully_are_rejected_not_clipped(tmp_path, cli):
    folder = tmp_path / "in"
    folder.mkdir()
    tifffile.imwrite(folder / "wide.tif", (_rng().random((16, 16)) * 200_000).astype(np.int32))
    tifffile.imwrite(folder / "hdr.tif", (_rng().random((16, 16)) * 4).astype(np.float32))
    tifffile.imwrite(folder / "nan.tif", np.full((16, 16), np.nan, np.float32))
    within = (_rng().random((16, 16)) * 60_000).astype(np.int32)
    tifffile.imwrite(folder / "narrow.tif", within)
    code, _, stderr = cli(["purify", folder, "-o", tmp_path / "out", "-m", "none"])
    assert code == 3, stderr
    for name in ("wide", "hdr", "nan"):
        assert f"{name}.tif" in stderr and not (tmp_path / "out" / f"{name}.png").exists()
    stored = cv2.imread(str(tmp_path / "out" / "narrow.png"), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(stored, within.astype(np.uint16))  # none = identity
