"""``--shard auto``: the shard of a Slurm / Grid Engine array task, read from the scheduler's variables."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from cloaklab.ops.errors import UsageError
from cloaklab.ops.io import parse_shard

IDENTITY = ["--method", "none"]  # a purifier that changes no pixel
SCHEDULER_PREFIXES = ("SLURM_", "SGE_", "PBS_", "LSB_")


def _slurm(task, first, last, step=1):
    """The variables sbatch --array=first-last:step sets in task ``task`` (count typed from the range by hand)."""
    count = len(range(first, last + 1, step))
    return {"SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_TASK_MIN": str(first), "SLURM_ARRAY_TASK_MAX": str(last),
            "SLURM_ARRAY_TASK_STEP": str(step), "SLURM_ARRAY_TASK_COUNT": str(count), "SLURM_JOB_ID": "77"}


@pytest.fixture
def clean_env(monkeypatch):
    import os

    for name in list(os.environ):
        if name.startswith(SCHEDULER_PREFIXES):
            monkeypatch.delenv(name)
    return monkeypatch


@pytest.mark.parametrize(("env", "expected"), [
    (_slurm(0, 0, 31), (1, 32)),          # sbatch --array=0-31, first task
    (_slurm(31, 0, 31), (32, 32)),        # … last task
    (_slurm(7, 0, 31), (8, 32)),
    (_slurm(1, 1, 4), (1, 4)),            # --array=1-4: ids 1..4 are shards 1..4
    (_slurm(4, 1, 4), (4, 4)),
    (_slurm(6, 0, 6, 2), (4, 4)),         # --array=0-6:2: ids 0,2,4,6
    (_slurm(2, 0, 6, 2), (2, 4)),
    ({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "5"}, (4, 5)),  # no MIN/STEP: 0-based, step 1
    ({"SGE_TASK_ID": "1", "SGE_TASK_FIRST": "1", "SGE_TASK_LAST": "10", "SGE_TASK_STEPSIZE": "1"}, (1, 10)),
    ({"SGE_TASK_ID": "10", "SGE_TASK_FIRST": "1", "SGE_TASK_LAST": "10", "SGE_TASK_STEPSIZE": "1"}, (10, 10)),
    ({"SGE_TASK_ID": "7", "SGE_TASK_FIRST": "1", "SGE_TASK_LAST": "9", "SGE_TASK_STEPSIZE": "3"}, (3, 3)),
    # Slurm wins when both are set (an SGE-compatible wrapper on a Slurm cluster)
    ({**_slurm(2, 0, 3), "SGE_TASK_ID": "1", "SGE_TASK_FIRST": "1", "SGE_TASK_LAST": "2"}, (3, 4)),
])
def test_auto_reads_the_array_position(env, expected):
    assert parse_shard("auto", env) == expected
    assert parse_shard("AUTO", env) == expected


@pytest.mark.parametrize(("env", "needle"), [
    ({}, "no array-job variables"),
    ({"SGE_TASK_ID": "undefined", "SLURM_JOB_ID": "5"}, "no array-job variables"),  # plain (non-array) jobs
    ({"PBS_ARRAY_INDEX": "3"}, "no array-job variables"),
    ({"SLURM_ARRAY_TASK_ID": "3"}, "SLURM_ARRAY_TASK_COUNT"),
    ({"SLURM_ARRAY_TASK_ID": "x", "SLURM_ARRAY_TASK_COUNT": "4"}, "not an integer"),
    # --array=1,3,7: count 3 but ids not evenly spaced from MIN to MAX
    ({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "7",
      "SLURM_ARRAY_TASK_COUNT": "3"}, "--shard I/N"),
    ({**_slurm(3, 0, 6, 2)}, "not on the evenly spaced array"),  # id between steps
    ({"SGE_TASK_ID": "4"}, "SGE_TASK_FIRST"),
])
def test_auto_without_a_usable_array_is_a_usage_error(env, needle):
    with pytest.raises(UsageError, match="--shard auto") as info:
        parse_shard("auto", env)
    assert needle in str(info.value)


def test_auto_shards_of_a_slurm_array_cover_the_folder_once(tmp_path, photo_dir, cli, clean_env):
    whole = tmp_path / "whole"
    code, stdout, stderr = cli(["purify", photo_dir, "-o", whole, "--json", *IDENTITY])
    assert code == 0, stderr
    expected = set(json.loads(stdout)["done"])
    assert len(expected) == 4

    out = tmp_path / "sharded"
    done = []
    for task in range(3):  # sbatch --array=0-2: 4 images over 3 tasks → 2, 1, 1
        for name, value in _slurm(task, 0, 2).items():
            clean_env.setenv(name, value)
        code, stdout, stderr = cli(["purify", photo_dir, "-o", out, "--shard", "auto", "--json", *IDENTITY])
        assert code == 0, stderr
        done.append(set(json.loads(stdout)["done"]))
    assert [len(part) for part in done] == [2, 1, 1]
    assert not (done[0] & done[1]) and not (done[0] & done[2]) and not (done[1] & done[2])
    assert done[0] | done[1] | done[2] == expected
    for name in expected:
        assert (out / name).read_bytes() == (whole / name).read_bytes()
    manifest = json.loads((out / "cloak.json").read_text())
    assert set(manifest["files"]) == expected
    assert json.dumps(manifest).count('"3/3"') >= 1  # the resolved shard is recorded, not the word "auto"


def test_auto_outside_an_array_job_exits_2_with_one_line(tmp_path, photo_dir, cli, clean_env):
    code, stdout, stderr = cli(["purify", photo_dir, "-o", tmp_path / "out", "--shard", "auto", *IDENTITY])
    assert code == 2 and stdout == ""
    assert "--shard auto" in stderr and "SLURM_ARRAY_TASK_ID" in stderr
    assert not (tmp_path / "out").exists()


def test_generate_auto_shards_split_the_prompt_by_image_plan(tmp_path, cli, clean_env):
    """generate shards its prompt × image plan (not a folder): two array tasks make the unsharded run's images."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a {token} on the beach\na {token} in the snow\n")
    fast = ["--prompts", prompts, "-n", "2", "--token", "R*", "--seed", "3", "--model", "tiny", "--steps", "1",
            "--device", "cpu", "--dtype", "fp32", "--json"]
    code, stdout, stderr = cli(["generate", "-o", tmp_path / "whole", *fast])
    assert code == 0, stderr
    expected = set(json.loads(stdout)["done"])
    assert expected == {"p00_i000.png", "p00_i001.png", "p01_i000.png", "p01_i001.png"}
    done = []
    for task in (1, 2):  # sbatch --array=1-2
        for name, value in _slurm(task, 1, 2).items():
            clean_env.setenv(name, value)
        code, stdout, stderr = cli(["generate", "-o", tmp_path / "sharded", "--shard", "auto", *fast])
        assert code == 0, stderr
        done.append(set(json.loads(stdout)["done"]))
    # round-robin over the plan's order p00_i000, p00_i001, p01_i000, p01_i001
    assert done == [{"p00_i000.png", "p01_i000.png"}, {"p00_i001.png", "p01_i001.png"}]
    for name in expected:  # the same image whatever the batch it was drawn in (float noise: ±1 level, as
        # tests/test_generate.py allows)
        whole = np.asarray(Image.open(tmp_path / "whole" / name)).astype(np.int16)
        sharded = np.asarray(Image.open(tmp_path / "sharded" / name)).astype(np.int16)
        assert np.abs(whole - sharded).max() <= 1
