"""Data-parallel training (ops/train/distributed.py, issue 22 item 4): two CPU processes under torchrun (gloo) train
train-ti, train-db and immunize to the one-process result at the same batch size, and only rank 0 writes.

The equality is not trivially true: a rank that skipped the gradient sum would train on its half of the batch
alone and end far from the one-process run (:func:`test_a_rank_alone_trains_on_its_half_only`), and each rank's
share of the loss is checked to add up to the batch's (:func:`test_shares_of_a_split_batch_add_up_to_the_batch`).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cloaklab.tests.conftest import photo, photo_tensor

WORKER = Path(__file__).with_name("data_parallel_worker.py")
ATOL = 1e-5


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _concept(root: Path) -> tuple[Path, Path]:
    images, masks = root / "images", root / "masks"
    images.mkdir(parents=True)
    masks.mkdir()
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 20:52] = 255
    for name in ("astronaut", "coffee"):
        photo(name, 64).save(images / f"{name}.png")
        Image.fromarray(mask).save(masks / f"{name}.png")
    return images, masks


def _commands(images: Path, masks: Path, out: Path) -> list[list[str]]:
    """Batch 2, a few steps, learning rates large enough that the weights move far beyond the tolerance; train-ti
    with masks (the inside/outside losses are summed across processes), flips, gradient accumulation and the
    grad-by-t log (the norm of the summed gradient); train-db full fine-tuning with the text encoder and prior
    preservation (the class batch is split too); immunize against DreamBooth (inner and outer steps)."""
    common = ["--model", "tiny", "--device", "cpu", "--threads", "1", "--batch-size", "2", "--seed", "3"]
    return [
        ["train-ti", str(images), "-o", str(out / "ti"), *common, "--steps", "3", "--lr", "0.05", "--masks",
         str(masks), "--grad-accumulation", "2", "--log-grad-by-t", "--checkpoint-every", "2",
         "--snapshot-every", "0"],
        ["train-db", str(images), "-o", str(out / "db"), *common, "--steps", "2", "--lr", "1e-4",
         "--num-class-images", "2", "--class-steps", "2", "--train-text-encoder", "--save-trained-only",
         "--checkpoint-every", "0", "--save-every", "0"],
        ["immunize", str(images), "-o", str(out / "imm"), *common, "--against", "db", "--steps", "2", "--lr", "1e-4",
         "--defence-lr", "1e-4", "--check-steps", "0", "--checkpoint-every", "0"],
    ]


def _log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _assert_logs_equal(one: list[dict], two: list[dict]) -> None:
    assert [r["step"] for r in one] == [r["step"] for r in two]
    for a, b in zip(one, two):
        assert a["t"] == b["t"] and a.get("flip") == b.get("flip") and a.get("phase") == b.get("phase")
        for key in ("loss", "loss_inside", "loss_outside", "grad_norm"):
            assert (key in a) == (key in b)
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=ATOL, abs=ATOL), (key, a, b)


def _assert_weights_equal(one: dict[str, torch.Tensor], two: dict[str, torch.Tensor], base: dict[str, torch.Tensor],
                          moved: float) -> None:
    assert one.keys() == two.keys()
    for name, value in one.items():
        torch.testing.assert_close(two[name], value, rtol=0, atol=ATOL)
    # the runs trained: the weights left the base model by far more than the tolerance
    assert max(float((one[name] - base[name]).abs().max()) for name in one if name in base) > moved


@pytest.mark.slow
def test_two_processes_train_like_one(cli, tmp_path):
    images, masks = _concept(tmp_path)
    spec = tmp_path / "two" / "commands.json"
    spec.parent.mkdir()
    spec.write_text(json.dumps(_commands(images, masks, tmp_path / "two")))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    launch = subprocess.Popen(  # runs while the one-process references train here
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
         "--master-port", str(_free_port()), str(WORKER), str(spec)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        for args in _commands(images, masks, tmp_path / "one"):
            code, _, stderr = cli(args)
            assert code == 0, stderr
        stdout, stderr = launch.communicate(timeout=240)
    finally:
        if launch.poll() is None:  # the launcher and both workers: the session started for them
            os.killpg(launch.pid, signal.SIGKILL)
    assert launch.returncode == 0, stderr[-3000:]
    for rank in (0, 1):
        assert json.loads((spec.parent / f"codes-{rank}.json").read_text()) == [0, 0, 0], stderr[-3000:]
    # rank 0 alone speaks on stdout: each output path once
    assert stdout.split() == [str(tmp_path / "two" / name) for name in ("ti", "db", "imm")]

    one, two = tmp_path / "one", tmp_path / "two"
    for name in ("ti", "db", "imm"):
        _assert_logs_equal(_log(one / name / "train_log.jsonl"), _log(two / name / "train_log.jsonl"))
    assert len(_log(two / "ti" / "train_log.jsonl")[0]["t"]) == 4  # 2 micro-batches of 2, all drawn on each rank
    grad_by_t = [json.loads((root / "ti" / "grad_by_t.json").read_text()) for root in (one, two)]
    assert grad_by_t[0]["count"] == grad_by_t[1]["count"]
    np.testing.assert_allclose(*[[v or 0.0 for v in g["mean_grad_norm"]] for g in grad_by_t], rtol=ATOL)

    from cloaklab.ops.models import load_pipeline

    base = load_pipeline("tiny")
    object_id = base.tokenizer.encode("object", add_special_tokens=False)[0]  # the token's initial row
    object_row = base.text_encoder.get_input_embeddings().weight[object_id]
    _assert_weights_equal(_tensors(one / "ti" / "learned_embeds.safetensors"),
                          _tensors(two / "ti" / "learned_embeds.safetensors"),
                          {"<R*>": object_row.detach()[None]}, 0.05)
    unet = {k: v.detach() for k, v in base.unet.state_dict().items()}
    _assert_weights_equal(_tensors(one / "db" / "unet" / "diffusion_pytorch_model.safetensors"),
                          _tensors(two / "db" / "unet" / "diffusion_pytorch_model.safetensors"), unet, 1e-4)
    _assert_weights_equal(_tensors(one / "db" / "text_encoder" / "model.safetensors"),
                          _tensors(two / "db" / "text_encoder" / "model.safetensors"),
                          {k: v.detach() for k, v in base.text_encoder.state_dict().items()
                           if "token_embedding" not in k}, 1e-4)
    _assert_weights_equal(_tensors(one / "imm" / "immunized_attention.safetensors"),
                          _tensors(two / "imm" / "immunized_attention.safetensors"), unet, 1e-4)

    # only rank 0 wrote: one run per manifest, its record log merged, the same files as the one-process run
    for name in ("ti", "db", "imm"):
        manifest = json.loads((two / name / "cloak.json").read_text())
        assert len(manifest["runs"]) == 1
        assert not (two / name / "cloak.json.d").exists()  # the record logs were merged and removed
        listing = {p.relative_to(two / name).as_posix() for p in (two / name).rglob("*")}
        assert listing == {p.relative_to(one / name).as_posix() for p in (one / name).rglob("*")}


def _ti_run(tmp_path: Path, name: str, steps: int = 3):
    from cloaklab.ops.models import load_pipeline
    from cloaklab.ops.train.data import InstanceData
    from cloaklab.ops.train.loop import TrainConfig, train
    from cloaklab.ops.train.textual_inversion import TextualInversion

    pipe = load_pipeline("tiny")
    ti = TextualInversion(pipe, "<R*>", "object")
    data = InstanceData(torch.stack([photo_tensor("astronaut"), photo_tensor("coffee")]), None,
                        ["astronaut.png", "coffee.png"])
    result = train(pipe, ti, data, ["a photo of a <R*>"], TrainConfig(steps=steps, batch_size=2, lr=0.05, seed=3,
                                                                     checkpoint_every=0, snapshot_every=0),
                   tmp_path / name)
    return ti.parameters()[0].detach().clone(), [record["loss"] for record in result.log]


def test_a_rank_alone_trains_on_its_half_only(tmp_path, monkeypatch):
    """Rank 0 of 2 with the sums left out (what a loop that forgot the all-reduce would do): it trains on its half
    of each batch, so its embedding and logged loss are far from the one-process run the real 2-process run
    matches — the equality above needs the gradient (and loss) sums."""
    from cloaklab.ops.train import distributed

    whole, whole_loss = _ti_run(tmp_path, "one")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(distributed, "all_reduce_sum", lambda tensor: tensor)
    monkeypatch.setattr(distributed, "barrier", lambda: None)
    half, half_loss = _ti_run(tmp_path, "half")
    assert float((half - whole).abs().max()) > 1000 * ATOL
    assert all(abs(a - b) > 1000 * ATOL for a, b in zip(half_loss, whole_loss))


def test_shares_of_a_split_batch_add_up_to_the_batch(fresh_tiny_pipe, monkeypatch):
    """Each rank's share (Σ its rows ÷ batch) of the loss, the masked-region sums and the gradient add up to the
    one-process values; DreamBooth's class term and immunize's adaptation loss likewise."""
    from cloaklab.ops.train import immunize, loop
    from cloaklab.ops.train.data import InstanceData
    from cloaklab.ops.train.dreambooth_model import DreamBoothModel, DreamBoothSettings
    from cloaklab.ops.train.textual_inversion import TextualInversion

    pipe = fresh_tiny_pipe
    images = torch.stack([photo_tensor("astronaut"), photo_tensor("coffee")])
    masks = torch.zeros(2, 1, 64, 64)
    masks[:, :, 8:40, 16:56] = 1
    masks[1, :, :, :30] = 0  # the two samples cover different areas
    data = InstanceData(images, masks, ["a.png", "b.png"])
    config = loop.TrainConfig(batch_size=2, mask_mode="lm")
    ti = TextualInversion(pipe, "<R*>", "object")
    cache = loop.encode_training_data(pipe.vae, data, config, pipe.unet.device)
    state = loop.RunState.fresh(config, 2)
    batch = loop.draw_batch(cache, state, ["a photo of a <R*>", "a <R*>"], config, 1000, pipe.unet.device)
    scheduler = loop.training_scheduler(pipe)

    def backward(part):
        ti.parameters()[0].grad = None
        readback = loop.micro_batch_backward(pipe.unet, scheduler, ti, batch, config, state.generator, part)
        return readback, ti.parameters()[0].grad.clone()

    full_readback, full_grad = backward(None)
    shares = [backward(slice(0, 1)), backward(slice(1, 2))]
    torch.testing.assert_close(shares[0][0] + shares[1][0], full_readback, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(shares[0][1] + shares[1][1], full_grad, rtol=1e-5, atol=1e-8)
    assert float((shares[0][1] - shares[1][1]).abs().max()) > 100 * float(full_grad.abs().max()) * 1e-5

    db = DreamBoothModel(pipe, DreamBoothSettings(prior_weight=0.5), batch_size=2,
                         class_latents=loop.latent_cache(pipe.vae, images, pipe.vae.device, chunk=8))
    full = float(db.extra_loss(torch.Generator().manual_seed(4)).detach())
    parts = [float(db.extra_loss(torch.Generator().manual_seed(4), rows).detach())
             for rows in (slice(0, 1), slice(1, 2))]
    assert parts[0] + parts[1] == pytest.approx(full, rel=1e-5)
    assert parts[0] != pytest.approx(parts[1], rel=1e-3)

    cache = loop.LatentCache(*loop.latent_cache(pipe.vae, images, pipe.unet.device), None)

    def adaptation(part):
        draw = loop.TrainConfig(batch_size=2, seed=5)
        return immunize._adaptation_loss(pipe, scheduler, ti, ["a photo of a <R*>"], cache,
                                         loop.RunState.fresh(draw, 2), draw, part)

    full_loss, full_t = adaptation(None)
    (first, first_t), (second, second_t) = adaptation(slice(0, 1)), adaptation(slice(1, 2))
    assert full_t == first_t == second_t and len(full_t) == 2
    assert float((first + second).detach()) == pytest.approx(float(full_loss.detach()), rel=1e-5)


def test_a_batch_the_processes_cannot_share_is_refused(cli, tmp_path, monkeypatch):
    from cloaklab.ops.errors import UsageError
    from cloaklab.ops.train import distributed
    from cloaklab.ops.train.immunize import ImmunizeConfig
    from cloaklab.ops.train.loop import TrainConfig

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert distributed.slice_batch(6) == slice(3, 6)
    TrainConfig(batch_size=4).check()
    TrainConfig(batch_size=3).check(data_parallel=False)  # a side computation one process makes alone
    for config in (TrainConfig(batch_size=3), ImmunizeConfig(batch_size=1).resolved()):
        with pytest.raises(UsageError, match="--batch-size .* is not divisible by the 2 processes"):
            config.check()
    images, _ = _concept(tmp_path)
    code, _, stderr = cli(["train-db", images, "-o", tmp_path / "db", "--model", "tiny", "--batch-size", "3"])
    assert code == 2 and "not divisible by the 2 processes" in stderr
    assert not (tmp_path / "db").exists()  # refused before any work


def test_python_m_cloaklab_is_cloak_and_refuses_commands_that_do_not_train(tmp_path):
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0"}
    done = subprocess.run([sys.executable, "-m", "cloaklab", "purify", str(tmp_path), "-o", str(tmp_path / "out")],
                          check=False, capture_output=True, text=True, env=env)
    assert done.returncode == 2 and "purify does not train data-parallel" in done.stderr
    assert not (tmp_path / "out").exists()
    env.pop("WORLD_SIZE")
    done = subprocess.run([sys.executable, "-m", "cloaklab", "--version"], check=False, capture_output=True, text=True,
                          env=env)
    assert done.returncode == 0 and done.stdout.startswith("cloak ")


def test_default_threads_are_shared_by_the_launchers_processes_on_a_machine(tmp_path, monkeypatch):
    """Each of torchrun's processes would otherwise take every allowed CPU (4 processes × 8 threads on 8 CPUs)."""
    from cloaklab.ops.device import default_threads

    for name in ("WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    cpus = set(range(8))
    assert default_threads(str(tmp_path), affinity=cpus) == 8
    monkeypatch.setenv("WORLD_SIZE", "8")  # two machines of 4 processes
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert default_threads(str(tmp_path), affinity=cpus) == 2
    assert default_threads(str(tmp_path), affinity={0, 1}) == 1  # never below one
