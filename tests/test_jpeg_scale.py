"""JPEG at a chosen scale (issue 19 §3): ``cloak purify -m jpeg --jpeg-scale S`` and ``cloak train-ti --jpeg-scale S``
equal Pillow's own resize → JPEG → resize, typed here step by step."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from cloaklab.tests.conftest import photo


def _pillow_reference(image: Image.Image, quality: int, short_side: int) -> np.ndarray:
    width, height = image.size
    big = (round(width * short_side / min(width, height)), round(height * short_side / min(width, height)))
    buffer = io.BytesIO()
    image.resize(big, Image.BICUBIC).save(buffer, format="JPEG", quality=quality)
    decoded = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    return np.asarray(decoded.resize((width, height), Image.BICUBIC))


def _to_uint8(tensor: torch.Tensor) -> np.ndarray:
    return np.rint(tensor.permute(1, 2, 0).numpy() * 255).astype(np.uint8)


def test_purifier_and_training_jpeg_at_512_equal_pillow():
    from cloaklab.ops.purify.jpeg import purify
    from cloaklab.ops.train.data import jpeg_compress

    image = photo("chelsea").resize((64, 48), Image.BICUBIC)  # non-square: the short side goes to 512
    tensor = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)
    expected = _pillow_reference(image, 25, 512)
    assert np.array_equal(_to_uint8(purify(tensor[None], quality=25, jpeg_scale=512)[0]), expected)
    assert np.array_equal(_to_uint8(jpeg_compress(tensor, 25, 512)), expected)
    own_size = _to_uint8(purify(tensor[None], quality=25)[0])
    assert np.abs(own_size.astype(int) - expected.astype(int)).mean() > 1  # the scale matters at 64 px


def test_cli_jpeg_scale(cli, tmp_path):
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    image = photo("astronaut", 64)
    image.save(folder / "a.png")
    code, _, err = cli(["purify", folder, "-o", out, "-m", "jpeg", "--quality", "25", "--jpeg-scale", "512"])
    assert code == 0, err
    assert np.array_equal(np.asarray(Image.open(out / "a.png").convert("RGB")), _pillow_reference(image, 25, 512))
    code, _, err = cli(["purify", folder, "-o", tmp_path / "g", "-m", "gaussian", "--jpeg-scale", "512"])
    assert code == 2 and "--jpeg-scale" in err
