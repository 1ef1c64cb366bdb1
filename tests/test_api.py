"""The one home of every command (issue 21): the Python API and the CLI give byte-identical outputs; ``--dry-run``
loads no model and writes nothing; ``cloak rerun`` reproduces bytes; settings reject out-of-range values naming the
flag. Parametrized over the commands that have a case in tests/api_cases/."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .api_cases import all_cases
from .conftest import photo

CASES = all_cases()
IGNORE = ("cloak.json", "cloak.json.d", ".cloak.json.lock")


@pytest.fixture
def photos(tmp_path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    photo("astronaut", 64).save(folder / "astronaut.png")
    photo("coffee").resize((64, 64)).save(folder / "coffee.jpg", quality=95)
    return folder


def _files(root: Path, ignore: tuple[str, ...]) -> dict[str, bytes]:
    if root.is_file():
        return {root.name: root.read_bytes()}
    return {path.relative_to(root).as_posix(): path.read_bytes() for path in sorted(root.rglob("*"))
            if path.is_file() and not any(part in ignore for part in path.relative_to(root).parts)}


def _cli_run(cli, case, out: Path, extra=()):
    code, stdout, stderr = cli([case.command, *case.inputs, "-o", out, *case.cli_args, *extra])
    assert code == 0, stderr
    return stdout


@pytest.mark.parametrize("command", sorted(CASES))
def test_api_and_cli_write_identical_bytes(command, cli, tmp_path, photos):
    import cloaklab

    case = CASES[command](tmp_path, photos)
    cli_out, api_out = tmp_path / "cli" / case.output, tmp_path / "api" / case.output
    _cli_run(cli, case, cli_out)
    summary = getattr(cloaklab, command.replace("-", "_"))(case.inputs, api_out, **case.api_kwargs)
    assert summary.exit_code == 0 and summary.done
    cli_files, api_files = _files(cli_out, case.ignore), _files(api_out, case.ignore)
    assert cli_files and cli_files.keys() == api_files.keys()
    assert [name for name in cli_files if cli_files[name] != api_files[name]] == []


@pytest.mark.parametrize("command", sorted(CASES))
def test_dry_run_loads_no_model_and_writes_nothing(command, cli, tmp_path, photos, monkeypatch):
    import torch

    def no_model(*args, **kwargs):
        raise AssertionError("a dry run constructed a torch module")

    monkeypatch.setattr(torch.nn.Module, "__init__", no_model)
    case = CASES[command](tmp_path, photos)
    out = tmp_path / "dry" / case.output
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    stdout = _cli_run(cli, case, out, ["--dry-run", "--json"])
    plan = json.loads(stdout)
    assert plan["dry_run"] is True and plan["command"] == case.command
    assert plan["inputs"] and plan["would_write"]
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written anywhere


@pytest.mark.parametrize("command", sorted(CASES))
def test_rerun_reproduces_bytes(command, cli, tmp_path, photos):
    case = CASES[command](tmp_path, photos)
    first, again = tmp_path / "first" / case.output, tmp_path / "again" / case.output
    _cli_run(cli, case, first)
    manifest = (first.parent if first.is_file() else first) / "cloak.json"
    code, stdout, stderr = cli(["rerun", manifest, "-o", again])
    assert code == 0, stderr
    assert _files(again, case.ignore) == _files(first, case.ignore)


@pytest.mark.parametrize("command", sorted(CASES))
def test_settings_reject_out_of_range_naming_the_flag(command, tmp_path, photos):
    import cloaklab
    from cloaklab.ops.errors import UsageError

    case = CASES[command](tmp_path, photos)
    key, value, flag = case.bad
    with pytest.raises(UsageError, match=flag):
        cloaklab.settings(command, **{**case.api_kwargs, key: value})
    with pytest.raises(UsageError, match="no.such.setting"):
        cloaklab.settings(command, **{**case.api_kwargs, "no_such_setting": 1})
    cloaklab.settings(command, **case.api_kwargs)  # the case's own settings are valid


def test_import_cloaklab_is_light():
    code = ("import sys, cloaklab; assert callable(cloaklab.purify); "
            "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'numpy') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_rerun_reports_changed_inputs_and_refuses_its_own_folder(cli, tmp_path, photos):
    out = tmp_path / "out"
    assert cli(["purify", photos, "-o", out, "-m", "jpeg"])[0] == 0
    code, _, stderr = cli(["rerun", out / "cloak.json", "-o", out])
    assert code == 2 and "own output" in stderr
    photo("rocket", 64).save(photos / "astronaut.png")  # the input changed since the recorded run
    code, _, stderr = cli(["rerun", out / "cloak.json", "-o", tmp_path / "again"])
    assert code == 0 and "astronaut.png: its bytes changed" in stderr


def test_config_file_fills_flags_and_the_command_line_wins(cli, tmp_path, photos):
    config = tmp_path / "grid.toml"
    config.write_text('quality = 10\n[purify]\nmethod = "jpeg"\n[train-ti]\nsteps = 3\n')
    out_a, out_b, out_c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert cli(["purify", photos, "-o", out_a, "--config", config])[0] == 0
    assert cli(["purify", photos, "-o", out_b, "-m", "jpeg", "--quality", "10"])[0] == 0
    assert cli(["purify", photos, "-o", out_c, "--config", config, "--quality", "90"])[0] == 0
    assert _files(out_a, IGNORE) == _files(out_b, IGNORE)
    assert _files(out_c, IGNORE) != _files(out_a, IGNORE)
    yaml_config = tmp_path / "grid.yaml"
    yaml_config.write_text("quality: 10\nmethod: jpeg\n")
    assert cli(["purify", photos, "-o", tmp_path / "d", "--config", yaml_config])[0] == 0
    assert _files(tmp_path / "d", IGNORE) == _files(out_a, IGNORE)
    bad = tmp_path / "bad.toml"
    bad.write_text("qualty = 10\n")
    code, _, stderr = cli(["purify", photos, "-o", tmp_path / "e", "--config", bad])
    assert code == 2 and "qualty" in stderr and "quality" in stderr


def test_rerun_from_another_folder_finds_relative_path_settings(cli, tmp_path, photos, monkeypatch):
    import shutil

    shutil.copytree(photos, tmp_path / "refs")
    monkeypatch.chdir(tmp_path)
    code, _, stderr = cli(["score", "photos", "--ref", "refs", "--metrics", "psnr", "-o", "first/s.json"])
    assert code == 0, stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    # (the score file names its images relative to itself, so the copy sits at the same depth as the original)
    code, _, stderr = cli(["rerun", "../first/cloak.json", "-o", "../again/s.json"])
    assert code == 0, stderr
    assert (tmp_path / "again" / "s.json").read_bytes() == (tmp_path / "first" / "s.json").read_bytes()


def test_the_example_of_docs_api_md_runs_as_written(tmp_path, monkeypatch):
    """docs/api.md's first Python block is runnable: it is executed here on two photos named as it expects."""
    import re

    text = (Path(__file__).resolve().parent.parent / "docs" / "api.md").read_text()
    block = re.findall(r"```python\n(.*?)```", text, re.S)[0]
    (tmp_path / "photos").mkdir()
    photo("astronaut", 48).save(tmp_path / "photos" / "a.png")
    photo("coffee", 48).save(tmp_path / "photos" / "b.png")
    monkeypatch.chdir(tmp_path)
    code = block.replace("summary.check()", "assert summary.check() is summary")
    exec(compile(code, "docs/api.md", "exec"), {})
    assert sorted(p.name for p in (tmp_path / "out" / "jpeg25").glob("*.png")) == ["a.png", "b.png"]


def _outside(spec):
    """A value just outside a :class:`ops.validate.Range` (None when the range is unbounded or a pair)."""
    if spec.pair:
        return None
    if spec.low is not None:
        return spec.low if spec.low_open else spec.low - 1
    if spec.high is not None:
        return spec.high if spec.high_open else spec.high + 1
    return None


@pytest.mark.parametrize("command", sorted(CASES))
def test_every_ranged_setting_rejects_a_value_outside_its_range(command, tmp_path, photos):
    """Each numeric setting a command's range table names (ops/validate.py) is checked on the settings themselves
    (so the Python API refuses what the CLI refuses), with the flag's name in the error."""
    import dataclasses

    import cloaklab
    from cloaklab.ops.commands import load
    from cloaklab.ops.errors import UsageError
    from cloaklab.ops.validate import COMMAND_FLAGS, COMMON_FLAGS

    case = CASES[command](tmp_path, photos)
    fields = {spec.name for spec in dataclasses.fields(load(command).Settings)}
    table = {**COMMON_FLAGS, **COMMAND_FLAGS[command.replace("-", "_")]}
    checked = 0
    for key, spec in table.items():
        bad = _outside(spec)
        if key not in fields or bad is None:
            continue
        with pytest.raises(UsageError, match="--" + key.replace("_", "-")):
            cloaklab.settings(command, **{**case.api_kwargs, key: bad})
        checked += 1
    assert checked >= 1


def test_rerun_of_a_score_file_reports_a_changed_scored_image(cli, tmp_path, photos):
    out = tmp_path / "scores" / "s.json"
    assert cli(["score", photos, "--ref", photos, "--metrics", "psnr", "-o", out])[0] == 0
    code, _, stderr = cli(["rerun", out.parent / "cloak.json", "-o", tmp_path / "again" / "s.json"])
    assert code == 0 and "changed" not in stderr
    photo("rocket", 64).save(photos / "astronaut.png")
    code, _, stderr = cli(["rerun", out.parent / "cloak.json", "-o", tmp_path / "third" / "s.json"])
    assert code == 0 and "astronaut.png: its bytes changed" in stderr


def test_dry_run_header_check_rejects_what_the_run_would(tmp_path):
    """``header_problem`` (every command's --dry-run) judges size limits from the header: the pixel limit is a strict
    ``>``, the side limit a strict ``<``, and a file Pillow cannot open is unreadable."""
    from PIL import Image

    from cloaklab.ops.commands.base import header_problem

    Image.new("RGB", (8, 4)).save(tmp_path / "small.png")
    (tmp_path / "text.png").write_text("not an image")
    assert header_problem(tmp_path / "small.png") is None
    assert header_problem(tmp_path / "small.png", max_pixels=32) is None
    assert header_problem(tmp_path / "small.png", max_pixels=31) == "image is 8x4, more than --max-pixels 31"
    assert header_problem(tmp_path / "small.png", min_size=4) is None
    assert header_problem(tmp_path / "small.png", min_size=5) == ("image is 8x4; this method needs at least 5 px "
                                                                  "per side")
    assert header_problem(tmp_path / "text.png") == "not a readable image (UnidentifiedImageError)"


@pytest.mark.parametrize("command", ["purify", "mask"])
def test_a_collection_note_reaches_on_event(command, tmp_path, photos):
    """What collecting the inputs noticed (here: a subfolder skipped without --recursive) is a ``note`` event of the
    run, as the CLI prints it."""
    import cloaklab

    (photos / "more").mkdir()
    events = []
    kwargs = {"purify": {"method": "jpeg"}, "mask": {"sam_type": "tiny", "device": "cpu", "center": True}}[command]
    getattr(cloaklab, command)(photos, tmp_path / "out", on_event=lambda kind, name, info: events.append((kind, info)),
                               **kwargs)
    notes = [info["message"] for kind, info in events if kind == "note"]
    assert any("1 subfolder(s) skipped (use --recursive)" in note for note in notes), notes


@pytest.mark.parametrize("command", ["poison", "ssm", "generate"])
def test_dry_run_notes_a_model_the_run_could_not_load(command, tmp_path, photos):
    """A --dry-run with a model that is not on this machine still plans, and says the run would stop; with a model
    that is there it says nothing of the kind."""
    import cloaklab

    missing = str(tmp_path / "no-such-model")
    extra = {"ssm": {"prompt": "a photo of a dog", "token": ["dog"]}}.get(command, {})
    inputs = [] if command == "generate" else photos
    for model, expected in ((missing, True), ("tiny", False)):
        plan = cloaklab.plan(command, inputs, tmp_path / "out", model=model, **extra)
        stops = [note for note in plan.notes if note.startswith("the run would stop: ")]
        assert bool(stops) is expected, plan.notes
        assert not stops or missing in stops[0]
    assert not (tmp_path / "out").exists()


def test_immunize_leaves_a_users_pipeline_tmp_alone(tmp_path, photos):
    """The pipeline folder is saved under a fresh temporary name: a file of the user's named OUTPUT/pipeline.tmp
    (or anything else cloak did not write) survives the run (docs/contract.md)."""
    import cloaklab

    from .api_cases.immunize import make

    out = tmp_path / "out"
    (out / "pipeline.tmp").mkdir(parents=True)
    (out / "pipeline.tmp" / "mine.txt").write_text("keep")
    summary = cloaklab.immunize(photos, out, **make(tmp_path, photos).api_kwargs)
    assert summary.exit_code == 0 and (out / "pipeline" / "model_index.json").is_file()
    assert (out / "pipeline.tmp" / "mine.txt").read_text() == "keep"
    assert sorted(path.name for path in out.iterdir() if path.name.startswith(".pipeline")) == []


@pytest.mark.parametrize("command", ["poison", "immunize", "generate", "train_ti", "train_db", "ssm"])
def test_a_run_starts_with_its_header_then_the_models_note(command, tmp_path, photos):
    """The first events of a model run: the header (model, device, dtype, size), then the note that ``tiny`` has
    random weights — once."""
    import cloaklab

    case = CASES[command](tmp_path, photos)
    events = []
    getattr(cloaklab, command.replace("-", "_"))(case.inputs, tmp_path / "out" / case.output,
                                                 on_event=lambda kind, name, info: events.append((kind, info)),
                                                 **case.api_kwargs)
    assert events[0][0] == "header" and events[0][1]["model"] == "tiny"
    assert events[1][0] == "note" and "random weights" in events[1][1]["message"]
    assert sum("random weights" in info.get("message", "") for _, info in events) == 1
