"""The Snakemake workflow (workflow/Snakefile, config/): the toy grid end to end, the SD 1.5 grid's job count from a
dry run, and the same cloak command lines as the Makefiles (examples/grid.mk)."""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("snakemake", reason="snakemake is not installed (pip install 'cloaklab[grid]')")
import yaml  # noqa: E402  (a dependency of snakemake)

ROOT = Path(__file__).resolve().parents[1]
SNAKEFILE = ROOT / "workflow" / "Snakefile"
CONFIGS = ROOT / "config"


def _env():
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # `cloak` of this interpreter
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


def snakemake(workdir: Path, *args: str, timeout: float = 900) -> str:
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "-d", str(workdir), *args],
                          capture_output=True, text=True, env=_env(), timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout + proc.stderr


def job_stats(output: str) -> dict[str, int]:
    """The 'Job stats' table of a (dry) run: rule → count (first table only)."""
    block = output.split("Job stats:", 1)[1]
    counts = {}
    for line in block.splitlines()[3:]:
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            break
        counts[parts[0]] = int(parts[1])
    return counts


def test_every_config_names_the_same_keys():
    """Snakemake merges --configfile over config/config.yaml: a key missing from a config would leak the toy's."""
    base = yaml.safe_load((CONFIGS / "config.yaml").read_text())
    for path in CONFIGS.glob("*.yaml"):
        config = yaml.safe_load(path.read_text())
        assert set(config) == set(base), path.name
        for key, value in base.items():
            if isinstance(value, dict) and key != "purify_defences":
                assert set(config[key]) == set(value), f"{path.name}: {key}"


def test_dry_run_of_the_sd15_grid_lists_every_job(tmp_path):
    config = yaml.safe_load((CONFIGS / "sd15-table1.yaml").read_text())
    data = tmp_path / "NovelConcepts10"
    concepts = [f"concept{i:02d}" for i in range(10)]
    for name in concepts:
        (data / name).mkdir(parents=True)
    out = snakemake(tmp_path, "-n", "--configfile", str(CONFIGS / "sd15-table1.yaml"), "--config", f"data={data}")
    # Expected counts from the config alone: one poison run per (real poison, concept), SAM masks per (poison,
    # concept) because masked defences exist, one TI run and one generation per cell, a score per (poison,
    # defence), one table, and the `all` target.
    n_c, n_p, n_d = len(concepts), len(config["poisons"]), len(config["defences"])
    assert (n_c, n_p, n_d) == (10, 5, 7)
    masked = [d for d in config["defences"] if d in config["masked_defences"]]
    expected = {"poison": (n_p - 1) * n_c, "mask": n_p * n_c if masked else 0, "train_ti": n_p * n_d * n_c,
                "generate": n_p * n_d * n_c, "score": n_p * n_d, "table": 1, "report": 1 if config["report"] else 0,
                "all": 1}
    expected = {rule: count for rule, count in expected.items() if count}
    stats = job_stats(out)
    total = stats.pop("total")
    assert stats == expected
    assert total == sum(expected.values()) == 40 + 50 + 350 + 350 + 35 + 1 + 1 + 1
    # every model-running job asks for one GPU (`--resources gpu=N` / sbatch --gpus); the table does not
    blocks = re.split(r"\n(?:local)?rule (\w+):\n", out)
    gpus = {}
    for rule, body in zip(blocks[1::2], blocks[2::2]):
        resources = re.search(r"resources: (.*)", body).group(1)
        gpus.setdefault(rule, set()).add(re.search(r"\bgpu=(\d+)", resources).group(1)
                                         if "gpu=" in resources else None)
    assert {rule: gpus[rule] for rule in ("poison", "mask", "train_ti", "generate", "score")} == \
        {rule: {"1"} for rule in ("poison", "mask", "train_ti", "generate", "score")}
    assert gpus["table"] == gpus["report"] == {None}


def _cloak_lines(lines):
    """cloak command lines keyed by their output folder/file, options order-free (tokens sorted)."""
    found = {}
    for line in lines:
        line = line.strip()
        if line.startswith("cloak "):
            tokens = shlex.split(line)
            target = tokens[tokens.index("-o") + 1]
            assert target not in found, target
            found[target] = sorted(tokens)
    return found


@pytest.mark.skipif(shutil.which("make") is None, reason="GNU make is not installed")
def test_the_toy_workflow_runs_the_makefiles_commands(tmp_path):
    """Dry runs of both: the same cloak command lines (same folders, same flags) for a small toy grid."""
    work = tmp_path / "work"
    proc = subprocess.run(["make", "-n", "-C", str(ROOT / "examples" / "toy"), f"WORK={work}",
                           "CONCEPTS=heart moon", "POISONS=none ea", "DEFENCES=nominal szt"],
                          capture_output=True, text=True, env=_env(), check=True)
    made = _cloak_lines(proc.stdout.splitlines())
    out = snakemake(tmp_path, "-n", "-p", "--config", f"work={work}", "concepts=[heart,moon]",
                    "poisons=[none,ea]", "defences=[nominal,szt]")
    snaked = _cloak_lines(line.split("Shell command:", 1)[1] for line in out.splitlines()
                          if line.startswith("Shell command:"))
    assert len(made) == 2 + 8 + 8 + 4 + 1 + 1  # poison ea × 2 concepts, TI, generate, score, table, report
    assert snaked == made


def _small_config(tmp_path: Path) -> Path:
    config = yaml.safe_load((CONFIGS / "toy-small.yaml").read_text())
    config["work"] = str(tmp_path / "work")
    config["poison"]["steps"] = 3
    config["ti"]["steps"] = 4
    config["generate"].update(per_prompt=1, steps=3)
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_reduced_toy_grid_runs_to_the_table(tmp_path):
    config_path = _small_config(tmp_path)
    config = yaml.safe_load(config_path.read_text())
    snakemake(tmp_path, "--cores", "2", "--configfile", str(config_path))
    work = Path(config["work"])
    (poison,), (concept,) = config["poisons"], config["concepts"]
    with open(work / "table1.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0][1:] == config["defences"]
    assert [row[0] for row in rows[1:]] == [poison, "Psn Avg"]
    values = [float(v) for v in rows[1][1:]]
    assert all(0.0 <= v <= 1.0 for v in values)
    # the table's cells are the score files' toy-sim: the mean over the concept's generated images
    for defence, value in zip(config["defences"], values):
        score = json.loads((work / "scores" / f"{poison}__{defence}.json").read_text())
        assert score["labels"] == {"poison": poison, "defense": defence}
        per_image = [image["metrics"]["toy-sim"] for image in score["images"]]
        assert len(per_image) == 3 and value == pytest.approx(sum(per_image) / 3, abs=1e-6)
    # the Makefiles' folders, and the purify defence really trained on `cloak purify`'s output
    assert sorted(p.name for p in (work / "poisoned" / poison / concept).glob("*.png"))
    assert (work / "masks" / poison / concept / ".done").exists()
    purified = json.loads((work / "purified" / poison / "gauss" / concept / "cloak.json").read_text())
    assert purified["command"] == "purify" and "gaussian" in json.dumps(purified["params"])
    ti = json.loads((work / "ti" / poison / "gauss" / concept / "cloak.json").read_text())
    assert str(work / "purified" / poison / "gauss" / concept) in json.dumps(ti)
    for defence in config["defences"]:
        assert len(list((work / "gen" / poison / defence / concept).glob("*.png"))) == 3  # 3 prompts × 1
    assert (work / "report" / "index.html").stat().st_size > 0
    # finished work is skipped: a second run has nothing to do
    again = snakemake(tmp_path, "-n", "--configfile", str(config_path))
    assert "Nothing to be done" in again

