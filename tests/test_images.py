"""In-memory single images (``cloaklab.poison_image`` / ``purify_image``): the pixels of the PNG the folder command
writes for the same file, a loaded pipeline reused without a second load, and the folder-only refusals."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import cloaklab
from cloaklab.ops import images, models
from cloaklab.ops.commands import poison as poison_command
from cloaklab.ops.commands import purify as purify_command
from cloaklab.ops.errors import UsageError
from cloaklab.tests.conftest import photo

POISON = {"attack": "adm+", "steps": 2, "eps": 6, "step_size": 2, "resolution": 32, "eval_draws": 0, "seed": 5}


@pytest.fixture
def folder(tmp_path):
    """An RGB PNG larger than the working size on both sides (optimized at native size) and a gray JPEG that is
    not (working size, then mapped back): both of the poison run's paths."""
    folder = tmp_path / "in"
    folder.mkdir()
    photo("astronaut").resize((48, 40)).save(folder / "astronaut.png")
    photo("camera").convert("L").resize((30, 36)).save(folder / "camera.jpg", quality=90)
    return folder


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


def test_poison_image_gives_the_folder_files_pixels(folder, tmp_path, tiny_pipe):
    out = tmp_path / "out"
    settings = poison_command.PoisonSettings.from_kwargs(model="tiny", **POISON)
    summary = poison_command.run(settings, folder, out, pipe=tiny_pipe)
    assert sorted(summary.done) == ["astronaut.png", "camera.png"]
    options = {key: value for key, value in POISON.items() if key not in ("attack", "seed")}
    for source in ("astronaut.png", "camera.jpg"):
        with Image.open(folder / source) as original, Image.open(out / source.replace(".jpg", ".png")) as written:
            cloaked = cloaklab.poison_image(original, "adm+", model=tiny_pipe, seed=5, name=source, **options)
            assert cloaked.size == original.size and cloaked.mode == written.mode == original.mode
            assert np.array_equal(_pixels(cloaked), _pixels(written)), source
            assert np.abs(_pixels(cloaked).astype(int) - np.asarray(original).astype(int)).max() <= 6
            # the folder's per-file seed matters: the image's own seed (no name) draws another random start
            other = cloaklab.poison_image(original, "adm+", model=tiny_pipe, seed=5, **options)
            assert not np.array_equal(_pixels(other), _pixels(written))


def test_purify_image_gives_the_folder_files_pixels(folder, tmp_path):
    out = tmp_path / "out"
    settings = purify_command.PurifySettings.from_kwargs(method="tvm", iters=2, drop=0.3, seed=2)
    purify_command.run(settings, folder, out)
    for source in ("astronaut.png", "camera.jpg"):
        with Image.open(folder / source) as original, Image.open(out / source.replace(".jpg", ".png")) as written:
            cleaned = cloaklab.purify_image(original, "tvm", seed=2, name=source, iters=2, drop=0.3)
            assert cleaned.size == original.size and cleaned.mode == written.mode
            assert np.array_equal(_pixels(cleaned), _pixels(written)), source
            unnamed = cloaklab.purify_image(original, "tvm", seed=2, iters=2, drop=0.3)
            assert not np.array_equal(_pixels(unnamed), _pixels(written))  # tvm's dropped pixels follow the seed


def test_a_passed_pipeline_is_reused_and_a_name_loads_once(monkeypatch, tiny_pipe):
    calls = []
    real = models.load_pipeline

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(models, "load_pipeline", counting)
    images.clear_cache()
    image = photo("astronaut", 32)
    first = cloaklab.poison_image(image, model=tiny_pipe, steps=1, eval_draws=0)
    second = cloaklab.poison_image(image, model=tiny_pipe, steps=1, eval_draws=0)
    assert calls == [] and np.array_equal(_pixels(first), _pixels(second))
    by_name = [cloaklab.poison_image(image, model="tiny", steps=1) for _ in range(2)]
    assert len(calls) == 1  # the named model is loaded once and kept
    assert np.array_equal(_pixels(by_name[0]), _pixels(first))  # the same tiny weights, the same pixels
    images.clear_cache()


def test_purifier_networks_are_loaded_once_or_taken_as_given(monkeypatch):
    from cloaklab.ops.purify import regen

    calls = []
    real = regen.load_models

    def counting(**kwargs):
        calls.append(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(regen, "load_models", counting)
    images.clear_cache()
    image = photo("coffee", 32)
    settings = {"model": "tiny", "steps": 4, "t": 200}
    once = cloaklab.purify_image(image, "regen", **settings)
    again = cloaklab.purify_image(image, "regen", **settings)
    assert len(calls) == 1 and np.array_equal(_pixels(once), _pixels(again))
    given = real(device="cpu", dtype=None, model="tiny")
    assert np.array_equal(_pixels(cloaklab.purify_image(image, "regen", models=given, **settings)), _pixels(once))
    assert len(calls) == 1
    images.clear_cache()


@pytest.mark.parametrize("call, message", [
    (lambda image: cloaklab.poison_image(image, "aspl", model="tiny"), "set-level"),
    (lambda image: cloaklab.poison_image(image, model="tiny", recursive=True), "folders only"),
    (lambda image: cloaklab.purify_image(image, "jpeg", shard="1/2"), "folders only"),
    (lambda image: cloaklab.poison_image(image, model="tiny", eps=300), "--eps"),
    (lambda image: cloaklab.purify_image(image, "jpeg", quality=0), "--quality"),
])
def test_refusals_name_the_problem(call, message):
    with pytest.raises(UsageError, match=message):
        call(photo("rocket", 16))
