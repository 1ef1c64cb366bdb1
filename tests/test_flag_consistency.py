"""One meaning per short flag across commands; diffusers-example aliases parse to our setting (issue 20 item 6)."""

from __future__ import annotations

import pytest
import typer

from cloaklab.cli.main import app

GROUP = typer.main.get_command(app)

# The documented meaning of every visible short flag (README "Flags"); a new short flag must be added here.
SHORT_FLAGS = {"-o": "output", "-r": "recursive", "-m": "method", "-a": "attack", "-p": "prompts",
               "-n": "num_per_prompt", "-t": "token",
               "-q": "quiet"}  # -q: issue 20 item 3's --quiet, where a command has it


def _options(command):
    return [p for p in command.params if p.param_type_name == "option"]


def test_each_visible_short_flag_has_one_meaning_everywhere():
    seen: dict[str, set[str]] = {}
    for command in GROUP.commands.values():
        for option in _options(command):
            if option.hidden:
                continue
            for flag in [*option.opts, *option.secondary_opts]:
                if not flag.startswith("--"):
                    seen.setdefault(flag, set()).add(option.name)
    assert {flag: sorted(names) for flag, names in seen.items()} == \
        {flag: [name] for flag, name in SHORT_FLAGS.items() if flag in seen}
    assert set(seen) <= set(SHORT_FLAGS), f"undocumented short flags: {set(seen) - set(SHORT_FLAGS)}"


def test_no_double_negative_flags():
    flags = [flag for command in GROUP.commands.values() for option in _options(command)
             for flag in [*option.opts, *option.secondary_opts]]
    assert not [f for f in flags if f.startswith("--no-no-")]


def _parse(command: str, *args: str) -> dict:
    cmd = GROUP.commands[command]
    with cmd.make_context(command, ["in", "-o", "out", *args], resilient_parsing=True) as ctx:
        return ctx.params


@pytest.mark.parametrize("command, ours, alias, value, key", [
    ("train-ti", "--steps", "--max-train-steps", "7", "steps"),
    ("train-ti", "--lr", "--learning-rate", "0.25", "lr"),
    ("train-ti", "--grad-accumulation", "--gradient-accumulation-steps", "3", "grad_accumulation"),
    ("train-db", "--steps", "--max-train-steps", "7", "steps"),
    ("train-db", "--lr", "--learning-rate", "0.25", "lr"),
    ("train-db", "--grad-accumulation", "--gradient-accumulation-steps", "3", "grad_accumulation"),
])
def test_diffusers_example_names_are_aliases(command, ours, alias, value, key):
    default = _parse(command)[key]
    assert str(default) != value
    assert _parse(command, ours, value)[key] == _parse(command, alias, value)[key] == type(default or 1.0)(value)


def test_gradient_checkpointing_alias_in_poison():
    assert _parse("poison")["checkpointing"] is False
    assert _parse("poison", "--gradient-checkpointing")["checkpointing"] is True
    assert _parse("poison", "--checkpointing")["checkpointing"] is True


def test_immunize_clip_flag_reads_positively():
    assert _parse("immunize")["clip"] is True
    assert _parse("immunize", "--no-clip")["clip"] is False


def test_train_db_dtype_maps_to_mixed_precision(cli, tmp_path):
    assert _parse("train-db", "--dtype", "bf16")["dtype"] == "bf16"
    code, _, err = cli(["train-db", tmp_path, "-o", tmp_path / "o", "--dtype", "fp16", "--mixed-precision", "bf16"])
    assert code == 2 and "contradicts" in err and len(err.strip().splitlines()) == 1
    code, _, err = cli(["train-db", tmp_path, "-o", tmp_path / "o", "--dtype", "fp64"])
    assert code == 2 and "--dtype" in err


def test_deprecated_short_spellings_still_work_with_a_warning(cli, photo_dir, tmp_path):
    # score's old -m (now: -m is --method) and poison's old -p (now: -p is --prompts) parse to the long option
    assert _parse("score", "-m", "psnr")["metrics_short"] == "psnr"
    assert _parse("poison", "-p", "rounds=3")["param_short"] == ["rounds=3"]
    code, _, err = cli(["score", photo_dir, "--ref", photo_dir, "-m", "psnr", "-o", tmp_path / "s.json"])
    assert code == 0 and "deprecated" in err and "--metrics" in err
    import json

    assert "psnr" in json.loads((tmp_path / "s.json").read_text())["metrics"]


def test_help_that_points_to_a_list_shows_that_list(cli):
    for command, heading, example in [("poison", "Attacks", "adm+"), ("purify", "Methods", "gridpure"),
                                      ("score", "Metrics", "toy-acc")]:
        code, out, _ = cli([command, "--help"])
        assert code == 0
        assert f"under {heading} in this help" in " ".join(out.split())
        listing = out[out.index(f"{heading}"):]
        assert example in listing
