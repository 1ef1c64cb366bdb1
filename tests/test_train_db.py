"""``cloak train-db``: the prior term and its weight, DiffShortcut prompts, LoRA-only updates and diffusers loading,
the DreamBooth pipeline folder, bit-exact resume, and the CLI's refusals."""

from __future__ import annotations

import json
from pathlib import PurePosixPath

import pytest
import torch

from cloaklab.ops.commands.train_db import train_dreambooth
from cloaklab.ops.diffusion import encode_prompts
from cloaklab.ops.io import InputItem
from cloaklab.ops.models import load_pipeline, model_info
from cloaklab.ops.train.dreambooth import dreambooth_loss
from cloaklab.ops.train.dreambooth_model import DreamBoothModel, DreamBoothSettings
from cloaklab.ops.train.loop import TrainConfig
from cloaklab.tests.conftest import photo

NEG = "UNKNOWN artifact masked"
TINY = model_info("tiny").as_dict()


@pytest.fixture
def instances(tmp_path) -> list[InputItem]:
    folder = tmp_path / "inst"
    folder.mkdir()
    for name in ("astronaut", "chelsea"):
        photo(name, 64).save(folder / f"{name}.png")
    return [InputItem(p, PurePosixPath(p.name)) for p in sorted(folder.glob("*.png"))]


def _config(**overrides) -> TrainConfig:
    values = dict(steps=4, batch_size=2, lr=1e-3, weight_decay=1e-2, max_grad_norm=1.0, checkpoint_every=2,
                  snapshot_every=0, seed=5)
    values.update(overrides)
    return TrainConfig(**values)


def test_prior_term_is_the_weighted_class_loss_under_the_decoupled_class_prompt(fresh_tiny_pipe):
    generator = torch.Generator().manual_seed(0)
    class_latents = (torch.randn(3, 4, 8, 8, generator=generator), torch.full((3, 4, 8, 8), 0.1))
    terms = {}
    for weight in (1.0, 0.25):
        settings = DreamBoothSettings(prior_weight=weight, neg_token=NEG)
        model = DreamBoothModel(fresh_tiny_pipe, settings, batch_size=2, class_latents=class_latents)
        terms[weight] = model.extra_loss(torch.Generator().manual_seed(1))
    assert model.instance_prompt == f"a photo of sks person, {NEG}"
    assert model.class_prompt == f"a photo of person, without {NEG}"
    assert torch.allclose(terms[0.25], 0.25 * terms[1.0], rtol=1e-6)

    # the same draws by hand: class batch indices, posterior sample, then dreambooth_loss on the class pair
    draw = torch.Generator().manual_seed(1)
    index = torch.randint(3, (2,), generator=draw)
    latents = class_latents[0][index] + class_latents[1][index] * torch.randn(2, 4, 8, 8, generator=draw)
    with torch.no_grad():
        text = encode_prompts(fresh_tiny_pipe, [model.class_prompt])
    expected = dreambooth_loss(fresh_tiny_pipe.unet, model.scheduler, latents, text, generator=draw)
    assert torch.allclose(terms[1.0], expected, rtol=1e-5)
    no_prior = DreamBoothModel(fresh_tiny_pipe, DreamBoothSettings(prior_weight=0.0), class_latents=class_latents)
    assert no_prior.extra_loss(torch.Generator()) is None



def test_dreambooth_loss_is_the_batch_mean_plus_weighted_class_mean_by_hand(tiny_pipe):
    """Paper 004 Eq. 2 / diffusers train_dreambooth.py: F.mse_loss(reduction="mean") on the instance half +
    prior_loss_weight × the same on the class half, with t ~ U[0, T) then ε ~ N(0, I) drawn in that order."""
    from cloaklab.ops.train.dreambooth import dreambooth_loss

    unet, scheduler = tiny_pipe.unet, tiny_pipe.scheduler
    make = torch.Generator().manual_seed(5)
    instance, klass = torch.randn(2, 4, 8, 8, generator=make), torch.randn(2, 4, 8, 8, generator=make)
    with torch.no_grad():
        text = encode_prompts(tiny_pipe, ["a photo of sks person"])
        got = dreambooth_loss(unet, scheduler, instance, text, klass, text, prior_weight=0.5,
                              generator=torch.Generator().manual_seed(9))
        draw = torch.Generator().manual_seed(9)

        def by_hand(z):
            t = (torch.rand(2, generator=draw, dtype=torch.float64) * 1000).floor().long()
            noise = torch.randn(z.shape, generator=draw)
            abar = scheduler.alphas_cumprod[t].float().view(-1, 1, 1, 1)
            prediction = unet(abar.sqrt() * z + (1 - abar).sqrt() * noise, t,
                              encoder_hidden_states=text.expand(2, -1, -1)).sample
            return (prediction - noise).pow(2).mean()

        expected = by_hand(instance) + 0.5 * by_hand(klass)
    assert torch.allclose(got, expected, rtol=1e-4)


def test_surrogate_dreambooth_config_is_anti_dreamboths():
    """VinAIResearch/Anti-DreamBooth train_dreambooth.py defaults used by ASPL/FSMG (docs/poison-setlevel.md):
    lr 5e-7, prior_loss_weight 1.0, adam_weight_decay 1e-2, max_grad_norm 1.0, text encoder trained."""
    from cloaklab.ops.train.dreambooth import DreamBoothConfig

    config = DreamBoothConfig()
    assert (config.learning_rate, config.prior_weight, config.weight_decay, config.max_grad_norm) == (5e-7, 1.0, 1e-2,
                                                                                                       1.0)
    assert config.train_text_encoder and config.instance_prompt == "a photo of sks person"

def test_lora_trains_only_adapters_and_its_file_loads_with_diffusers(tmp_path, instances):
    pipe, base = load_pipeline("tiny"), load_pipeline("tiny")
    settings = DreamBoothSettings(lora_rank=4, prior_weight=0.0, class_prompt=None, train_text_encoder=True)
    result = train_dreambooth(pipe, instances, tmp_path / "lora", settings, _config(steps=3, lr=1e-2),
                              model_record=TINY)
    assert result.files == ["pytorch_lora_weights.safetensors"]
    base_unet = dict(base.unet.named_parameters())
    for name, p in pipe.unet.named_parameters():
        if "lora_" in name:
            continue
        assert torch.equal(p, base_unet[name.replace(".base_layer", "")]), name  # frozen base weights untouched
    trained_b = [p for name, p in pipe.unet.named_parameters() if "lora_B" in name]
    assert trained_b and all(p.abs().max() > 0 for p in trained_b)  # B starts at zero: these moved

    base.load_lora_weights(str(tmp_path / "lora"))
    z, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2)), torch.tensor([300])
    with torch.no_grad():
        text = encode_prompts(pipe, ["a photo of sks person"])
        loaded_text = encode_prompts(base, ["a photo of sks person"])
        assert torch.allclose(text, loaded_text, atol=1e-5)  # text-encoder adapters saved and loaded too
        trained = pipe.unet.eval()(z, t, encoder_hidden_states=text).sample
        loaded = base.unet(z, t, encoder_hidden_states=text).sample
        plain = load_pipeline("tiny").unet(z, t, encoder_hidden_states=text).sample
    assert torch.allclose(trained, loaded, atol=1e-5)
    assert (trained - plain).abs().max() > 1e-4


def test_dreambooth_pipeline_folder_reloads_and_generates(tmp_path, instances, cli):
    from diffusers import DiffusionPipeline

    pipe, base = load_pipeline("tiny"), load_pipeline("tiny")
    settings = DreamBoothSettings(prior_weight=1.0, num_class_images=2, class_steps=2, train_text_encoder=True)
    out = tmp_path / "db"
    result = train_dreambooth(pipe, instances, out, settings, _config(steps=2), model_record=TINY)
    assert result.files == ["pipeline"] and len(list((out / "class_images").glob("p00_i*.png"))) == 2
    reloaded = DiffusionPipeline.from_pretrained(str(out / "pipeline"))
    for trained, original, saved in ((pipe.unet, base.unet, reloaded.unet),
                                     (pipe.text_encoder, base.text_encoder, reloaded.text_encoder)):
        trained_state, saved_state = trained.state_dict(), saved.state_dict()
        assert all(torch.equal(trained_state[k], saved_state[k]) for k in trained_state)
        assert any(not torch.equal(trained_state[k], v) for k, v in original.state_dict().items())
    code, _, err = cli(["generate", "-o", tmp_path / "gen", "--model", out / "pipeline", "--prompts", "faces",
                        "-n", "1", "--steps", "2", "--device", "cpu"])
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "gen").glob("*.png")) == ["p00_i000.png", "p01_i000.png"]


def test_resume_continues_bit_exactly_and_reuses_cached_class_images(tmp_path, instances):
    settings = dict(lora_rank=2, prior_weight=0.5, num_class_images=2, class_steps=2, neg_token=NEG)
    class_dir = tmp_path / "classes"
    straight, split = load_pipeline("tiny"), load_pipeline("tiny")
    train_dreambooth(straight, instances, tmp_path / "a", DreamBoothSettings(**settings), _config(),
                     model_record=TINY, class_dir=class_dir)
    stamp = (class_dir / "p00_i000.png").stat().st_mtime_ns
    first = train_dreambooth(split, instances, tmp_path / "b", DreamBoothSettings(**settings), _config(),
                             model_record=TINY, class_dir=class_dir, stop_after=2)
    assert first.steps_done == 2 and first.files == []
    assert (class_dir / "p00_i000.png").stat().st_mtime_ns == stamp  # cached class images not regenerated
    resumed_pipe = load_pipeline("tiny")
    second = train_dreambooth(resumed_pipe, instances, tmp_path / "b", DreamBoothSettings(**settings), _config(),
                              model_record=TINY, class_dir=class_dir, resume=True)
    assert second.resumed_from == 2 and second.steps_done == 4
    a = {k: v for k, v in straight.unet.state_dict().items() if "lora_" in k}
    b = {k: v for k, v in resumed_pipe.unet.state_dict().items() if "lora_" in k}
    assert a and all(torch.equal(a[k], b[k]) for k in a)
    log = lambda name: [json.loads(line) for line in (tmp_path / name / "train_log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in log("a")] == [r["loss"] for r in log("b")]


def test_cli_records_decoupled_prompts_and_refuses_a_second_run_without_resume(cli, tmp_path, instances):
    folder = instances[0].path.parent
    out = tmp_path / "out"
    args = ["train-db", folder, "-o", out, "--model", "tiny", "--device", "cpu", "--lora", "2", "--steps", "2",
            "--instance-prompt", "a photo of *", "--neg-token", NEG, "--checkpoint-every", "1"]
    code, stdout, err = cli(args + ["--json"])
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["steps"] == 2 and summary["files"] == ["pytorch_lora_weights.safetensors"]
    params = json.loads((out / "cloak.json").read_text())["params"]
    assert params["instance_prompt"] == f"a photo of *, {NEG}" and params["prior_weight"] == 0.0
    code, _, err = cli(args)
    assert code == 2 and "--resume" in err
    changed = [("a photo of #" if a == "a photo of *" else a) for a in args]
    code, _, err = cli(changed + ["--resume"])
    assert code == 1 and "instance_prompt" in err
    code, _, err = cli(args + ["--preset", "szt"])
    assert code == 2 and "--masks" in err
    code, _, err = cli(args + ["--overwrite", "--use-8bit-adam"])
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        assert code == 2 and "bitsandbytes" in err


def test_trained_parts_only_load_back_into_the_base_model(tmp_path, instances):
    from cloaklab.ops.generate import load_generation_pipeline

    pipe = load_pipeline("tiny")
    settings = DreamBoothSettings(prior_weight=0.0, class_prompt=None, train_text_encoder=True,
                                  save_trained_only=True)
    out = tmp_path / "parts"
    result = train_dreambooth(pipe, instances, out, settings, _config(steps=1), model_record=TINY)
    assert result.files == ["unet", "text_encoder"] and not (out / "pipeline").exists()
    loaded, _ = load_generation_pipeline("tiny", "cpu", torch.float32, unet=out / "unet",
                                         text_encoder=out / "text_encoder")
    for name in ("unet", "text_encoder"):
        trained, saved = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert all(torch.equal(trained[k], saved[k]) for k in trained)
    base = load_pipeline("tiny").unet.state_dict()
    assert any(not torch.equal(base[k], v) for k, v in loaded.unet.state_dict().items())


def test_szt_preset_reaches_the_loop(cli, tmp_path, instances):
    import numpy as np
    from PIL import Image

    masks = tmp_path / "masks"
    masks.mkdir()
    for item in instances:
        mask = np.zeros((64, 64), np.uint8)
        mask[16:48, 16:48] = 255
        Image.fromarray(mask).save(masks / item.path.name)
    out = tmp_path / "szt"
    code, _, err = cli(["train-db", instances[0].path.parent, "-o", out, "--model", "tiny", "--device", "cpu",
                        "--lora", "2", "--steps", "3", "--preset", "szt", "--masks", masks])
    assert code == 0, err
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 3 and all(t >= 500 for record in log for t in record["t"])  # threshold-high ρ = 0.5
    assert all("loss_inside" in record and "loss_outside" in record for record in log)  # LM with masks
    params = json.loads((out / "cloak.json").read_text())["params"]
    assert (params["jpeg"], params["dilate"], params["mask_mode"]) == (25, 16, "lm")


def test_dreambooth_defaults_are_paper_001s_full_sh(cli, tmp_path, instances):
    """DiffShortcut scripts/sub/train/full.sh: --train_text_encoder, --train_batch_size=1 (1 instance + 1 class image
    per step via collate_fn), lr 5e-7 constant, prior weight 1.0, 200 class images, 1000 steps (typed from it)."""
    folder = instances[0].path.parent
    base = ["train-db", folder, "--model", "tiny", "--device", "cpu", "--steps", "1", "--num-class-images", "1",
            "--class-steps", "1", "--save-trained-only", "--checkpoint-every", "0", "--json"]
    code, stdout, err = cli(base + ["-o", tmp_path / "paper"])
    assert code == 0, err
    assert json.loads(stdout)["files"] == ["unet", "text_encoder"]  # the text encoder trained and was saved
    params = json.loads((tmp_path / "paper" / "cloak.json").read_text())["params"]
    assert (params["train_text_encoder"], params["batch_size"], params["lr"], params["prior_weight"]) == (
        True, 1, 5e-7, 1.0)
    log = [json.loads(line) for line in (tmp_path / "paper" / "train_log.jsonl").read_text().splitlines()]
    assert [len(record["t"]) for record in log] == [1]  # one instance image per step
    code, stdout, err = cli(base + ["-o", tmp_path / "no-te", "--no-train-text-encoder", "--batch-size", "2"])
    assert code == 0, err
    assert json.loads(stdout)["files"] == ["unet"]
    params = json.loads((tmp_path / "no-te" / "cloak.json").read_text())["params"]
    assert (params["train_text_encoder"], params["batch_size"]) == (False, 2)
    help_code, help_text, _ = cli(["train-db", "--help"])
    assert "--no-train-text-encoder" in help_text


def test_mode_defaults_and_dtype_resolve_in_the_settings():
    """LoRA: paper 000 App. P (no prior, UNet only) with lr 1e-4, batch 2; DreamBooth: paper 001's full.sh (lr 5e-7,
    batch 1, prior 1.0, text encoder); --dtype fp16/bf16 is that autocast and may not contradict --mixed-precision."""
    from cloaklab.ops.commands.train_db import TrainDbSettings
    from cloaklab.ops.errors import UsageError

    keys = ("lr", "batch_size", "prior_weight", "train_text_encoder", "class_prompt", "mixed_precision")
    assert [TrainDbSettings(lora=4).resolved()[k] for k in keys] == [1e-4, 2, 0.0, False, None, "no"]
    assert [TrainDbSettings().resolved()[k] for k in keys] == [5e-7, 1, 1.0, True, "a photo of person", "no"]
    assert TrainDbSettings(lora=4, prior_weight=0.5).resolved()["class_prompt"] == "a photo of person"
    assert TrainDbSettings(dtype="bf16").resolved()["mixed_precision"] == "bf16"
    assert TrainDbSettings(dtype="fp32", mixed_precision="no").resolved()["mixed_precision"] == "no"
    assert TrainDbSettings(dtype="auto", mixed_precision="fp16").resolved()["mixed_precision"] == "fp16"
    with pytest.raises(UsageError, match="contradicts"):
        TrainDbSettings(dtype="fp16", mixed_precision="bf16")
    with pytest.raises(UsageError, match="--dtype"):
        TrainDbSettings(dtype="fp64")
    with pytest.raises(UsageError, match="--masks"):
        TrainDbSettings(preset="szt")


def test_set_level_surrogate_defaults_are_stated_once():
    """The set-level poisons' DreamBooth surrogate (Anti-DreamBooth / papers 001, 004): one table, which start_run's
    signature follows (it used to repeat the values and lacked latent_sample)."""
    import inspect

    from cloaklab.ops.attacks import SET_DEFAULTS
    from cloaklab.ops.attacks.setlevel import start_run

    parameters = inspect.signature(start_run).parameters
    assert {key: parameters[key].default for key in SET_DEFAULTS} == SET_DEFAULTS
    assert SET_DEFAULTS == {"instance_prompt": "a photo of sks person", "class_prompt": "a photo of person",
                            "num_class_images": 200, "class_dir": None, "class_steps": 50, "prior_weight": 1.0,
                            "db_lr": 5e-7, "train_text_encoder": True, "t_range": None, "latent_sample": False}
