"""``cloak train-ti``: only the new token trains, its file loads with diffusers' own loader and changes generations,
presets reproduce paper 000 Table 1, masks are checked against their images, and --resume continues bit-exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from cloaklab.ops.train.presets import PRESETS, resolve_preset
from cloaklab.ops.train.textual_inversion import TextualInversion
from cloaklab.tests.conftest import photo


@pytest.fixture
def concept(tmp_path):
    """Three 64-px photos and rectangular masks of their size (one non-square)."""
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    for name, size in (("astronaut", (64, 64)), ("chelsea", (80, 64)), ("rocket", (64, 64))):
        photo(name).resize(size).save(images / f"{name}.png")
        mask = np.zeros(size[::-1], np.uint8)
        mask[16:48, 20:50] = 255
        Image.fromarray(mask).save(masks / f"{name}.png")
    return images, masks


BASE = ["--model", "tiny", "--device", "cpu", "--checkpoint-every", "2", "--snapshot-every", "2"]


def test_only_the_new_row_changes(fresh_tiny_pipe, tmp_path):
    from cloaklab.ops.train.data import InstanceData
    from cloaklab.ops.train.loop import TrainConfig, train
    from cloaklab.tests.conftest import photo_tensor

    before = fresh_tiny_pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    ti = TextualInversion(fresh_tiny_pipe, "<R*>", "object")
    init_row = fresh_tiny_pipe.text_encoder.get_input_embeddings().weight[ti.slots[0].ids[0]].detach().clone()
    data = InstanceData(photo_tensor("astronaut")[None], None, ["astronaut.png"])
    train(fresh_tiny_pipe, ti, data, ["a photo of a <R*>"], TrainConfig(steps=3, lr=5e-2, checkpoint_every=0),
          tmp_path)
    ti.finalize()
    after = fresh_tiny_pipe.text_encoder.get_input_embeddings().weight.detach()
    assert after.shape[0] == before.shape[0] + 1
    assert torch.equal(after[:-1], before)  # every old row bit-identical
    assert not torch.equal(after[-1], init_row)  # the new row trained
    saved = load_file(str(tmp_path / "learned_embeds.safetensors"))
    assert list(saved) == ["<R*>"] and torch.equal(saved["<R*>"][0], after[-1].cpu())


def _generate(pipe, prompt):
    generator = torch.Generator().manual_seed(0)
    return pipe(prompt, num_inference_steps=2, height=64, width=64, generator=generator, output_type="np").images[0]


def test_embedding_loads_with_diffusers_and_changes_generation(cli, concept, tmp_path):
    from cloaklab.ops.models import load_pipeline

    images, _ = concept
    out = tmp_path / "ti"
    code, stdout, stderr = cli(["train-ti", images, "-o", out, "--steps", "3", "--lr", "0.05", *BASE])
    assert code == 0, stderr
    assert stdout.strip() == str(out)
    learned = load_file(str(out / "learned_embeds.safetensors"))["<R*>"]
    pipe = load_pipeline("tiny")
    init = pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer.convert_tokens_to_ids("object")]
    pipe.load_textual_inversion(str(out / "learned_embeds.safetensors"))
    token_id = pipe.tokenizer.convert_tokens_to_ids("<R*>")
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[token_id], learned[0])
    trained_image = _generate(pipe, "a photo of a <R*>")
    baseline = load_pipeline("tiny")
    baseline.load_textual_inversion({"<R*>": init.detach()[None].clone()})
    untrained_image = _generate(baseline, "a photo of a <R*>")
    assert np.abs(trained_image - untrained_image).max() > 1e-3
    record = json.loads((out / "cloak.json").read_text())["files"]["learned_embeds.safetensors"]
    assert record["status"] == "done" and record["steps"] == 3
    assert (out / "snapshots" / "learned_embeds-step-000002.safetensors").exists()


def test_presets_match_table_1():
    assert list(PRESETS) == ["nominal", "jpeg", "t600", "lm", "jpeg+t600", "jpeg+lm", "szt"]
    assert resolve_preset("szt", {}) == {"jpeg": 25, "t_sampler": "threshold-high", "t_param": 0.5,
                                         "mask_mode": "lm", "dilate": 16}
    assert resolve_preset("t600", {})["t_param"] == 0.6 and resolve_preset("jpeg+lm", {})["jpeg"] == 25
    assert resolve_preset("nominal", {}) == {"jpeg": None, "t_sampler": "uniform", "t_param": None,
                                             "mask_mode": "none", "dilate": 0}
    assert resolve_preset("szt", {"dilate": 8})["dilate"] == 8  # explicit flags win


def test_szt_preset_end_to_end_then_rerun_skips(cli, concept, tmp_path):
    images, masks = concept
    out = tmp_path / "szt"
    args = ["train-ti", images, "-o", out, "--preset", "szt", "--masks", masks, "--steps", "4", "--json", *BASE]
    code, stdout, stderr = cli(args)
    assert code == 0, stderr
    assert json.loads(stdout)["steps"] == 4
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 4 and all(t >= 500 for record in log for t in record["t"])
    assert all("loss_inside" in record and "loss_outside" in record for record in log)
    manifest = json.loads((out / "cloak.json").read_text())
    assert manifest["params"]["jpeg"] == 25 and manifest["params"]["dilate"] == 16
    assert 0 < min(manifest["files"]["learned_embeds.safetensors"]["mask_area"]) < 1
    code, stdout, stderr = cli(args)
    assert code == 0 and "already trained" in stderr and json.loads(stdout)["skipped"]
    # the dry run sees the same: skipped as finished; with more steps and --resume, the checkpoint it continues
    code, stdout, _ = cli(args + ["--dry-run"])
    plan = json.loads(stdout)
    assert code == 0 and plan["skipped"] == ["learned_embeds.safetensors"] and plan["would_write"] == []
    longer = [("5" if a == "4" else a) for a in args]
    plan = json.loads(cli(longer + ["--dry-run"])[1])
    assert "learned_embeds.safetensors" in plan["would_write"] and any("stops" in note for note in plan["notes"])
    plan = json.loads(cli(longer + ["--dry-run", "--resume"])[1])
    assert any(note == "resume from step-000004.pt" for note in plan["notes"])
    plan = json.loads(cli(longer + ["--dry-run", "--resume", "--overwrite"])[1])
    assert any(note == "step-000004.pt of an earlier run is discarded" for note in plan["notes"])


def test_resume_continues_bit_exactly(cli, concept, tmp_path):
    images, masks = concept
    common = ["--masks", masks, "--t-sampler", "power", "--t-param", "2", *BASE]
    assert cli(["train-ti", images, "-o", tmp_path / "full", "--steps", "4", *common])[0] == 0
    assert cli(["train-ti", images, "-o", tmp_path / "split", "--steps", "2", *common])[0] == 0
    code, _, stderr = cli(["train-ti", images, "-o", tmp_path / "split", "--steps", "4", *common])
    assert code == 2 and "--resume" in stderr  # checkpoints present: resume or overwrite, never silently restart
    code, _, stderr = cli(["train-ti", images, "-o", tmp_path / "split", "--steps", "4", "--resume", *common])
    assert code == 0 and "resumed from step 2" in stderr
    full = load_file(str(tmp_path / "full" / "learned_embeds.safetensors"))["<R*>"]
    split = load_file(str(tmp_path / "split" / "learned_embeds.safetensors"))["<R*>"]
    assert torch.equal(full, split)


def test_bad_masks_and_arguments_fail_clearly(cli, concept, tmp_path):
    images, masks = concept
    code, _, stderr = cli(["train-ti", images, "-o", tmp_path / "a", "--preset", "lm", "--steps", "1", *BASE])
    assert code == 2 and "--masks" in stderr
    Image.fromarray(np.full((32, 32), 255, np.uint8)).save(masks / "rocket.png")
    code, _, stderr = cli(["train-ti", images, "-o", tmp_path / "b", "--masks", masks, "--steps", "1", *BASE])
    assert code == 1 and "32x32" in stderr and "64x64" in stderr and "Traceback" not in stderr
    (masks / "rocket.png").unlink()
    code, _, stderr = cli(["train-ti", images, "-o", tmp_path / "c", "--masks", masks, "--steps", "1", *BASE])
    assert code == 1 and "no mask for rocket.png" in stderr
    code, _, stderr = cli(["train-ti", images, "-o", tmp_path / "d", "--init-token", "a red toy", "--steps", "1",
                           *BASE])
    assert code == 2 and "--init-token" in stderr
    code, _, stderr = cli(["train-ti", images, "-o", tmp_path / "e", "--token", "object", "--steps", "1", *BASE])
    assert code == 2 and "already exists" in stderr


def test_multi_vector_token_loads_as_diffusers_expects(cli, concept, tmp_path):
    from cloaklab.ops.models import load_pipeline

    images, _ = concept
    out = tmp_path / "multi"
    code, _, stderr = cli(["train-ti", images, "-o", out, "--steps", "2", "--num-vectors", "2", *BASE])
    assert code == 0, stderr
    learned = load_file(str(out / "learned_embeds.safetensors"))["<R*>"]
    assert learned.shape == (2, 32)
    pipe = load_pipeline("tiny")
    pipe.load_textual_inversion(str(out / "learned_embeds.safetensors"))
    ids = pipe.tokenizer.convert_tokens_to_ids(["<R*>", "<R*>_1"])
    torch.testing.assert_close(pipe.text_encoder.get_input_embeddings().weight[ids], learned, rtol=0, atol=0)


def _tiny_sdxl():
    """A tiny SDXL-architecture pipeline (two text encoders, text_time conditioning), random weights."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from cloaklab.ops.models.tokenizer import VOCAB_SIZE, clip_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=8, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8)
    vae = AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8)
    config = dict(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=77, projection_dim=32, bos_token_id=49406,
                  eos_token_id=49407, pad_token_id=49407)
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=CLIPTextModel(CLIPTextConfig(**config)),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**config)), tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(), unet=unet,
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"))


def test_sdxl_token_trains_in_both_encoders_and_loads(tmp_path):
    import copy

    from cloaklab.ops.train.data import InstanceData
    from cloaklab.ops.train.loop import TrainConfig, train
    from cloaklab.tests.conftest import photo_tensor

    pipe = _tiny_sdxl()
    fresh = copy.deepcopy(pipe)
    encoders = (pipe.text_encoder, pipe.text_encoder_2)
    before = [encoder.get_input_embeddings().weight.detach().clone() for encoder in encoders]
    ti = TextualInversion(pipe, "<R*>", "object", resolution=32)
    initial = [vectors.detach().clone() for vectors in ti.parameters()]
    data = InstanceData(photo_tensor("astronaut", 32)[None], None, ["astronaut.png"])
    train(pipe, ti, data, ["a photo of a <R*>"], TrainConfig(steps=2, lr=0.05, checkpoint_every=0), tmp_path)
    ti.finalize()
    for encoder, old, init in zip(encoders, before, initial):
        weight = encoder.get_input_embeddings().weight.detach()
        assert torch.equal(weight[:-1], old) and not torch.equal(weight[-1:], init)
    saved = load_file(str(tmp_path / "learned_embeds.safetensors"))
    assert set(saved) == {"clip_l", "clip_g"}
    for key, encoder, tokenizer in (("clip_l", fresh.text_encoder, fresh.tokenizer),
                                    ("clip_g", fresh.text_encoder_2, fresh.tokenizer_2)):
        fresh.load_textual_inversion(saved[key], token="<R*>", text_encoder=encoder, tokenizer=tokenizer)
        row = encoder.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids("<R*>")]
        assert torch.equal(row, saved[key][0])


@pytest.mark.parametrize("kind", ["v_prediction", "flow"])
def test_training_schedule_keeps_the_model_target(kind, fresh_tiny_pipe, tmp_path):
    """v-prediction (SD2.x) and rectified flow (paper 000 App. O) train against their own targets."""
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    from cloaklab.ops import diffusion
    from cloaklab.ops.train.data import InstanceData
    from cloaklab.ops.train.loop import TrainConfig, train, training_scheduler
    from cloaklab.tests.conftest import photo_tensor

    if kind == "flow":
        fresh_tiny_pipe.scheduler = FlowMatchEulerDiscreteScheduler()
    else:
        fresh_tiny_pipe.scheduler = DDIMScheduler.from_config(fresh_tiny_pipe.scheduler.config,
                                                              prediction_type="v_prediction")
    assert diffusion.prediction_type(training_scheduler(fresh_tiny_pipe)) == kind
    ti = TextualInversion(fresh_tiny_pipe, "<R*>", "object")
    data = InstanceData(photo_tensor("rocket")[None], None, ["rocket.png"])
    result = train(fresh_tiny_pipe, ti, data, ["a photo of a <R*>"], TrainConfig(steps=2, checkpoint_every=0),
                   tmp_path)
    assert np.isfinite(result.final_loss)


def test_unreadable_image_is_rejected_and_the_rest_trains(cli, concept, tmp_path):
    images, _ = concept
    (images / "broken.png").write_bytes(b"")
    out = tmp_path / "partial"
    code, _, stderr = cli(["train-ti", images, "-o", out, "--steps", "1", *BASE])
    assert code == 3 and "rejected broken.png" in stderr
    manifest = json.loads((out / "cloak.json").read_text())
    assert manifest["files"]["broken.png"]["status"] == "rejected"
    assert manifest["files"]["learned_embeds.safetensors"]["images"] == ["astronaut.png", "chelsea.png", "rocket.png"]


def test_masks_from_cloak_mask_feed_train_ti(cli, concept, tmp_path):
    """The documented chain: `cloak mask` output is what `train-ti --masks` reads (same names, same sizes)."""
    images, _ = concept
    masks = tmp_path / "sam-masks"
    code, _, stderr = cli(["mask", images, "-o", masks, "--sam-type", "tiny", "--device", "cpu", "--center"])
    assert code == 0, stderr
    code, stdout, stderr = cli(["train-ti", images, "-o", tmp_path / "chain", "--preset", "szt", "--masks", masks,
                                "--steps", "2", "--json", *BASE])
    assert code == 0, stderr
    record = json.loads((tmp_path / "chain" / "cloak.json").read_text())["files"]["learned_embeds.safetensors"]
    assert len(record["mask_area"]) == 3 and all(0 < area <= 1 for area in record["mask_area"])


def test_template_file_enters_the_run_and_its_lines_count(cli, concept, tmp_path):
    images, _ = concept
    templates = tmp_path / "templates.txt"
    templates.write_text("# the model's own caption style\na {}\na striped {token}\n")
    args = ["train-ti", images, "-o", tmp_path / "ti", "--templates", templates, "--steps", "2", "--json", *BASE]
    code, _, stderr = cli(args)
    assert code == 0, stderr
    recorded = json.loads((tmp_path / "ti" / "cloak.json").read_text())["params"]["templates"]
    assert recorded == {"file": str(templates), "lines": ["a {}", "a striped {}"]}
    code, stdout, stderr = cli(args)
    assert code == 0 and json.loads(stdout)["skipped"]
    templates.write_text("a dotted {}\n")  # same file name, other templates: not the finished run any more
    code, _, stderr = cli(args)
    assert code == 2 and "--overwrite" in stderr
    templates.write_text("a photo\n")
    code, _, stderr = cli(args + ["--overwrite"])
    assert code == 2 and "has no {}" in stderr


# ------------------------------------------------------------- diffusers TI example: flips and AdamW weight decay
def _ti_run(pipe, images, tmp_path, name, **config):
    from cloaklab.ops.train.data import InstanceData
    from cloaklab.ops.train.loop import TrainConfig, train

    ti = TextualInversion(pipe, "<R*>", "object")
    data = InstanceData(images, None, [f"{i}.png" for i in range(len(images))])
    values = dict(steps=3, lr=5e-2, checkpoint_every=0, snapshot_every=0, seed=7)
    values.update(config)
    train(pipe, ti, data, ["a photo of a <R*>"], TrainConfig(**values), tmp_path / name)
    log = [json.loads(line) for line in (tmp_path / name / "train_log.jsonl").read_text().splitlines()]
    return ti, log


def test_cli_defaults_follow_the_diffusers_ti_script():
    """diffusers examples/textual_inversion/textual_inversion.py: TextualInversionDataset(flip_p=0.5) and
    --adam_weight_decay 1e-2."""
    import inspect

    from cloaklab.cli.train_ti import train_ti

    parameters = inspect.signature(train_ti).parameters
    assert parameters["flip_p"].default == 0.5 and parameters["weight_decay"].default == 1e-2


def test_flip_pattern_is_an_independent_draw_of_the_seed_and_flips_the_image(tmp_path):
    from cloaklab.ops.models import load_pipeline
    from cloaklab.tests.conftest import photo_tensor

    images = torch.stack([photo_tensor("astronaut"), photo_tensor("chelsea")])
    _, log = _ti_run(load_pipeline("tiny"), images, tmp_path, "half", flip_p=0.5, batch_size=2, steps=6)
    generator = torch.Generator().manual_seed(7 + 1)  # the run's seed + 1 (documented flip stream)
    expected = [(torch.rand(2, generator=generator) < 0.5).int().tolist() for _ in range(6)]
    assert [record["flip"] for record in log] == expected
    assert 0 < sum(map(sum, expected)) < 12  # both outcomes occur, so the check above has teeth
    # flip_p 1 on the photos trains exactly like flip_p 0 on the mirrored photos (and not like the photos)
    always, _ = _ti_run(load_pipeline("tiny"), images, tmp_path, "always", flip_p=1.0)
    mirrored, _ = _ti_run(load_pipeline("tiny"), images.flip(-1), tmp_path, "mirrored", flip_p=0.0)
    plain, _ = _ti_run(load_pipeline("tiny"), images, tmp_path, "plain", flip_p=0.0)
    assert torch.equal(always.slots[0].vectors, mirrored.slots[0].vectors)
    assert not torch.equal(always.slots[0].vectors, plain.slots[0].vectors)


def test_weight_decay_is_applied_as_adamw_and_only_the_new_row_changes(tmp_path):
    from cloaklab.ops.models import load_pipeline
    from cloaklab.tests.conftest import photo_tensor

    pipe = load_pipeline("tiny")
    before = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    lr, decay, eps = 5e-2, 1e-2, 1e-8
    ti = TextualInversion(pipe, "<R*>", "object")
    start = ti.slots[0].vectors.detach().clone()
    from cloaklab.ops.train.data import InstanceData
    from cloaklab.ops.train.loop import TrainConfig, train

    data = InstanceData(photo_tensor("astronaut")[None], None, ["a.png"])
    train(pipe, ti, data, ["a photo of a <R*>"], TrainConfig(steps=1, lr=lr, weight_decay=decay, flip_p=0.5,
                                                             checkpoint_every=0, snapshot_every=0), tmp_path)
    grad = ti.slots[0].vectors.grad.detach()
    # AdamW's first step by hand (Loshchilov & Hutter; bias-corrected m̂ = g, v̂ = g²), decoupled decay first
    expected = start * (1 - lr * decay) - lr * grad / (grad.abs() + eps)
    assert torch.allclose(ti.slots[0].vectors.detach(), expected, atol=1e-6, rtol=0)
    without_decay = start - lr * grad / (grad.abs() + eps)
    assert not torch.allclose(ti.slots[0].vectors.detach(), without_decay, atol=1e-6, rtol=0)
    ti.finalize()
    after = pipe.text_encoder.get_input_embeddings().weight.detach()
    assert torch.equal(after[:-1], before)  # weight decay touches no other row
    assert torch.allclose(after[-1], expected[0], atol=1e-6, rtol=0)
