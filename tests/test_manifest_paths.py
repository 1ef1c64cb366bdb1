"""Manifests record `cloak` and shareable paths, so a results folder can be moved or shared (issue 20 item 8)."""

from __future__ import annotations

import json
import shutil
import sys

from PIL import Image


def _photos(folder, n=2):
    folder.mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", (24, 16), (40 * i, 90, 200)).save(folder / f"p{i}.jpg", quality=95)


def test_manifest_argv_is_cloak_and_paths_are_relative_to_the_output(tmp_path, monkeypatch):
    from cloaklab.ops.manifest import Manifest

    project = tmp_path / "project"
    (project / "photos").mkdir(parents=True)
    monkeypatch.chdir(project)
    monkeypatch.setattr(sys, "argv", ["/home/someone/.venv/bin/cloak", "purify", "photos", "-o", "runs/out"])
    manifest = Manifest(project / "runs" / "out", "purify", {"method": "jpeg"})
    manifest.start_run()
    manifest.record("a.png", source="photos/a.jpg", status="done")  # relative to the cwd, as the user gave it
    manifest.record("b.png", source=str(project / "photos" / "b.jpg"), status="done")  # absolute, inside project
    manifest.record("c.png", source="/elsewhere/c.jpg", status="done")  # nothing shared below the top: as given
    manifest.close()
    data = json.loads((project / "runs" / "out" / "cloak.json").read_text())
    assert data["argv"] == ["cloak", "purify", "photos", "-o", "runs/out"]
    assert data["runs"][-1]["argv"][0] == "cloak"
    assert data["cwd"] == "../.."  # the command ran two folders above the output
    assert data["files"]["a.png"]["source"] == "../../photos/a.jpg"
    assert data["files"]["b.png"]["source"] == "../../photos/b.jpg"
    assert data["files"]["c.png"]["source"] == "/elsewhere/c.jpg"


def test_a_moved_results_folder_still_finds_its_sources(cli, tmp_path, monkeypatch):
    from cloaklab.ops.report.model import Manifests, read_run, resolve_path

    project = tmp_path / "a" / "project"
    _photos(project / "photos")
    monkeypatch.chdir(project)
    for args in (["purify", "photos", "-o", "out", "-m", "jpeg", "--quality", "50"],
                 ["score", "out", "--ref", "photos", "--metrics", "psnr", "-o", "scores/s.json"]):
        monkeypatch.setattr(sys, "argv", [str(tmp_path / "venv" / "bin" / "cloak"), *args])  # as the entry point
        code, _, err = cli(args)
        assert code == 0, err
    manifest = json.loads((project / "out" / "cloak.json").read_text())
    assert manifest["argv"][:3] == ["cloak", "purify", "photos"] and manifest["cwd"] == ".."
    assert {r["source"] for r in manifest["files"].values()} == {"../photos/p0.jpg", "../photos/p1.jpg"}
    score = json.loads((project / "scores" / "s.json").read_text())
    assert "argv" not in score and "cwd" not in score  # the score file holds only what decides its numbers
    recorded = json.loads((project / "scores" / "cloak.json").read_text())  # the command line is recorded beside it
    assert recorded["files"]["s.json"]["argv"][:2] == ["cloak", "score"] and recorded["cwd"] == ".."
    assert {r["path"] for r in score["images"]} == {"../out/p0.png", "../out/p1.png"}
    assert str(tmp_path) not in json.dumps(manifest) + json.dumps(score) + json.dumps(recorded)  # nothing local

    moved = tmp_path / "b" / "shared"
    shutil.move(str(project), str(moved))
    monkeypatch.chdir(tmp_path)  # neither the old place nor the new one
    run = read_run(moved / "out", Manifests())
    assert sorted(p.original.name for p in run.previews) == ["p0.jpg", "p1.jpg"]
    assert all(p.original.parent == (moved / "photos").resolve() for p in run.previews)
    from cloaklab.ops.report.model import load_json

    data = load_json(moved / "scores" / "s.json")
    assert resolve_path(data["images"][0]["path"], data) == (moved / "out" / data["images"][0]["image"]).resolve()
