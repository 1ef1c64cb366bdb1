"""First run (issue 20): the working size follows the model, --threads' default, progress with an ETA, and a missing
model that says so in one line and leaves nothing behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from cloaklab.ops.device import default_threads, resolve_threads
from cloaklab.ops.models import native_resolution


# ------------------------------------------------------------------------------------------- resolution
def _diffusers_folder(root: Path, sample_size: int, vae_blocks: int) -> Path:
    (root / "unet").mkdir(parents=True)
    (root / "vae").mkdir()
    (root / "model_index.json").write_text("{}")
    (root / "unet" / "config.json").write_text(json.dumps({"sample_size": sample_size}))
    (root / "vae" / "config.json").write_text(json.dumps({"block_out_channels": [1] * vae_blocks}))
    return root


@pytest.mark.parametrize("name, size", [("tiny", 64), ("toy", 64), ("sd15-shaped", 512)])
def test_builtin_models_native_size(name, size):
    assert native_resolution(name) == size


@pytest.mark.parametrize("sample_size, blocks, size", [(64, 4, 512), (96, 4, 768), (128, 4, 1024), (16, 3, 64)])
def test_folder_native_size_is_unet_sample_size_times_vae_factor(tmp_path, sample_size, blocks, size):
    # SD 1.x: 64 latents × 8; SD 2.1-v: 96 × 8; SDXL: 128 × 8; the toy model: 16 latents × 4 (3 VAE blocks)
    assert native_resolution(str(_diffusers_folder(tmp_path / "m", sample_size, blocks))) == size


def test_pipeline_native_size_and_unknown_ids(monkeypatch):
    pipe = SimpleNamespace(unet=SimpleNamespace(config=SimpleNamespace(sample_size=96)), vae_scale_factor=8)
    assert native_resolution(pipe) == 768
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert native_resolution("nobody-xyz/not-a-model") == 512  # SD 1.x family when nothing is known


def test_poison_records_the_model_size(cli, photo_dir, tmp_path):
    out = tmp_path / "out"
    code, _, err = cli(["poison", photo_dir / "astronaut.png", "-o", out, "--model", "tiny", "-a", "adm+",
                        "--steps", "1", "--eval-draws", "0", "--threads", "1"])
    assert code == 0, err
    manifest = json.loads((out / "cloak.json").read_text())
    assert manifest["params"]["resolution"] == 64
    assert err.count("random weights") == 1  # tiny says once that it protects nothing
    assert "working size 64 px" in err and "threads 1" in err


# ---------------------------------------------------------------------------------------------- threads
def test_default_threads_from_affinity_and_cgroup(tmp_path):
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("150000 100000\n")  # 1.5 CPUs → 2 threads
    assert default_threads(str(v2), affinity={0, 1, 2, 3}) == 2
    (v2 / "cpu.max").write_text("max 100000\n")  # no quota: the affinity mask
    assert default_threads(str(v2), affinity={0, 1, 2, 3}) == 4
    (v2 / "cpu.max").write_text("800000 100000\n")  # quota above the affinity: the affinity wins
    assert default_threads(str(v2), affinity={0, 1, 2}) == 3
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("50000\n")  # half a CPU → at least 1
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert default_threads(str(v1), affinity={0, 1, 2, 3}) == 1
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert default_threads(str(v1), affinity={5, 7}) == 2
    assert default_threads(str(tmp_path / "none"), affinity={0, 1, 2, 3, 4}) == 5


def test_threads_env_and_bad_values(monkeypatch):
    from cloaklab.ops.errors import UsageError

    monkeypatch.setenv("CLOAK_THREADS", "3")
    assert resolve_threads(None) == 3 and resolve_threads(2) == 2
    monkeypatch.setenv("CLOAK_THREADS", "zero")
    with pytest.raises(UsageError):
        resolve_threads(None)


def _cloak(args, env=None, **kwargs):
    full = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **(env or {})}
    full.pop("CLOAK_THREADS", None) if "CLOAK_THREADS" not in (env or {}) else None
    return subprocess.run([sys.executable, "-m", "cloaklab.cli.main", *map(str, args)], capture_output=True,
                          text=True, env=full, timeout=600, **kwargs)


PROBE = ("import sys, torch; from cloaklab.cli import common; "
         "common.configure_run({arg}, False, False); print(torch.get_num_threads(), torch.get_num_interop_threads())")


@pytest.mark.parametrize("arg, env, expected", [("2", {}, "2 2"), ("None", {"CLOAK_THREADS": "3"}, "3 3")])
def test_threads_flag_and_env_reach_torch(arg, env, expected):
    full = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    if "CLOAK_THREADS" not in env:
        full.pop("CLOAK_THREADS", None)
    result = subprocess.run([sys.executable, "-c", PROBE.format(arg=arg)], capture_output=True, text=True, env=full,
                            timeout=300)
    assert result.stdout.split() == expected.split(), result.stderr


# --------------------------------------------------------------------------------------------- progress
def test_plain_progress_has_header_and_eta_and_quiet_silences_it(photo_dir, tmp_path):
    args = ["poison", photo_dir / "astronaut.png", photo_dir / "rocket.png", "--model", "tiny", "-a", "adm+",
            "--steps", "3", "--eval-draws", "0"]
    env = {"CLOAK_PROGRESS_SECONDS": "0", "CLOAK_THREADS": "1"}
    loud = _cloak([*args, "-o", tmp_path / "a"], env)
    assert loud.returncode == 0, loud.stderr
    lines = loud.stderr.splitlines()
    assert lines[0] == "poison: model tiny, device cpu, dtype float32, working size 64 px, threads 1"
    steps = [line for line in lines if " step " in line]
    assert any("step 3/3 (file 1/2)" in line and "ETA" in line for line in steps), lines
    assert any("step 2/3 (file 2/2)" in line and "s/step · ETA 0:" in line for line in steps), lines
    quiet = _cloak([*args, "-o", tmp_path / "b", "--quiet"], env)
    assert quiet.returncode == 0, quiet.stderr
    assert not [line for line in quiet.stderr.splitlines() if " step " in line or "threads" in line]
    assert "2 written" in quiet.stderr  # the summary still prints


# ----------------------------------------------------------------------------------------- missing model
@pytest.mark.parametrize("command", [["poison", "PHOTOS"], ["train-ti", "PHOTOS"], ["generate"]])
def test_missing_model_is_one_line_and_writes_nothing(command, photo_dir, tmp_path):
    out = tmp_path / "out"
    args = [photo_dir if part == "PHOTOS" else part for part in command]
    result = _cloak([*args, "-o", out], {"CLOAK_MODEL": "nobody-xyz/not-cached-model"}, cwd=tmp_path)
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("cloak: error: model 'nobody-xyz/not-cached-model' not found in the Hugging Face "
                               "cache (HF_HUB_OFFLINE is set)")
    assert not out.exists() and result.stdout == ""
