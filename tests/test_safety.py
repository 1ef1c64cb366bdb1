"""No user file is ever lost (issue 17 §2, docs/contract.md): outputs never land on inputs, cloak replaces or deletes
only what its manifest says it wrote, symlinks inside OUTPUT are not followed, name clashes are decided over the
whole input set, writes respect the umask, and the manifest stays linear in the number of files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

JPEG = ["-m", "jpeg"]


def _tiny(path: Path, value: int = 90, size: int = 16) -> Path:
    rng = np.random.default_rng(value)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
    return path


def _folder(tmp_path: Path, names=("p00.png", "p01.png")) -> Path:
    folder = tmp_path / "t"
    folder.mkdir()
    for i, name in enumerate(names):
        _tiny(folder / name, i)
    return folder


def _bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _records(out: Path) -> dict:
    return json.loads((out / "cloak.json").read_text())


# ------------------------------------------------------------------------------- 1. outputs never hit inputs
def test_output_onto_an_input_file_is_refused_for_file_args(tmp_path, cli):
    folder = _folder(tmp_path)
    before = _bytes(folder)
    code, _, stderr = cli(["purify", folder / "p00.png", "-o", folder, *JPEG])
    assert code == 2, stderr
    assert "input" in stderr
    assert _bytes(folder) == before


def test_output_onto_an_input_file_is_refused_for_a_stdin_list(tmp_path, cli):
    folder = _folder(tmp_path)
    before = _bytes(folder)
    listing = "".join(f"{p}\n" for p in sorted(folder.glob("*.png")))
    code, _, stderr = cli(["purify", "-", "-o", folder, *JPEG], input=listing)
    assert code == 2, stderr
    assert _bytes(folder) == before


def test_output_inside_a_folder_given_on_stdin_is_refused(tmp_path, cli):
    folder = _folder(tmp_path)
    code, _, stderr = cli(["purify", "-", "-o", folder / "sub", *JPEG], input=f"{folder}\n")
    assert code == 2, stderr
    assert not (folder / "sub").exists()


def test_output_reaching_an_input_through_dotdot_or_a_symlink_is_refused(tmp_path, cli):
    folder = _folder(tmp_path)
    link = tmp_path / "alias"
    link.symlink_to(folder)
    before = _bytes(folder)
    code, _, _ = cli(["purify", folder / "p00.png", "-o", tmp_path / "x" / ".." / "alias", *JPEG])
    assert code == 2
    code, _, _ = cli(["purify", link / "p01.png", "-o", folder, *JPEG])
    assert code == 2
    assert _bytes(folder) == before


def test_empty_output_is_a_usage_error(tmp_path, cli, monkeypatch):
    folder = _folder(tmp_path)
    monkeypatch.chdir(folder)
    before = _bytes(folder)
    code, _, stderr = cli(["purify", "p00.png", "-o", "", *JPEG])
    assert code == 2 and "--output" in stderr
    assert _bytes(folder) == before


# ------------------------------------------------------------------------------------ 2. score outputs
def test_score_refuses_to_write_over_an_input_or_reference_image(tmp_path, cli):
    folder = _folder(tmp_path)
    ref = tmp_path / "ref"
    ref.mkdir()
    _tiny(ref / "p00.png", 7)
    before, before_ref = _bytes(folder), _bytes(ref)
    code, _, stderr = cli(["score", folder, "--ref", ref, "--metrics", "psnr", "-o", folder / "p00.png"])
    assert code == 2, stderr
    code, _, stderr = cli(["score", folder, "--ref", ref, "--metrics", "psnr", "-o", tmp_path / "s.json",
                           "--csv", ref / "p00.png"])
    assert code == 2, stderr
    assert _bytes(folder) == before and _bytes(ref) == before_ref


def test_score_refuses_to_replace_a_file_it_did_not_write(tmp_path, cli):
    folder = _folder(tmp_path)
    mine = tmp_path / "notes.json"
    mine.write_text("my notes\n")
    code, _, stderr = cli(["score", folder, "--ref", folder, "--metrics", "psnr", "-o", mine])
    assert code == 2, stderr
    assert mine.read_text() == "my notes\n"
    out = tmp_path / "s.json"
    assert cli(["score", folder, "--ref", folder, "--metrics", "psnr", "-o", out])[0] == 0
    assert cli(["score", folder, "--ref", folder, "--metrics", "psnr", "-o", out])[0] == 0  # its own output: fine


# ------------------------------------------------------------------- 3. only files cloak wrote are replaced
def test_purify_leaves_an_unrelated_user_file_in_output_alone(tmp_path, cli):
    folder = _folder(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    _tiny(out / "p00.png", 99)
    mine = (out / "p00.png").read_bytes()
    for extra in ([], ["--overwrite"]):
        code, _, stderr = cli(["purify", folder, "-o", out, *JPEG, *extra])
        assert code == 3, stderr
        assert "p00.png" in stderr and "not written by cloak" in stderr
        assert (out / "p00.png").read_bytes() == mine
        assert (out / "p01.png").exists()
    # cloak's own output is replaced with --overwrite
    first = (out / "p01.png").stat().st_mtime_ns
    assert cli(["purify", folder, "-o", out, *JPEG, "--overwrite"])[0] == 3
    assert (out / "p01.png").stat().st_mtime_ns >= first


def test_training_overwrite_deletes_only_cloaks_own_files(tmp_path):
    from cloaklab.ops.train.loop import prepare_run_folder

    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "snapshots").mkdir()
    (out / "checkpoints" / "my_model.ckpt").write_bytes(b"user weights")
    (out / "checkpoints" / "step-000010.pt").write_bytes(b"cloak's")
    (out / "snapshots" / "holiday.jpg").write_bytes(b"a photo")
    (out / "snapshots" / "learned_embeds-step-000010.safetensors").write_bytes(b"cloak's")
    prepare_run_folder(out, resume=False, overwrite=True, extra=("snapshots",))
    assert (out / "checkpoints" / "my_model.ckpt").read_bytes() == b"user weights"
    assert (out / "snapshots" / "holiday.jpg").read_bytes() == b"a photo"
    assert not (out / "checkpoints" / "step-000010.pt").exists()
    assert not (out / "snapshots" / "learned_embeds-step-000010.safetensors").exists()


# ------------------------------------------------------------------------- 4. symlinks inside OUTPUT
def test_a_symlinked_subfolder_inside_output_is_not_followed(tmp_path, cli):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    _tiny(src / "sub" / "a.png", 3)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "sub").symlink_to(elsewhere)
    code, _, stderr = cli(["purify", src, "-r", "-o", out, *JPEG])
    assert code == 3, stderr
    assert "symlink" in stderr
    assert list(elsewhere.iterdir()) == []


def test_symlinked_manifest_and_lock_inside_output_are_not_followed(tmp_path, cli):
    folder = _folder(tmp_path)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "cloak.json").symlink_to(victim)
    code, _, stderr = cli(["purify", folder, "-o", out, *JPEG])
    assert code == 2, stderr
    assert victim.read_text() == "precious\n"
    (out / "cloak.json").unlink()
    (out / ".cloak.json.lock").symlink_to(victim)
    cli(["purify", folder, "-o", out, *JPEG])
    assert victim.read_text() == "precious\n"


# -------------------------------------------------------------------------------- 5. name collisions
def test_collisions_are_decided_over_the_whole_input_set_and_never_replace_the_winner(tmp_path, cli):
    folder = _folder(tmp_path, ("a.png", "b.png", "c.png"))
    Image.open(folder / "b.png").save(folder / "a.jpg", quality=95)  # a.jpg < a.png: a.jpg wins a.png
    whole, sharded = tmp_path / "whole", tmp_path / "sharded"
    assert cli(["purify", folder, "-o", whole, *JPEG])[0] == 3
    for shard in ("1/2", "2/2"):
        cli(["purify", folder, "-o", sharded, *JPEG, "--shard", shard])
    assert _bytes(whole) .keys() - {"cloak.json"} == _bytes(sharded).keys() - {"cloak.json"}
    assert (whole / "a.png").read_bytes() == (sharded / "a.png").read_bytes()
    assert _records(whole)["files"]["a.png"]["source"].endswith("a.jpg")
    assert _records(sharded)["files"]["a.png"]["source"].endswith("a.jpg")
    assert _records(sharded)["files"]["a.png"]["status"] == "done"
    # a rerun finds everything done: the clash did not replace the winner's record
    code, stdout, _ = cli(["purify", folder, "-o", whole, *JPEG, "--json"])
    summary = json.loads(stdout)
    assert summary["done"] == [] and sorted(summary["skipped"]) == ["a.png", "b.png", "c.png"]
    code, stdout, _ = cli(["purify", folder, "-o", whole, *JPEG, "--json"])
    assert json.loads(stdout)["done"] == []


def test_a_file_listed_twice_is_not_a_collision_with_itself(tmp_path, cli):
    folder = _folder(tmp_path)
    code, _, stderr = cli(["purify", folder / "p00.png", folder / "p00.png", folder / ".." / "t" / "p00.png",
                           "-o", tmp_path / "out", *JPEG])
    assert code == 0, stderr


# ------------------------------------------------------------------- 6. umask, temporaries, names, bytes
def test_outputs_respect_the_umask(tmp_path, cli):
    folder = _folder(tmp_path)
    out = tmp_path / "out"
    old = os.umask(0o022)
    try:
        assert cli(["purify", folder, "-o", out, *JPEG])[0] == 0
    finally:
        os.umask(old)
    assert (out / "p00.png").stat().st_mode & 0o777 == 0o644
    assert (out / "cloak.json").stat().st_mode & 0o777 == 0o644


def test_stale_temporaries_of_killed_runs_are_cleaned(tmp_path, cli):
    folder = _folder(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    stale = [out / ".cloak.json.abc123.part", out / ".p00.png.x9y8.part"]
    for path in stale:
        path.write_bytes(b"{")
        os.utime(path, (1, 1))
    mine = out / ".my.part"  # not a cloak temporary name for anything it writes: left alone
    mine.write_bytes(b"mine")
    assert cli(["purify", folder, "-o", out, *JPEG])[0] == 0
    assert not any(path.exists() for path in stale)
    assert mine.exists()


def test_names_on_stderr_are_escaped(tmp_path, cli):
    folder = tmp_path / "t"
    folder.mkdir()
    (folder / "evil\ncloak: purify: 0 written\x1b[2J.png").write_bytes(b"not an image")
    _tiny(folder / "ok.png")
    code, _, stderr = cli(["purify", folder, "-o", tmp_path / "out", *JPEG])
    assert code == 3
    assert "\x1b" not in stderr
    assert not any(line.startswith("cloak: purify: 0 written") for line in stderr.splitlines())
    assert "\\n" in stderr


def test_learned_embeds_bytes_do_not_depend_on_the_hash_seed(tmp_path):
    script = (
        "import sys, torch\n"
        "from cloaklab.ops.io import save_safetensors\n"
        "save_safetensors({'<t>': torch.arange(8.).reshape(2, 4), 'b': torch.ones(3)}, sys.argv[1],\n"
        "                 {'token': '<t>', 'step': '5', 'num_vectors': '2', 'a': 'x', 'z': 'y'})\n"
    )
    outputs = []
    for seed in ("1", "2", "3"):
        path = tmp_path / f"e{seed}.safetensors"
        subprocess.run([sys.executable, "-c", script, str(path)], check=True,
                       env={**os.environ, "PYTHONHASHSEED": seed})
        outputs.append(path.read_bytes())
    assert outputs[0] == outputs[1] == outputs[2]
    from safetensors import safe_open
    from safetensors.torch import load_file

    assert load_file(str(tmp_path / "e1.safetensors"))["<t>"].tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with safe_open(str(tmp_path / "e1.safetensors"), "pt") as handle:
        assert handle.metadata()["token"] == "<t>"


def test_textual_inversion_saves_through_the_deterministic_writer():
    import inspect

    from cloaklab.ops.train import textual_inversion

    source = inspect.getsource(textual_inversion.TextualInversion.save)
    assert "save_safetensors" in source


# ------------------------------------------------------------------------------------ 7. the record log
def test_records_go_to_a_per_process_log_and_merge_into_cloak_json(tmp_path):
    from cloaklab.ops.manifest import Manifest

    out = tmp_path / "out"
    manifest = Manifest(out, "purify", {"method": "jpeg"})
    manifest.start_run()
    before = (out / "cloak.json").read_bytes()
    for i in range(5):
        manifest.record(f"f{i}.png", source=f"f{i}", status="done", output=f"f{i}.png")
    assert (out / "cloak.json").read_bytes() == before, "a record must not rewrite cloak.json"
    logs = list((out / "cloak.json.d").glob("records-*.jsonl"))
    lines = [json.loads(line) for line in logs[0].read_text().splitlines()] if len(logs) == 1 else []
    assert [entry["rel"] for entry in lines if entry["k"] == "file"] == [f"f{i}.png" for i in range(5)]
    # a second process (resume) and a reader (score's prompt lookup) see the records before any merge
    assert set(Manifest(out, "purify", {"method": "jpeg"}).files) == {f"f{i}.png" for i in range(5)}
    from cloaklab.ops.manifest import read_manifest

    assert set(read_manifest(out)["files"]) == {f"f{i}.png" for i in range(5)}
    manifest.close()
    assert set(_records(out)["files"]) == {f"f{i}.png" for i in range(5)}


def test_concurrent_shards_writing_one_output_keep_every_record(tmp_path):
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from cloaklab.ops.manifest import Manifest\n"
        "m = Manifest(Path(sys.argv[1]), 'purify', {'method': 'jpeg'})\n"
        "m.start_run()\n"
        "for i in range(60):\n"
        "    m.record(f'{sys.argv[2]}-{i}.png', source='x', status='done', output='x')\n"
        "m.close()\n"
    )
    out = tmp_path / "out"
    procs = [subprocess.Popen([sys.executable, "-c", script, str(out), f"s{k}"]) for k in range(4)]
    assert all(proc.wait() == 0 for proc in procs)
    assert len(_records(out)["files"]) == 240


def test_training_refuses_to_replace_a_final_artifact_it_did_not_write(tmp_path, cli):
    folder = _folder(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "learned_embeds.safetensors").write_bytes(b"the user's own embedding")
    code, _, stderr = cli(["train-ti", folder, "-o", out, "--model", "tiny",
                           "--steps", "1", "--device", "cpu"])
    assert code == 2, stderr
    assert "not written by cloak" in stderr
    assert (out / "learned_embeds.safetensors").read_bytes() == b"the user's own embedding"


def test_a_fresh_temporary_of_a_dead_process_is_cleaned_but_a_live_ones_is_kept(tmp_path):
    from cloaklab.ops.io import _host_tag, clean_stale_temporaries

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    gone = tmp_path / f".cloak.json.{_host_tag()}-{dead}-abcd1234.part"
    live = tmp_path / f".cloak.json.{_host_tag()}-{os.getppid()}-abcd1234.part"
    for path in (gone, live):
        path.write_bytes(b"{")
    clean_stale_temporaries(tmp_path)
    assert not gone.exists() and live.exists()


def test_poison_preview_never_replaces_a_users_file(tmp_path, cli):
    folder = tmp_path / "t"
    folder.mkdir()
    _tiny(folder / "p00.png", 1, size=32)
    out = tmp_path / "out"
    (out / "previews").mkdir(parents=True)
    (out / "previews" / "p00.png").write_bytes(b"mine")
    code, _, stderr = cli(["poison", folder, "-o", out, "--model", "tiny", "--resolution", "32", "--steps", "1",
                           "--preview", "--eval-draws", "0"])
    assert code == 0, stderr
    assert (out / "previews" / "p00.png").read_bytes() == b"mine"
    assert "preview not written" in json.dumps(_records(out)["files"]["p00.png"])
