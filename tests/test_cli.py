"""The command line itself: fast imports, version, one-line errors, --debug tracebacks."""

from __future__ import annotations

import subprocess
import sys

from cloaklab.tests.conftest import photo

COMMANDS = ("poison", "purify", "mask", "train-ti", "train-db", "generate", "score", "report", "ssm", "immunize")


def test_importing_the_cli_loads_no_heavy_modules():
    code = ("import sys, cloaklab.cli.main; "
            "print(','.join(m for m in ('torch', 'diffusers', 'transformers', 'numpy', 'PIL') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def test_every_product_command_is_registered(cli):
    code, stdout, _ = cli(["--help"])
    assert code == 0
    for command in COMMANDS:
        assert command in stdout
    code, stdout, _ = cli(["--version"])
    assert code == 0 and stdout.startswith("cloak ")


def test_expected_faults_are_one_line_and_debug_shows_the_traceback(tmp_path, cli):
    folder = tmp_path / "in"
    folder.mkdir()
    photo("rocket", 32).save(folder / "a.png")
    code, stdout, stderr = cli(["purify", folder, "-o", tmp_path / "out", "--device", "cuda:7"])
    assert code == 2 and stdout == ""
    assert len(stderr.strip().splitlines()) == 1 and stderr.startswith("cloak: error: --device cuda:7")
    code, _, stderr = cli(["purify", folder, "-o", tmp_path / "out", "--device", "cuda:7", "--debug"])
    assert code == 2 and "Traceback" in stderr


def test_a_corrupt_manifest_is_an_error_not_a_crash(tmp_path, cli):
    folder = tmp_path / "in"
    folder.mkdir()
    photo("rocket", 32).save(folder / "a.png")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "cloak.json").write_text("{broken")
    code, _, stderr = cli(["purify", folder, "-o", tmp_path / "out"])
    assert code == 1 and "cloak.json is not valid JSON" in stderr and len(stderr.strip().splitlines()) == 1
