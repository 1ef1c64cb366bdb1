"""Slurm for real: a one-node cluster on localhost (tests/slurm/start.sh), `--shard auto` under `sbatch --array`,
and the reduced toy workflow through Snakemake's Slurm executor with the workflow's Slurm profile — the same table
as the local run.

Needs root and Debian's munge, slurmctld, slurmd and slurm-client (`.ci/run` installs them); skipped otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo")
missing = [tool for tool in TOOLS if shutil.which(tool) is None]
pytestmark = [
    pytest.mark.skipif(bool(missing), reason=f"Slurm/munge not installed ({', '.join(missing)} missing): "
                       "apt-get install munge slurmctld slurmd slurm-client"),
    pytest.mark.skipif(os.geteuid() != 0, reason="a local Slurm cluster needs root (slurmd runs jobs as their owner)"),
    pytest.mark.slow,
    pytest.mark.cluster,  # its own CI step (`python -m pytest -m cluster`), outside the 10-minute default suite
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env(extra=None):
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.update(extra or {})
    return env


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    folder = tmp_path_factory.mktemp("slurm")
    env = _env({"CLOAK_SLURMCTLD_PORT": str(_free_port()), "CLOAK_SLURMD_PORT": str(_free_port())})
    proc = subprocess.run(["bash", str(ROOT / "tests" / "slurm" / "start.sh"), str(folder)], capture_output=True,
                          text=True, env=env, timeout=180)
    if proc.returncode != 0:
        subprocess.run(["bash", str(ROOT / "tests" / "slurm" / "stop.sh"), str(folder)])
        pytest.fail(f"tests/slurm/start.sh could not start Slurm:\n{proc.stdout}\n{proc.stderr}")
    env["SLURM_CONF"] = str(folder / "slurm.conf")
    yield env
    subprocess.run(["bash", str(ROOT / "tests" / "slurm" / "stop.sh"), str(folder)], timeout=120)


def _jobs(env) -> list[tuple[str, str, str]]:
    """(partition, name, comment) of every job the controller remembers (MinJobAge keeps finished ones)."""
    out = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%P|%j|%k"], capture_output=True, text=True, env=env,
                         check=True).stdout
    return [tuple(line.split("|", 2)) for line in out.splitlines() if line.strip()]


def test_shard_auto_splits_a_folder_over_an_sbatch_array(cluster, tmp_path, photo_dir):
    whole, out = tmp_path / "whole", tmp_path / "sharded"
    command = f"cloak purify {photo_dir} -o {{out}} --method none --json"
    subprocess.run(command.format(out=whole), shell=True, env=cluster, check=True, capture_output=True)
    proc = subprocess.run(["sbatch", "--wait", "--array=0-2", "--mem=500", "-o", str(tmp_path / "task-%a.out"),
                           "--wrap", command.format(out=out) + " --shard auto"],
                          capture_output=True, text=True, env=cluster, timeout=600)
    logs = "\n".join(p.read_text() for p in sorted(tmp_path.glob("task-*.out")))
    assert proc.returncode == 0, proc.stderr + logs
    done = [set(json.loads((tmp_path / f"task-{i}.out").read_text().strip().splitlines()[-1])["done"])
            for i in range(3)]
    assert [len(d) for d in done] == [2, 1, 1]  # 4 photos, round-robin over 3 tasks
    assert set().union(*done) == {p.name for p in whole.glob("*.png")}
    for path in whole.glob("*.png"):
        assert (out / path.name).read_bytes() == path.read_bytes()
    assert {"1/3", "2/3", "3/3"} <= set(json.dumps(json.loads((out / "cloak.json").read_text())).split('"'))


def _profile(tmp_path: Path) -> Path:
    """workflow/profiles/slurm with memory and CPUs scaled to this one small node (partitions, times unchanged)."""
    import yaml

    profile = yaml.safe_load((ROOT / "workflow" / "profiles" / "slurm" / "config.v8+.yaml").read_text())
    for resources in [profile["default-resources"], *profile["set-resources"].values()]:
        resources.update(mem_mb=600, cpus_per_task=1)
    profile["latency-wait"] = 5
    profile["retries"] = 0
    # no accounting database here: sacct fails, and the plugin would wait on it forever; squeue sees finished jobs
    # for MinJobAge (3600 s in start.sh's slurm.conf)
    profile["slurm-status-command"] = "squeue"
    profile["slurm-init-seconds-before-status-checks"] = 5
    folder = tmp_path / "profile"
    folder.mkdir()
    (folder / "config.v8+.yaml").write_text(yaml.safe_dump(profile))
    return folder


@pytest.mark.timeout(2400)
def test_the_reduced_toy_workflow_through_the_slurm_executor_gives_the_local_table(cluster, tmp_path):
    pytest.importorskip("snakemake", reason="snakemake is not installed (pip install 'cloaklab[grid]')")
    pytest.importorskip("snakemake_executor_plugin_slurm", reason="snakemake-executor-plugin-slurm not installed")
    import yaml

    tables = {}
    for mode in ("local", "slurm"):
        config = yaml.safe_load((ROOT / "config" / "toy-small.yaml").read_text())
        config["work"] = str(tmp_path / mode / "work")
        config["poison"]["steps"] = 3
        config["ti"]["steps"] = 4
        config["generate"].update(per_prompt=1, steps=3)
        config_path = tmp_path / f"{mode}.yaml"
        config_path.write_text(yaml.safe_dump(config))
        args = ["--cores", "2"] if mode == "local" else ["--profile", str(_profile(tmp_path))]
        proc = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(ROOT / "workflow" / "Snakefile"),
                               "-d", str(tmp_path / mode), "--configfile", str(config_path), *args],
                              capture_output=True, text=True, env=cluster, timeout=2000)
        assert proc.returncode == 0, f"{mode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        tables[mode] = (Path(config["work"]) / "table1.csv").read_text()
        if mode == "slurm":
            assert "sbatch" in proc.stderr + proc.stdout or _jobs(cluster)
    assert tables["slurm"] == tables["local"]
    assert tables["local"].splitlines()[0] == "poison\\defense,szt,gauss"

    # every model step ran as a Slurm job in the profile's partition; the cheap local rules did not
    jobs = _jobs(cluster)
    by_rule = {}
    for partition, _, comment in jobs:
        rule = comment.split("_wildcards_")[0].removeprefix("rule_")
        by_rule.setdefault(rule, set()).add(partition)
    assert by_rule.get("train_ti") == {"gpu"} and by_rule.get("generate") == {"gpu"}
    assert by_rule.get("poison") == {"gpu"} and by_rule.get("purify") == {"gpu"}
    assert by_rule.get("mask") == {"gpu"} and by_rule.get("score") == {"gpu"}
    assert "table" not in by_rule and "toy_concepts" not in by_rule
    assert sum(comment.startswith("rule_train_ti_") for _, _, comment in jobs) == 2  # szt and gauss
