"""``cloak immunize`` (IMMA, paper 003) on the tiny model: what changes, that it works, resume, save/load, stages.

The defence lr in these tests (1e-3) is far above IMMA's 1e-6/2e-5: the tiny model is random and the runs are a few
steps long, so the published rate would move nothing measurable.
"""

from __future__ import annotations

import json
from pathlib import PurePosixPath

import pytest
import torch

from cloaklab.ops.train import immunize as im
from cloaklab.ops.train.data import InstanceData, load_instance_images
from cloaklab.tests.conftest import photo, photo_tensor

DEFENCE_LR = 1e-3


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-exact on the CPU; GPU kernels (atomic adds in backward) may differ in the last bits between runs."""
    a, b = a.float().cpu(), b.float().cpu()
    return torch.allclose(a, b, rtol=1e-5, atol=1e-6) if torch.cuda.is_initialized() else torch.equal(a, b)


def _cpu_pipe():
    """The tiny pipeline on the CPU, where the in-process CLI runs (``--device cpu``) in these tests."""
    from cloaklab.ops.models import load_pipeline

    return load_pipeline("tiny", "cpu")


def _concept(*names: str) -> InstanceData:
    return InstanceData(torch.stack([photo_tensor(name) for name in names]), None, [f"{n}.png" for n in names])


def _config(against: str, steps: int, **kw) -> im.ImmunizeConfig:
    return im.ImmunizeConfig(against=against, steps=steps, defence_lr=DEFENCE_LR, checkpoint_every=0, **kw)


def _token(against: str) -> str:
    return "<R*>" if against == "ti" else "sks"


def test_defended_parameters_are_the_attention_projections(tiny_pipe):
    names = list(im.attention_parameters(tiny_pipe.unet))
    assert names and all(any(k in name.split(".") for k in im.ATTENTION_KEYS) for name in names)
    assert {"attn1", "attn2"} <= {part for name in names for part in name.split(".")}
    assert not any("norm" in name or "conv" in name or "lora" in name for name in names)
    cross = im.attention_parameters(tiny_pipe.unet, cross_attention_only=True)
    assert cross and set(cross) < set(names) and all(".attn2." in name for name in cross)
    assert im.ImmunizeConfig(against="ti").resolved().defence_lr == 1e-6  # paper 003 defaults
    assert im.ImmunizeConfig(against="db").resolved().defence_lr == 2e-5


@pytest.mark.parametrize("against", ["ti", "db"])
def test_only_attention_weights_change(tiny_pipe, tmp_path, against):
    """Even against DreamBooth, whose inner step trains the whole UNet, the result differs from the base model in
    the attention tensors only, and the pipeline passed in is left untouched."""
    before = {k: v.clone() for k, v in tiny_pipe.unet.state_dict().items()}
    vocabulary = len(tiny_pipe.tokenizer)
    result = im.immunize(tiny_pipe, _concept("astronaut", "chelsea"), _config(against, 4), tmp_path,
                         token=_token(against))
    assert set(result.state) == set(im.attention_parameters(tiny_pipe.unet))
    assert all(not torch.equal(before[name].cpu(), value) for name, value in result.state.items())
    assert all(torch.equal(before[k], v) for k, v in tiny_pipe.unet.state_dict().items())
    assert len(tiny_pipe.tokenizer) == vocabulary  # the attacker's token went to the working copy only
    immunized = im.working_copy(tiny_pipe)
    im.apply_attention_state(immunized.unet, result.state)
    changed = {k for k, v in immunized.unet.state_dict().items() if not torch.equal(before[k], v)}
    assert changed == set(result.state)
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in log] == ["inner", "outer", "inner", "outer"]


def _adapted_loss(pipe, state, against: str, data: InstanceData, folder) -> float:
    lr = 5e-3 if against == "ti" else 1e-4
    return im.adapted_loss(pipe, state, data, against, folder, steps=8, lr=lr, token=_token(against))


@pytest.mark.parametrize("against", ["ti", "lora"])
def test_immunized_model_learns_the_concept_worse(tiny_pipe, tmp_path, against):
    """Same adaptation (seed, steps, lr) on the base and on the immunized model: the adaptation loss on the target
    concept ends higher on the immunized one (it would end lower if the outer step descended instead)."""
    data = _concept("astronaut", "chelsea")
    result = im.immunize(tiny_pipe, data, _config(against, 16), tmp_path / "imma", token=_token(against))
    plain = _adapted_loss(tiny_pipe, None, against, data, tmp_path / "plain")
    defended = _adapted_loss(tiny_pipe, result.state, against, data, tmp_path / "defended")
    assert defended > plain + 0.03, (plain, defended)


def test_resume_is_bit_exact(tiny_pipe, tmp_path):
    data = _concept("astronaut", "chelsea")
    config = _config("ti", 6)
    whole = im.immunize(tiny_pipe, data, config, tmp_path / "whole")
    first = im.immunize(tiny_pipe, data, config, tmp_path / "split", stop_after=3)
    assert first.steps_done == 3
    rest = im.immunize(tiny_pipe, data, config, tmp_path / "split", resume=True)
    assert rest.resumed_from == 3 and rest.steps_done == 6
    assert all(_same(whole.state[name], rest.state[name]) for name in whole.state)
    assert len((tmp_path / "split" / "train_log.jsonl").read_text().splitlines()) == 6


def test_cli_multi_concept_saves_loadable_pipeline_and_skips_rerun(cli, tmp_path):
    from cloaklab.ops.io import InputItem
    from cloaklab.ops.models import load_pipeline

    base_pipe = _cpu_pipe()

    concepts = []
    for folder, names in (("castle", ("astronaut", "rocket")), ("chair", ("chelsea", "coffee"))):
        (tmp_path / folder).mkdir()
        for name in names:
            photo(name, 64).save(tmp_path / folder / f"{name}.png")
        concepts.append(tmp_path / folder)
    out = tmp_path / "out"
    args = ["immunize", *concepts, "-o", out, "--against", "ti", "--multi-concept", "--model", "tiny", "--steps", "4",
            "--defence-lr", str(DEFENCE_LR), "--device", "cpu", "--json"]
    code, stdout, stderr = cli(args)
    assert code == 0, stderr
    assert json.loads(stdout)["pipeline"] == str(out / "pipeline")
    final = im.load_attention_state(out / im.IMMUNIZED_NAME)
    stage1 = im.load_attention_state(out / "stages" / "01-castle" / im.IMMUNIZED_NAME)
    stage2 = im.load_attention_state(out / "stages" / "02-chair" / im.IMMUNIZED_NAME)
    assert all(torch.equal(final[k], stage2[k]) for k in final)
    # stage 2 started from stage 1's weights (paper 003 A1.3): redo it from there and get the same tensors
    items = [InputItem(p, PurePosixPath(p.name)) for p in sorted(concepts[1].iterdir())]
    again = im.immunize(base_pipe, load_instance_images(items, 64), _config("ti", 4), tmp_path / "redo",
                        init_state=stage1)
    assert all(torch.equal(again.state[k], stage2[k]) for k in final)
    # the folder loads as --model does; only the attention tensors differ from the base model
    loaded = load_pipeline(str(out / "pipeline"))
    base = base_pipe.unet.state_dict()
    for name, value in loaded.unet.state_dict().items():
        assert torch.equal(value, final[name]) if name in final else torch.equal(value, base[name]), name
    code, stdout, stderr = cli(args)  # a rerun with the same settings skips the finished products
    assert code == 0 and json.loads(stdout)["skipped"] == [im.IMMUNIZED_NAME, "pipeline"]
    assert json.loads(stdout)["done"] == []


def test_cli_class_word_count_must_match_concepts(cli, tmp_path, photo_dir):
    code, _, stderr = cli(["immunize", photo_dir, photo_dir, "-o", tmp_path / "out", "--against", "ti",
                           "--multi-concept", "--class-word", "a", "--class-word", "b", "--class-word", "c",
                           "--model", "tiny"])
    assert code == 2 and "--class-word" in stderr


def test_cli_refuses_stale_checkpoints_and_resumes_them(cli, tmp_path):
    """An interrupted run (checkpoint at step 2 of 4) is refused without --resume and continued with it; then
    --check-steps adapts base and immunized models alike."""
    from cloaklab.ops.io import collect_inputs

    folder = tmp_path / "purse"
    folder.mkdir()
    for name in ("astronaut", "chelsea"):
        photo(name, 64).save(folder / f"{name}.png")
    out = tmp_path / "out"
    items, _ = collect_inputs([str(folder)])
    im.immunize(_cpu_pipe(), load_instance_images(items, 64), _config("ti", 4), out, stop_after=2)
    args = ["immunize", folder, "-o", out, "--against", "ti", "--model", "tiny", "--steps", "4", "--defence-lr",
            str(DEFENCE_LR), "--checkpoint-every", "0", "--device", "cpu", "--json"]
    code, _, stderr = cli(args)
    assert code == 2 and "--resume" in stderr
    code, stdout, stderr = cli([*args, "--resume", "--check-steps", "2"])
    assert code == 0, stderr
    report = json.loads(stdout)
    assert report["concepts"][0]["resumed_from"] == 2
    check = report["check"][0]  # the same 2 TI steps on both models: the immunized one ends with the higher loss
    assert check["immunized"] > check["base"]
    assert (out / "check" / "purse" / "immunized" / "train_log.jsonl").exists()
    assert len((out / "train_log.jsonl").read_text().splitlines()) == 4
