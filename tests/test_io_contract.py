"""The folder I/O contract of DESIGN.md, exercised through `cloak purify` (the first command built on it)."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms, ImageOps

from cloaklab.tests.conftest import photo

IDENTITY = ["--method", "none"]  # a purifier that changes no pixel: isolates the I/O path


def _png_with_size(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` × ``height`` (a decompression-bomb probe; the data is tiny)."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr : ihdr + 17])) & 0xFFFFFFFF
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", crc)
    return bytes(data)


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "cloak.json").read_text())


def test_bad_inputs_are_rejected_one_line_each_and_the_rest_done(tmp_path, photo_dir, cli):
    good = sorted(p.stem for p in photo_dir.iterdir())
    jpeg = io.BytesIO()
    photo("coffee", 64).save(jpeg, format="JPEG")
    (photo_dir / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (photo_dir / "empty.png").write_bytes(b"")
    (photo_dir / "notes.jpg").write_bytes(b"this is not an image at all\n")
    (photo_dir / "bomb.png").write_bytes(_png_with_size(40000, 40000))
    out = tmp_path / "out"

    code, stdout, stderr = cli(["purify", photo_dir, "-o", out, *IDENTITY])

    assert code == 3
    assert stdout.strip() == str(out)
    for name, reason in [("truncated.jpg", "truncated"), ("empty.png", "empty"), ("notes.jpg", "not an image"),
                         ("bomb.png", "decompression-bomb")]:
        lines = [line for line in stderr.splitlines() if name in line and line.startswith("cloak: rejected")]
        assert len(lines) == 1 and reason in lines[0], stderr
    written = sorted(p.stem for p in out.glob("*.png"))
    assert written == good
    assert not list(out.rglob("*.part")), "no partial files may be left behind"
    records = _manifest(out)["files"]
    assert {records[f"{n}.png"]["status"] for n in ("truncated", "empty", "notes", "bomb")} == {"rejected"}


def _odd_images(folder: Path) -> dict[str, Image.Image]:
    """Odd-but-valid files and what a faithful decode of each looks like."""
    base = photo("astronaut", 48)
    expected = {}
    cmyk = base.convert("CMYK")
    cmyk.save(folder / "cmyk.jpg", quality=95)
    expected["cmyk"] = Image.open(folder / "cmyk.jpg").convert("RGB")
    sixteen = (np.asarray(base.convert("L"), dtype=np.uint16) * 257 + np.arange(48, dtype=np.uint16)).astype(np.uint16)
    Image.fromarray(sixteen).save(folder / "gray16.png")
    expected["gray16"] = Image.open(folder / "gray16.png")
    palette = base.convert("P", palette=Image.ADAPTIVE, colors=16)
    palette.info["transparency"] = 0
    palette.save(folder / "palette.png", transparency=0)
    expected["palette"] = Image.open(folder / "palette.png").convert("RGBA")
    la = Image.merge("LA", (base.convert("L"), Image.linear_gradient("L").resize((48, 48))))
    la.save(folder / "la.png")
    expected["la"] = la
    base.convert("L").save(folder / "gray.png")
    expected["gray"] = base.convert("L")
    rotated = photo("chelsea").resize((60, 40))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    rotated.save(folder / "rotated.jpg", exif=exif.tobytes(), quality=95)
    expected["rotated"] = ImageOps.exif_transpose(Image.open(folder / "rotated.jpg")).convert("RGB")
    Image.new("RGB", (1, 1), (200, 30, 90)).save(folder / "one.png")
    expected["one"] = Image.open(folder / "one.png")
    return expected


def test_odd_but_valid_images_are_written_back_faithfully(tmp_path, cli):
    folder = tmp_path / "odd"
    folder.mkdir()
    expected = _odd_images(folder)
    out = tmp_path / "out"

    code, _, stderr = cli(["purify", folder, "-o", out, *IDENTITY])

    assert code == 0, stderr
    modes = {"cmyk": "RGB", "gray16": "I;16", "palette": "RGBA", "la": "LA", "gray": "L", "rotated": "RGB",
             "one": "RGB"}
    for name, reference in expected.items():
        written = Image.open(out / f"{name}.png")
        assert written.mode == modes[name], name
        assert written.size == reference.size, name
        assert np.array_equal(np.asarray(written), np.asarray(reference.convert(written.mode))), name
    assert Image.open(out / "rotated.png").size == (40, 60)  # orientation applied, not just copied


def test_alpha_icc_and_size_are_preserved(tmp_path, cli):
    folder = tmp_path / "in"
    folder.mkdir()
    image = photo("coffee").resize((70, 45)).convert("RGBA")
    alpha = np.tile(np.linspace(0, 255, 70, dtype=np.uint8), (45, 1))
    image.putalpha(Image.fromarray(alpha))
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    image.save(folder / "cup.png", icc_profile=icc)

    code, _, _ = cli(["purify", folder, "-o", tmp_path / "out", "--method", "jpeg"])

    assert code == 0
    written = Image.open(tmp_path / "out" / "cup.png")
    assert written.size == (70, 45) and written.mode == "RGBA"
    assert np.array_equal(np.asarray(written)[..., 3], alpha)
    assert written.info.get("icc_profile") == icc


def test_rerun_skips_and_overwrite_recomputes(tmp_path, photo_dir, cli):
    out = tmp_path / "out"
    code, first, _ = cli(["purify", photo_dir, "-o", out, "--json"])
    assert code == 0 and len(json.loads(first)["done"]) == 4
    stamp = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}

    code, second, _ = cli(["purify", photo_dir, "-o", out, "--json"])
    assert code == 0 and json.loads(second)["done"] == [] and len(json.loads(second)["skipped"]) == 4
    assert stamp == {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}

    code, third, _ = cli(["purify", photo_dir, "-o", out, "--json", "--quality", "30"])
    assert len(json.loads(third)["done"]) == 4, "changed parameters must not reuse old outputs"

    code, fourth, _ = cli(["purify", photo_dir, "-o", out, "--json", "--quality", "30", "--overwrite"])
    assert len(json.loads(fourth)["done"]) == 4 and json.loads(fourth)["skipped"] == []


def test_changed_source_is_recomputed(tmp_path, photo_dir, cli):
    out = tmp_path / "out"
    cli(["purify", photo_dir, "-o", out])
    photo("rocket", 64).rotate(90).save(photo_dir / "rocket.png")
    _, stdout, _ = cli(["purify", photo_dir, "-o", out, "--json"])
    assert json.loads(stdout)["done"] == ["rocket.png"]


def test_output_inside_input_is_refused(tmp_path, photo_dir, cli):
    code, stdout, stderr = cli(["purify", photo_dir, "-o", photo_dir / "out"])
    assert code == 2 and stdout == ""
    assert "inside input folder" in stderr and len(stderr.strip().splitlines()) == 1
    assert not (photo_dir / "out").exists()


def test_shards_partition_the_inputs_and_share_one_manifest(tmp_path, photo_dir, cli):
    out = tmp_path / "out"
    _, one, _ = cli(["purify", photo_dir, "-o", out, "--shard", "1/2", "--json"])
    _, two, _ = cli(["purify", photo_dir, "-o", out, "--shard", "2/2", "--json"])
    first, second = set(json.loads(one)["done"]), set(json.loads(two)["done"])
    assert first and second and not first & second
    assert first | second == {f"{p.stem}.png" for p in photo_dir.iterdir()}
    assert set(_manifest(out)["files"]) == first | second
    code, _, stderr = cli(["purify", photo_dir, "-o", out, "--shard", "3/2"])
    assert code == 2 and "--shard" in stderr


def test_paths_from_stdin_and_silent_skips(tmp_path, photo_dir, cli):
    (photo_dir / "README.txt").write_text("notes")
    (photo_dir / ".hidden.png").write_bytes(b"junk")
    listing = "\n".join(str(p) for p in sorted(photo_dir.glob("[!.]*.png"))) + "\n"
    code, stdout, stderr = cli(["purify", "-", "-o", tmp_path / "a", "--json"], input=listing)
    assert code == 0, stderr
    assert sorted(json.loads(stdout)["done"]) == ["astronaut.png", "coffee.png", "rocket.png"]
    code, stdout, stderr = cli(["purify", photo_dir, "-o", tmp_path / "b", "--json"])
    assert code == 0 and "README" not in stderr and "hidden" not in stderr
    assert len(json.loads(stdout)["done"]) == 4


def test_recursive_keeps_relative_paths(tmp_path, photo_dir, cli):
    sub = photo_dir / "concept_a"
    sub.mkdir()
    photo("chelsea", 64).save(sub / "cat.jpg")
    code, _, stderr = cli(["purify", photo_dir, "-o", tmp_path / "flat"])
    assert code == 0 and "use --recursive" in stderr and not (tmp_path / "flat" / "concept_a").exists()
    code, _, _ = cli(["purify", photo_dir, "-o", tmp_path / "deep", "--recursive"])
    assert code == 0 and (tmp_path / "deep" / "concept_a" / "cat.png").exists()


def test_output_name_collisions_are_rejected(tmp_path, cli):
    folder = tmp_path / "in"
    folder.mkdir()
    photo("rocket", 32).save(folder / "shot.jpg")
    photo("coffee", 32).save(folder / "shot.png")
    code, _, stderr = cli(["purify", folder, "-o", tmp_path / "out"])
    assert code == 3 and "already taken" in stderr


def test_manifest_records_command_params_versions_and_stats(tmp_path, photo_dir, cli):
    out = tmp_path / "out"
    cli(["purify", photo_dir, "-o", out, "--method", "jpeg", "--quality", "25", "--seed", "7"])
    data = _manifest(out)
    assert data["command"] == "purify" and data["params"] == {"method": "jpeg", "quality": 25}
    assert data["seed"] == 7 and {"torch", "diffusers", "python"} <= set(data["versions"])
    record = data["files"]["astronaut.png"]
    assert record["status"] == "done" and record["source"].endswith("astronaut.png")
    assert 20 < record["stats"]["psnr"] < 60 and 0 < record["stats"]["ssim"] <= 1 and record["seconds"] >= 0


def test_missing_input_and_unknown_flag_are_usage_errors(tmp_path, cli):
    code, _, stderr = cli(["purify", tmp_path / "nope", "-o", tmp_path / "out"])
    assert code == 2 and "input not found" in stderr
    code, _, _ = cli(["purify", tmp_path, "-o", tmp_path / "out", "--no-such-flag"])
    assert code == 2
    code, _, stderr = cli(["purify", tmp_path, "-o", tmp_path / "out", "--method", "gaussian", "--quality", "3"])
    assert code == 2 and "--quality does not apply to --method gaussian" in stderr
