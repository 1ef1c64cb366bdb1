"""Toy world: dataset determinism and ground truth, the toy classifier and its metrics, ``--model toy``."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from cloaklab.ops.toy import dataset

ROOT = Path(__file__).resolve().parents[1]
TOY_WEIGHTS = ROOT / "ops" / "toy" / "weights" / "model_index.json"
JUDGE_WEIGHTS = ROOT / "ops" / "toy" / "classifier.safetensors"
needs_judge = pytest.mark.skipif(not JUDGE_WEIGHTS.exists(), reason="toy classifier weights not trained")
needs_toy = pytest.mark.skipif(not TOY_WEIGHTS.exists(), reason="toy model weights not trained (make toy-model)")


def test_dataset_is_deterministic_per_seed_and_index():
    first, again = dataset.generate(6, seed=3), dataset.generate(6, seed=3)
    for a, b in zip(first, again):
        assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask) and a.caption == b.caption
    # item i depends only on (seed, i): a longer run starts with the same items
    assert np.array_equal(dataset.generate(8, seed=3)[5].image, first[5].image)
    other = dataset.generate(6, seed=4)
    assert not all(np.array_equal(a.image, b.image) for a, b in zip(first, other))


def test_captions_name_only_the_named_shapes():
    items = dataset.generate(120, seed=0)
    novel = [it for it in items if it.shape in dataset.NOVEL_SHAPES]
    named = [it for it in items if it.shape in dataset.SHAPES]
    assert novel and named
    for it in novel:  # unnamed concepts: in the data, never named by a caption word
        assert it.caption.split()[-1] == dataset.UNNAMED_WORD and it.colour in it.caption
        assert not set(it.caption.split()) & set(dataset.NOVEL_SHAPES)  # ("narrow" is a word of its own)
    for it in named:
        assert it.caption.split()[-1] == it.shape and it.colour in it.caption
        assert (it.texture in it.caption) == (it.texture != "solid")


def test_descriptors_are_shared_so_only_their_conjunction_identifies_an_unnamed_shape():
    import collections

    items = [it for it in dataset.generate(4000, seed=0) if it.shape in dataset.NOVEL_SHAPES]
    words = {w for pair in dataset.DESCRIPTORS.values() for w in pair}
    described = [(frozenset(it.caption.split()) & words, it.shape) for it in items]
    by_word = collections.Counter((w, shape) for found, shape in described for w in found)
    for word in words:  # one word: two shapes about equally often, so it names neither
        shapes = {s: by_word[word, s] for s in dataset.NOVEL_SHAPES if by_word[word, s]}
        assert len(shapes) == 2 and max(shapes.values()) / sum(shapes.values()) < 0.6, (word, shapes)
    for found, shape in described:  # both words: exactly the one shape they describe
        if len(found) == 2:
            assert found == set(dataset.DESCRIPTORS[shape])
    both = sum(len(found) == 2 for found, _ in described) / len(described)
    assert abs(both - dataset.DESCRIPTOR_P ** 2) < 0.05
    # the descriptors have their own random stream: the pictures are those of the plain dataset
    rng = np.random.default_rng([0, 7])
    dataset.sample_labels(rng)
    plain = dataset.render("heart", "red", "solid", rng)
    assert np.array_equal(dataset.item(0, 7, shape="heart", colour="red", texture="solid").image, plain.image)


@pytest.mark.parametrize("shape", dataset.ALL_SHAPES)
def test_ground_truth_mask_and_colour_match_the_pixels(shape):
    it = dataset.item(7, 1, shape=shape, colour="blue", texture="solid")
    assert it.image.shape == (64, 64, 3) and it.image.dtype == np.uint8 and it.mask.shape == (64, 64)
    assert 0.03 < it.mask.mean() < 0.6
    inside = it.image[it.mask].astype(float).mean(0)
    outside = it.image[~it.mask].astype(float).mean(0)
    assert np.abs(inside - dataset.COLOURS["blue"]).max() < 25  # the object is drawn in its labelled colour
    assert np.abs(outside - dataset.COLOURS["blue"]).max() > 40  # the muted background is not
    x0, y0, x1, y1 = it.box
    ys, xs = np.nonzero(it.mask)
    assert x0 == xs.min() and y0 == ys.min() and x1 == xs.max() + 1 and y1 == ys.max() + 1


def test_textures_put_a_darker_tone_inside_the_object():
    solid = dataset.item(5, 0, shape="square", colour="yellow", texture="solid")
    striped = dataset.item(5, 0, shape="square", colour="yellow", texture="striped")
    assert np.array_equal(solid.mask, striped.mask)
    assert striped.image[striped.mask].std(0).mean() > 3 * solid.image[solid.mask].std(0).mean()
    with pytest.raises(ValueError, match="unknown toy label"):
        dataset.item(0, 0, shape="hexagon")


@needs_judge
def test_classifier_reads_ground_truth_and_shape_features_are_colour_blind():
    from cloaklab.ops.toy.classifier import accuracy, load_judge

    judge = load_judge()
    acc = accuracy(judge, dataset.generate(60, seed=11, novel_fraction=0.4))
    assert acc["shape"] >= 0.85 and acc["colour"] >= 0.9
    same_shape = [dataset.item(12, i, shape="star", colour=c) for i, c in enumerate(("red", "green", "blue"))]
    same_colour = [dataset.item(12, i, shape=s, colour="red") for i, s in enumerate(("circle", "cross", "moon"))]
    to_tensor = lambda items: torch.from_numpy(np.stack([it.image for it in items])).permute(0, 3, 1, 2) / 255.0
    feats_shape = torch.nn.functional.normalize(judge.features(to_tensor(same_shape)), dim=1)
    feats_colour = torch.nn.functional.normalize(judge.features(to_tensor(same_colour)), dim=1)
    off_diagonal = ~torch.eye(3, dtype=torch.bool)
    assert (feats_shape @ feats_shape.T)[off_diagonal].mean() > (feats_colour @ feats_colour.T)[off_diagonal].mean()


@needs_judge
def test_toy_metrics_on_ground_truth_images():
    from cloaklab.ops.metrics import get_metric
    from cloaklab.ops.metrics.base import ImageContext

    def tensors(shape, colour, seed):
        return [torch.from_numpy(it.image).permute(2, 0, 1).float() / 255
                for it in dataset.generate(4, seed=seed, shape=shape, colour=colour, texture="solid")]

    refs = {"heart": tensors("heart", "red", 20)}
    acc, sim = get_metric("toy-acc").build(), get_metric("toy-sim").build()
    for metric in (acc, sim):
        metric.prepare(refs)
    hearts, rings = tensors("heart", "green", 21), tensors("ring", "red", 22)
    contexts = [ImageContext(f"{i}.png", "heart") for i in range(4)]
    assert acc.score(hearts, contexts) == [1.0] * 4
    assert acc.score(rings, contexts) == [0.0] * 4
    # same shape in another colour is more similar than another shape in the concept's own colour
    assert min(sim.score(hearts, contexts)) > max(sim.score(rings, contexts))
    # --class names the shape directly
    assert acc.score(rings, [ImageContext("x.png", "other", class_name="ring")]) == [1.0]


def test_toy_model_missing_weights_is_one_line(monkeypatch, tmp_path):
    from cloaklab.ops.errors import ModelNotFoundError
    from cloaklab.ops.models import load_pipeline, model_info

    monkeypatch.setenv("CLOAK_TOY_WEIGHTS", str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="make toy-model"):
        load_pipeline("toy")
    assert model_info("toy").kind == "builtin" and model_info("toy").revision is None


def test_quality_script_and_grid_train_and_prompt_ti_alike():
    """evaluate's TI set-up (what the README's bar measures) is the one examples/toy/Makefile runs."""
    from cloaklab.ops.prompts import load_prompt_templates
    from cloaklab.ops.toy.evaluate import TI_OPTIMIZER, TI_PROMPTS, TI_TEMPLATES, TI_VECTORS
    from cloaklab.ops.train.data import load_templates

    examples = ROOT / "examples" / "toy"
    assert load_templates(str(examples / "ti_templates.txt")) == TI_TEMPLATES
    assert load_prompt_templates(str(examples / "prompts.txt")) == list(TI_PROMPTS.values())
    assert f"--num-vectors {TI_VECTORS}" in (examples / "Makefile").read_text()
    assert " ".join(TI_OPTIMIZER) in (examples / "Makefile").read_text()


def test_quality_report_names_the_weights_it_measured(monkeypatch, tmp_path):
    from cloaklab.ops.toy.evaluate import weights_info

    (tmp_path / "unet").mkdir()
    (tmp_path / "model_index.json").write_text("{}")
    (tmp_path / "toy_train.json").write_text('{"unet_steps": 4622}')
    (tmp_path / "unet" / "w.safetensors").write_bytes(b"one")
    monkeypatch.setenv("CLOAK_TOY_WEIGHTS", str(tmp_path))
    first = weights_info("toy")
    assert first["folder"] == str(tmp_path) and first["unet_steps"] == 4622 and first["revision"]
    (tmp_path / "unet" / "w.safetensors").write_bytes(b"two")
    assert weights_info("toy")["revision"] != first["revision"], "other weights must give another revision"
    assert weights_info("tiny") == {"model": "tiny"}



def test_ti_sample_sheet_puts_each_concepts_images_then_its_prompts_in_one_row(tmp_path):
    from PIL import Image

    from cloaklab.ops.toy.evaluate import TI_PROMPTS, ti_sheet

    def write(folder: Path, names: list[str], value: int) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for name in names:
            Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(folder / f"{name}.png")

    for row, shape in enumerate(("heart", "moon")):
        write(tmp_path / "concepts" / "images" / shape, [f"{i:02d}" for i in range(5)], 10 + row)
        for k in range(len(TI_PROMPTS)):  # 3 samples a prompt; the sheet shows the first 2 of each
            write(tmp_path / "gen" / shape, [f"p{k:02d}_i{i:03d}" for i in range(3)], 20 + 10 * k + row)
    sheet = ti_sheet(tmp_path, ["heart", "moon"], per_prompt=3, show=2, gap=4)
    assert sheet.shape == (16, 5 * 8 + 3 * (4 + 2 * 8), 3)
    assert (sheet[:8, :40] == 10).all() and (sheet[8:, :40] == 11).all()  # the concept's own images first
    assert (sheet[:, 40:44] == 255).all()  # a white gap between panels
    for k in range(3):
        left = 44 + k * 20
        assert (sheet[8:, left:left + 16] == 21 + 10 * k).all(), f"prompt {k} of the second concept"

@needs_toy
@needs_judge
def test_model_toy_loads_offline_and_draws_the_requested_colour(monkeypatch):
    from cloaklab.ops.models import load_pipeline
    from cloaklab.ops.toy.classifier import load_judge
    from cloaklab.ops.toy.evaluate import sample

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = load_pipeline("toy")
    assert pipe.unet.config.cross_attention_dim == 64 and pipe.vae_scale_factor == 4
    colours = list(dataset.COLOUR_NAMES) * 2
    images = sample(pipe, [f"a {c} circle" for c in colours], steps=10, guidance=5.0, seed=0)
    assert images.shape == (12, 3, 64, 64)
    hits = sum(p["colour"] == c for p, c in zip(load_judge().predict(images), colours))
    # chance is 1/6 (2 of 12); P(>= 6 of 12 by chance) < 1%
    assert hits >= 6, f"only {hits}/12 samples in the requested colour"


@needs_toy
@needs_judge
def test_model_toy_draws_an_unnamed_shape_from_its_description():
    """What TI has to find is in the model: the two shared words of a description select one unnamed shape."""
    from cloaklab.ops.models import load_pipeline
    from cloaklab.ops.toy.classifier import load_judge
    from cloaklab.ops.toy.evaluate import sample

    shapes = list(dataset.NOVEL_SHAPES) * 3
    prompts = [dataset.caption_for(s, "red", descriptors=dataset.DESCRIPTORS[s]) for s in shapes]
    images = sample(load_pipeline("toy"), prompts, steps=20, guidance=5.0, seed=0)
    hits = sum(p["shape"] == s for p, s in zip(load_judge().predict(images), shapes))
    # a mixture of the four unnamed shapes would be right 1/4 of the time: P(>= 8 of 12) < 0.3%
    assert hits >= 8, f"only {hits}/12 samples show the described shape"


def test_sd15_table1_makefile_dry_run(tmp_path):
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    folder = ROOT / "examples" / "sd15-table1"
    data = tmp_path / "NovelConcepts10"
    for concept in ("dog", "teapot"):
        (data / concept).mkdir(parents=True)
        (data / concept / "00.jpg").write_bytes(b"")
    result = subprocess.run([make, "-n", "-C", str(folder), f"DATA={data}", f"WORK={tmp_path / 'work'}",
                             "POISONS=none adm+", "DEFENCES=nominal szt", "table"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "cloak poison" in out and "-a adm+" in out and "--eps 16" in out
    assert "cloak train-ti" in out and "--preset szt" in out and "--steps 5000" in out and "--lr 0.0005" in out
    assert "cloak generate" in out and "objects24" in out and "cloak score --table" in out
    assert out.count("cloak train-ti") == 2 * 2 * 2  # concepts × poisons × defences


def test_toy_model_make_targets_train_then_continue_with_valid_flags(tmp_path):
    import shlex

    from cloaklab.ops.toy.train import build_parser

    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    out = tmp_path / "toy"
    result = subprocess.run([make, "-n", "-C", str(ROOT), f"TOY_OUT={out}", "TOY_ARGS=--threads 2", "toy-model",
                             "toy-model-continue"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    commands = [shlex.split(line.split("-m cloaklab.ops.toy.train", 1)[1])
                for line in result.stdout.replace("\\\n", " ").splitlines() if "cloaklab.ops.toy.train" in line]
    first, second = (build_parser().parse_args(args) for args in commands)
    assert first.out == str(out) and first.init_from is None and first.threads == 2
    assert first.vae_minutes + first.unet_minutes <= 90, "the from-scratch sitting must fit the 90-minute budget"
    if TOY_WEIGHTS.exists():  # the recipe's defaults are the ones the shipped weights were trained with
        import json

        shipped = TOY_WEIGHTS.parent
        assert first.attention_heads == json.loads((shipped / "unet" / "config.json").read_text())["attention_head_dim"]
        record = json.loads((shipped / "toy_train.json").read_text())
        assert first.novel_fraction == record["novel_fraction"] and "continued_from" not in record
    assert second.init_from == str(out) and second.out == f"{out}.next" and second.novel_fraction == 0.5
    assert f"mv {out}.next {out}" in result.stdout


def test_training_learning_rate_warms_up_then_decays_over_the_time_or_step_budget():
    from cloaklab.ops.toy.train import learning_rate

    assert learning_rate(1e-3, 0, 600, 0) == learning_rate(1e-3, 600, 600, 5000) == 1e-3  # constant by default
    warm = [learning_rate(1e-3, 0, 600, s, warmup=100, final_fraction=0.1) for s in (0, 49, 99, 500)]
    assert warm[0] == pytest.approx(1e-5) and warm[1] == pytest.approx(5e-4) and warm[2] == warm[3] == 1e-3
    decay = [learning_rate(1e-3, t, 600, 1000, warmup=100, final_fraction=0.1) for t in (0, 300, 600, 900)]
    assert decay[1] == pytest.approx(0.55e-3) and decay[2] == decay[3] == pytest.approx(1e-4)
    assert decay == sorted(decay, reverse=True)
    # on a GPU the step cap ends the stage long before the clock: the decay follows whichever budget ends first
    by_steps = [learning_rate(1e-3, 1, 600, s, final_fraction=0.1, max_steps=1000) for s in (0, 500, 1000)]
    assert by_steps[1] == pytest.approx(0.55e-3, rel=1e-2) and by_steps[2] == pytest.approx(1e-4)
    assert learning_rate(1e-3, 300, 600, 10, final_fraction=0.1, max_steps=1000) == pytest.approx(0.55e-3)


def test_training_recipe_calibrates_latents_and_continues_a_saved_model(tmp_path):
    """Two-step smoke runs (no real training): a fresh run sets the VAE scaling factor for unit-std latents; a
    continued run keeps the VAE and its factor, starts from the saved UNet and counts the steps on."""
    import json

    from cloaklab.ops.models import load_pipeline
    from cloaklab.ops.toy.train import ATTENTION_HEADS, calibrated_latents, main

    small = ["--num-images", "16", "--vae-steps", "0", "--unet-steps", "2", "--batch-size", "2", "--threads", "1"]
    main(["--out", str(tmp_path / "a"), "--attention-heads", "1", *small])
    first = json.loads((tmp_path / "a" / "toy_train.json").read_text())
    assert first["unet_steps"] == 2 and "continued_from" not in first
    pipe = load_pipeline(str(tmp_path / "a"))
    def heads(unet) -> int:
        return unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.heads

    assert heads(pipe.unet) == 1 and ATTENTION_HEADS == 2  # the flag reaches the model; 2 is the fast default
    images = torch.from_numpy(dataset.as_arrays(dataset.generate(16))[0]).permute(0, 3, 1, 2).float() / 127.5 - 1
    means, _ = calibrated_latents(pipe.vae, images, "cpu", calibrate=False)
    assert pipe.vae.config.scaling_factor == pytest.approx(first["scaling_factor"])
    assert means.std().item() == pytest.approx(1.0, rel=0.02)  # fp16 weights on disk: not bit-exact

    main(["--out", str(tmp_path / "b"), "--init-from", str(tmp_path / "a"), "--novel-fraction", "0.25", *small])
    second = json.loads((tmp_path / "b" / "toy_train.json").read_text())
    assert second["unet_steps"] == 4 and second["continued_from"]["unet_steps"] == 2
    assert second["novel_fraction"] == 0.25
    assert second["continued_from"]["novel_fraction"] == dataset.NOVEL_FRACTION == 0.5
    assert second["scaling_factor"] == first["scaling_factor"]
    cont = load_pipeline(str(tmp_path / "b"))
    assert heads(cont.unet) == 1, "a continued model keeps its architecture"
    for name, param in pipe.vae.state_dict().items():
        assert torch.equal(param, cont.vae.state_dict()[name])
    assert not all(torch.equal(param, cont.unet.state_dict()[name]) for name, param in pipe.unet.state_dict().items())


def test_the_toy_trainer_never_replaces_a_folder_it_did_not_write(tmp_path):
    from cloaklab.ops.errors import UsageError
    from cloaklab.ops.toy.train import check_replaceable

    check_replaceable(tmp_path / "missing")  # nothing there: fine
    mine = tmp_path / "photos"
    mine.mkdir()
    (mine / "a.png").write_bytes(b"user data")
    with pytest.raises(UsageError, match="not a toy model"):
        check_replaceable(mine)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError):
        check_replaceable(tmp_path / "file")
    toy = tmp_path / "weights"
    toy.mkdir()
    (toy / "toy_train.json").write_text("{}")
    check_replaceable(toy)  # an earlier output of the script may be replaced
