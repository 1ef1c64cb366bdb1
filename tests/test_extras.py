"""The core commands run without the optional extras (sam, metrics, plot) and the old dependencies (open-clip-torch,
brisque); features that need an extra fail with one line naming it (issue 17 §1)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

from cloaklab.tests.conftest import photo

BLOCKED = ("torchvision", "segment_anything", "matplotlib", "torchmetrics", "torch_fidelity", "open_clip", "brisque")

# Runs in a fresh interpreter: the blocked packages look uninstalled (imports fail, importlib.util.find_spec says
# None, as optional-dependency probes in diffusers/transformers ask), then each argv list runs through the CLI.
DRIVER = r"""
import importlib.util, json, sys

BLOCKED = set(sys.argv[1].split(","))
asked = set()
_find_spec = importlib.util.find_spec


def find_spec(name, package=None):
    if name.split(".")[0] in BLOCKED:
        asked.add(name.split(".")[0])
        return None
    return _find_spec(name, package)


class Uninstalled:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            asked.add(name.split(".")[0])
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


importlib.util.find_spec = find_spec
sys.meta_path.insert(0, Uninstalled())
from typer.testing import CliRunner

from cloaklab.cli.main import app

results = []
for args in json.loads(sys.argv[2]):
    result = CliRunner().invoke(app, args)
    results.append({"args": args, "code": result.exit_code, "stderr": result.stderr,
                    "exception": None if result.exception is None or isinstance(result.exception, SystemExit)
                    else repr(result.exception)})
loaded = sorted(name for name in sys.modules if name.split(".")[0] in BLOCKED)
print(json.dumps({"results": results, "loaded": loaded, "asked": sorted(asked)}))
"""


def test_core_commands_run_without_the_extras_and_extras_fail_in_one_line(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    photo("astronaut", 64).save(images / "astronaut.png")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a {token} on the beach\n")
    table_input = tmp_path / "run.json"
    table_input.write_text(json.dumps({"metrics": ["psnr"], "labels": {"poison": "adm+", "defense": "none"},
                                       "dataset": {"psnr": 30.0}}))
    out = tmp_path / "out"
    tiny = ["--model", "tiny", "--device", "cpu"]
    runs = {
        "purify": ["purify", images, "-o", out / "purified", "-m", "jpeg"],
        "poison": ["poison", images, "-o", out / "poisoned", *tiny, "--resolution", "32", "--steps", "1",
                   "--eval-draws", "0"],
        "train-ti": ["train-ti", images, "-o", out / "ti", *tiny, "--steps", "2"],
        "generate": ["generate", "-o", out / "generated", *tiny, "--prompts", prompts, "-n", "1", "--steps", "2"],
        "ssm": ["ssm", images, "-o", out / "ssm", *tiny, "--prompt", "a photo on the grass", "--timesteps", "500",
                "--samples", "1"],
        "score": ["score", images, "--ref", images, "--metrics", "psnr,brisque", "-o", out / "score.json"],
        "table": ["score", "--table", table_input, "--rows", "poison", "--cols", "defense", "-o", out / "table"],
        "report": ["report", out / "poisoned", "-o", out / "report"],
        "mask": ["mask", images, "-o", out / "masks", "--sam-type", "tiny"],
        "lpips": ["score", images, "--ref", images, "--metrics", "lpips", "-o", out / "lpips.json"],
    }
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CLOAK_TEST_THREADS": "1"}
    process = subprocess.run([sys.executable, "-c", DRIVER, ",".join(BLOCKED),
                              json.dumps([[str(a) for a in args] for args in runs.values()])],
                             capture_output=True, text=True, env=env, timeout=240)
    assert process.returncode == 0, process.stderr[-3000:]
    report = json.loads(process.stdout.strip().splitlines()[-1])
    assert report["loaded"] == []
    results = dict(zip(runs, report["results"]))
    for name in ("purify", "poison", "train-ti", "generate", "ssm", "score", "table", "report"):
        assert results[name]["code"] == 0, (name, results[name])
    assert (out / "report" / "index.html").is_file()
    assert (out / "purified" / "astronaut.png").is_file() and (out / "poisoned" / "astronaut.png").is_file()
    assert (out / "ti" / "learned_embeds.safetensors").is_file()
    assert len(list((out / "generated").glob("*.png"))) == 1
    assert np.load(out / "ssm" / "astronaut.npy").ndim == 4 and not (out / "ssm" / "astronaut.png").exists()
    assert json.loads((out / "score.json").read_text())["dataset"]["brisque"] is not None
    assert (out / "table.md").is_file() and (out / "table.csv").is_file() and not (out / "table.png").exists()
    for name in ("ssm", "table"):
        assert "pip install 'cloaklab[plot]'" in results[name]["stderr"], results[name]["stderr"]
    for name, extra in (("mask", "sam"), ("lpips", "metrics")):
        lines = results[name]["stderr"].strip().splitlines()
        assert results[name]["code"] == 1 and results[name]["exception"] is None, results[name]
        assert len(lines) == 1 and lines[0].startswith("cloak: error: ") and f"'cloaklab[{extra}]'" in lines[0]
    assert not (out / "masks").exists()  # refused before any output is made


def test_missing_extra_message_names_the_extra_and_the_package():
    import pytest

    from cloaklab.ops.errors import MissingExtraError, ModelNotFoundError
    from cloaklab.ops.extras import require

    assert require(("json", "os"), "plot", "unused").dumps is json.dumps
    with pytest.raises(MissingExtraError) as caught:
        require(("json", "cloaklab_no_such_package.sub"), "sam", "cloak mask needs Segment Anything")
    assert isinstance(caught.value, ModelNotFoundError) and caught.value.exit_code == 1
    assert str(caught.value) == ("cloak mask needs Segment Anything: pip install 'cloaklab[sam]' "
                                 "(cloaklab_no_such_package is not installed)")
    with pytest.raises(MissingExtraError, match=r"^x: pip install 'cloaklab\[plot\]', or y \(nope is not"):
        require("nope", "plot", "x", "y")
