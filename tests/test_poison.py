"""``cloak poison`` end to end: budget on the saved bytes, native size/mode/alpha/ICC, determinism, masks, preset."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageCms

from cloaklab.ops.attacks import get_attack
from cloaklab.ops.attacks.native import project_stored, working_size
from cloaklab.ops.commands.poison import contact_sheet, poison_folder
from cloaklab.ops.io import collect_inputs, quantize, read_back, read_image
from cloaklab.ops.manifest import Manifest
from cloaklab.tests.conftest import photo

SINGLE_ATTACKS = ["adm+", "adm-", "sds+", "sds-", "ea", "mist", "da", "lf-adm+", "lf-ea"]
FAST = {"steps": 2, "step_size": 2.0, "eps": 4.0}


@pytest.fixture
def odd_dir(tmp_path):
    """Non-square RGBA with an ICC profile and a 16-bit grayscale image: sizes that never match the working grid."""
    folder = tmp_path / "odd"
    folder.mkdir()
    rgba = photo("coffee").resize((40, 36)).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize((40, 36)))
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    rgba.save(folder / "rgba.png", icc_profile=icc)
    gray = (np.asarray(photo("rocket").convert("L").resize((34, 40)), dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(gray).save(folder / "gray16.png")
    return folder


def run_folder(folder, out, attack, pipe, only=None, **overrides):
    spec = get_attack(attack)
    given = {k: v for k, v in {**FAST, **overrides}.items() if k in spec.defaults}
    if attack == "da":
        given.update(steps=1, grad_samples=1)
    params = spec.resolve(given)
    items, _ = collect_inputs([str(folder / only)] if only else [str(folder)])
    manifest = Manifest(out, "poison", {"attack": attack, **params}, seed=0)
    summary = poison_folder(items, out, attack, params, pipe=pipe, manifest=manifest, seed=0, batch_size=2,
                            resolution=32, eval_draws=1)
    return summary, params


def check_outputs(folder, out, eps):
    for source in sorted(folder.iterdir()):
        loaded = read_image(source)
        original = quantize(loaded.rgb, loaded)
        written = read_back(out / source.with_suffix(".png").name)
        assert written.shape == original.shape
        with Image.open(source) as a, Image.open(out / source.with_suffix(".png").name) as b:
            assert b.mode == a.mode and b.size == a.size
            assert b.info.get("icc_profile") == a.info.get("icc_profile")
        difference = np.abs(written.astype(np.int64) - original.astype(np.int64))
        levels = int(eps * loaded.max_value / 255)
        if loaded.alpha is not None:
            assert not difference[..., -1].any()  # alpha untouched
            difference = difference[..., :-1]
        assert difference.max() <= levels
        assert difference.max() > 0


@pytest.mark.parametrize("attack", SINGLE_ATTACKS)
def test_every_attack_holds_the_budget_keeps_the_format_and_is_deterministic(attack, odd_dir, tmp_path, tiny_pipe):
    first, params = run_folder(odd_dir, tmp_path / "a", attack, tiny_pipe)
    second, _ = run_folder(odd_dir, tmp_path / "b", attack, tiny_pipe, only="rgba.png")
    assert first.exit_code == 0 and sorted(first.done) == ["gray16.png", "rgba.png"]
    check_outputs(odd_dir, tmp_path / "a", params["eps"])
    for name in second.done:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    record = json.loads((tmp_path / "a" / "cloak.json").read_text())["files"]["rgba.png"]["stats"]
    assert set(record) >= {"loss_start", "loss_end", "linf", "l2", "psnr", "ssim"}
    assert 0 < record["linf"] <= params["eps"] and record["psnr"] > 30


def test_project_stored_enforces_the_budget_in_integer_space(odd_dir):
    image = read_image(odd_dir / "gray16.png")
    wild = (image.rgb + 0.3 * torch.randn_like(image.rgb)).clamp(0, 1)  # far outside any budget
    projected = project_stored(wild, image, 4.0)
    difference = np.abs(quantize(projected, image).astype(np.int64) - quantize(image.rgb, image).astype(np.int64))
    assert difference.max() == 4 * 257  # 16-bit images: ε·257 levels
    rgba = read_image(odd_dir / "rgba.png")
    stored = quantize(project_stored(rgba.rgb + 0.05, rgba, 3.0), rgba).astype(np.int64)
    assert np.abs(stored - quantize(rgba.rgb, rgba).astype(np.int64))[..., :3].max() == 3


def test_working_size_keeps_aspect_in_multiples_of_eight():
    assert working_size(3000, 4000, 512) == (512, 680)
    assert working_size(36, 40, 32) == (32, 32)
    assert working_size(100, 50, 0) == (104, 48)


def test_contact_sheet_shows_original_cloaked_and_amplified_difference():
    original = np.full((4, 5, 3), 100, np.uint8)
    cloaked = original.copy()
    cloaked[0, 0, 0] += 16
    sheet = contact_sheet(original, cloaked, 16, 255)
    assert sheet.shape == (4, 3 * 5 + 16, 3)
    assert sheet[0, 26, 0] == 255 and sheet[1, 27, 1] == 128  # +ε → white, 0 → mid gray


def test_default_is_the_artist_preset_with_preview_and_resume(cli, photo_dir, tmp_path):
    out = tmp_path / "cloaked"
    code, stdout, stderr = cli(["poison", photo_dir, "-o", out, "--model", "tiny", "--resolution", "32",
                                "--steps", "1", "--json", "--preview", "--eval-draws", "0"])
    assert code == 0, stderr
    assert json.loads(stdout)["exit_code"] == 0 and "artist preset" in stderr
    manifest = json.loads((out / "cloak.json").read_text())
    assert manifest["params"]["attack"] == "adm+" and manifest["params"]["preset"] == "artist"
    assert manifest["params"]["robust"] == ["jpeg"] and manifest["params"]["eps"] == 16.0
    with Image.open(out / "previews" / "chelsea.png") as sheet, Image.open(out / "chelsea.png") as cloaked:
        assert sheet.size == (3 * cloaked.width + 16, cloaked.height)
    code, stdout, stderr = cli(["poison", photo_dir, "-o", out, "--model", "tiny", "--resolution", "32",
                                "--steps", "1", "--eval-draws", "0"])
    assert code == 0 and "4 skipped" in stderr and "loading model" not in stderr  # resume loads no model
    assert stdout.strip() == str(out)


def test_mask_leaves_pixels_outside_byte_identical(cli, odd_dir, tmp_path):
    mask = np.zeros((36, 40), np.uint8)
    mask[4:20, 6:30] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    out = tmp_path / "masked"
    code, _, stderr = cli(["poison", odd_dir / "rgba.png", "-o", out, "--model", "tiny", "-a", "adm+",
                           "--resolution", "32", "--steps", "2", "--random-start", "--mask", tmp_path / "mask.png",
                           "--eval-draws", "0"])
    assert code == 0, stderr
    loaded = read_image(odd_dir / "rgba.png")
    difference = read_back(out / "rgba.png").astype(np.int64) - quantize(loaded.rgb, loaded).astype(np.int64)
    assert not difference[mask == 0].any()
    assert difference[mask == 255].any()


@pytest.mark.parametrize("args,message", [
    (["-a", "adm+", "--clean-dir", "."], "set-level"),
    (["-a", "ea", "--target", "no/such.png"], "--target"),
    (["-a", "adm+", "--param", "rounds=3"], "does not apply"),
    (["-a", "adm+", "--robust", "jpeg,sharpen"], "unknown transform"),
    (["-a", "adm+", "--t-range", "900"], "t-range"),
])
def test_usage_errors_exit_2_with_one_line(cli, photo_dir, tmp_path, args, message):
    code, stdout, stderr = cli(["poison", photo_dir, "-o", tmp_path / "out", "--model", "tiny", *args])
    assert code == 2 and message in stderr and stdout == ""


def test_exif_rotation_is_applied_and_native_resolution_works(tmp_path, tiny_pipe):
    folder = tmp_path / "rot"
    folder.mkdir()
    image = photo("astronaut").resize((48, 32))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display
    image.save(folder / "turned.jpg", quality=95, exif=exif.tobytes())
    spec = get_attack("adm+")
    params = spec.resolve({"steps": 1, "eps": 3.0, "step_size": 3.0})
    items, _ = collect_inputs([str(folder)])
    out = tmp_path / "out"
    summary = poison_folder(items, out, "adm+", params, pipe=tiny_pipe, manifest=Manifest(out, "poison", params),
                            resolution=0, eval_draws=0)
    assert summary.exit_code == 0
    with Image.open(out / "turned.png") as written:
        assert written.size == (32, 48)  # oriented as displayed
    record = json.loads((out / "cloak.json").read_text())["files"]["turned.png"]["stats"]
    assert record["working_size"] == [32, 48] and record["linf"] == 3.0 and record["loss_start"] is None
