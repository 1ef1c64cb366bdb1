"""A run killed mid-folder, then rerun, gives byte-identical files to an uninterrupted run (DESIGN: resume)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from cloaklab.tests.conftest import photo

# tvm draws a random pixel-drop mask per file, so this also proves per-file seeding survives the interruption.
ARGS = ["--method", "tvm", "--iters", "400", "--seed", "3"]


def _cloak(*args: str) -> list[str]:
    return [sys.executable, "-c", "from cloaklab.cli.main import main; main()", *args]


def test_killed_run_resumes_to_identical_outputs(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for index, name in enumerate(("astronaut", "chelsea", "coffee", "rocket", "astronaut", "chelsea")):
        photo(name, 96).rotate(index * 30).save(folder / f"img{index}.png")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    reference = tmp_path / "reference"
    subprocess.run(_cloak("purify", str(folder), "-o", str(reference), *ARGS), check=True, env=env,
                   capture_output=True)

    resumed = tmp_path / "resumed"
    process = subprocess.Popen(_cloak("purify", str(folder), "-o", str(resumed), *ARGS), env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(resumed.glob("img*.png"))) < 2:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished_before = len(list(resumed.glob("img*.png")))
    assert 2 <= finished_before < 6, "the kill must land mid-folder"

    result = subprocess.run(_cloak("purify", str(folder), "-o", str(resumed), *ARGS, "--json"), env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert '"skipped"' in result.stdout and result.stdout.count("img") >= 6

    for made in sorted(reference.glob("img*.png")):
        assert made.read_bytes() == (resumed / made.name).read_bytes(), made.name
    assert not list(resumed.glob(".*.part"))
