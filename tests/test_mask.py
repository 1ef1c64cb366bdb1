"""``cloak mask``: dilation as paper 000 App. J does it, a tiny SAM built in code gives masks of the image's shape,
and the command writes binary PNGs with the image's stem and size, area stats, previews and resumable runs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from cloaklab.ops.masks import MaskPrompt, build_tiny_sam, dilate_mask, scaled_dilation, segment


@pytest.mark.parametrize("radius", [1, 3, 8])
def test_dilation_grows_a_pixel_into_a_square(radius):
    mask = np.zeros((41, 37), bool)
    mask[20, 18] = True
    grown = dilate_mask(mask, radius)
    ys, xs = np.nonzero(grown)
    assert grown.sum() == (2 * radius + 1) ** 2
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (20 - radius, 20 + radius, 18 - radius, 18 + radius)


def test_dilation_equals_pillow_max_filter_and_scales_from_512():
    rng = np.random.default_rng(0)
    mask = (rng.random((64, 64)) > 0.97).astype(np.uint8) * 255
    expected = np.asarray(Image.fromarray(mask).filter(ImageFilter.MaxFilter(33))) > 127
    assert np.array_equal(dilate_mask(mask, 16), expected)
    assert scaled_dilation(16, (512, 512)) == 16
    assert scaled_dilation(16, (1024, 768)) == 24  # 16 px once the short side is 512: 16 · 768/512
    assert scaled_dilation(16, (1536, 1024)) == 32 and scaled_dilation(16, (1024, 2048)) == 32
    assert scaled_dilation(16, (64, 48)) == 2
    assert scaled_dilation(0, (4000, 3000)) == 0
    assert dilate_mask(mask, 0).sum() == (mask > 0).sum()


@pytest.fixture(scope="module")
def tiny_sam():
    return build_tiny_sam()


@pytest.mark.parametrize("prompt", [MaskPrompt(center=True), MaskPrompt(box=(10, 8, 70, 50)),
                                    MaskPrompt(points=[(20, 30), (60, 40)]), MaskPrompt(points_per_side=4)])
def test_tiny_sam_masks_have_the_image_shape(tiny_sam, prompt):
    from cloaklab.tests.conftest import photo

    rgb = np.asarray(photo("chelsea").resize((96, 64)))
    with torch.no_grad():
        mask, stats = segment(tiny_sam, rgb, prompt)
    assert mask.shape == (64, 96) and mask.dtype == bool
    assert stats["mode"].startswith("auto" if prompt.automatic else "prompted")


def test_tiny_sam_is_deterministic():
    first, second = build_tiny_sam(), build_tiny_sam()
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)


def test_automatic_picks_the_central_object():
    from cloaklab.ops.masks import _pick_automatic

    def blob(y0, y1, x0, x1):
        mask = np.zeros((40, 40), bool)
        mask[y0:y1, x0:x1] = True
        return {"segmentation": mask, "predicted_iou": 0.9}

    background = blob(0, 40, 0, 40)
    corner = blob(0, 18, 0, 18)       # larger, but off-centre
    central = blob(15, 27, 14, 26)    # contains the centre (20, 20)
    assert _pick_automatic([background, corner, central], 40, 40, "central") is central
    assert _pick_automatic([background, corner, central], 40, 40, "largest") is corner


def test_mask_command_writes_binary_masks_of_the_image_size(cli, photo_dir, tmp_path):
    out = tmp_path / "masks"
    args = ["mask", photo_dir, "-o", out, "--sam-type", "tiny", "--device", "cpu", "--center", "--dilate", "16",
            "--preview"]
    code, stdout, stderr = cli(args)
    assert code == 0, stderr
    assert stdout.strip() == str(out)
    manifest = json.loads((out / "cloak.json").read_text())
    for source in photo_dir.iterdir():
        written = out / (source.stem + ".png")
        with Image.open(source) as original, Image.open(written) as mask:
            assert mask.mode == "L" and mask.size == original.size
            values = np.asarray(mask)
        assert set(np.unique(values)) <= {0, 255}
        stats = manifest["files"][written.name]["stats"]
        assert stats["area_fraction"] == pytest.approx((values > 0).mean(), abs=1e-6)
        assert stats["dilate_px"] == round(16 * min(values.shape) / 512)
        assert (out / "previews" / written.name).exists()
    code, _, stderr = cli(args)
    assert code == 0 and "4 skipped" in stderr


def test_mask_errors_are_one_line(cli, photo_dir, tmp_path):
    code, _, stderr = cli(["mask", photo_dir, "-o", tmp_path / "a", "--sam-type", "vit_b",
                           "--sam-checkpoint", tmp_path / "missing.pth"])
    assert code == 1 and "missing.pth" in stderr and "dl.fbaipublicfiles.com" in stderr
    code, _, stderr = cli(["mask", photo_dir, "-o", tmp_path / "b", "--sam-type", "tiny", "--box", "1,2,3"])
    assert code == 2 and "--box" in stderr
    code, _, stderr = cli(["mask", photo_dir, "-o", tmp_path / "c", "--sam-type", "tiny", "--box", "0,0,500,500"])
    assert code == 3 and "outside" in stderr


def test_a_box_outside_one_image_rejects_only_that_image(cli, tmp_path):
    """--box 0,0,40,40 does not fit a 32-px image: that image is rejected (exit 3) and the ones after it in sorted
    order are still segmented; the dry run predicts the same split without loading SAM."""
    from cloaklab.tests.conftest import photo

    folder, out = tmp_path / "in", tmp_path / "masks"
    folder.mkdir()
    photo("rocket", 32).save(folder / "a_small.png")
    photo("astronaut", 64).save(folder / "b_large.png")
    args = ["mask", folder, "-o", out, "--sam-type", "tiny", "--device", "cpu", "--box", "0,0,40,40"]
    code, stdout, _ = cli([*args, "--dry-run", "--json"])
    plan = json.loads(stdout)
    assert code == 0 and plan["would_write"] == ["b_large.png"]
    assert [entry["file"] for entry in plan["rejected"]] == [str(folder / "a_small.png")]
    code, _, stderr = cli(args)
    assert code == 3 and "outside this 32x32 image" in stderr
    assert (out / "b_large.png").is_file() and not (out / "a_small.png").exists()
    files = json.loads((out / "cloak.json").read_text())["files"]
    assert files["a_small.png"]["status"] == "rejected" and files["b_large.png"]["status"] == "done"


def test_mask_settings_take_the_command_line_spelling_or_numbers():
    from cloaklab.ops.commands.mask import MaskSettings
    from cloaklab.ops.errors import UsageError

    typed = MaskSettings(box="40, 30,480,500", point=["20,30", "60,40"])
    assert typed == MaskSettings(box=(40, 30, 480, 500), point=[(20, 30), (60, 40)])
    assert typed.prompt == MaskPrompt(box=(40.0, 30.0, 480.0, 500.0), points=[(20.0, 30.0), (60.0, 40.0)])
    assert MaskSettings(point=(20, 30)).point == MaskSettings(point="20,30").point == ((20.0, 30.0),)
    assert MaskSettings().prompt.automatic
    for bad, flag in (({"box": "1,2,3"}, "--box"), ({"box": "0,0,nan,5"}, "--box"), ({"point": ["1"]}, "--point"),
                      ({"dilate": -1}, "--dilate"), ({"points_per_side": 0}, "--points-per-side"),
                      ({"select": "smallest"}, "--select"), ({"sam_type": "vit_x"}, "--sam-type")):
        with pytest.raises(UsageError, match=flag):
            MaskSettings(**bad)
