"""Native-size protection: the mimic's resize is Pillow's, its gradient is right, and the protection survives it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cloaklab.ops.attacks import get_attack
from cloaklab.ops.attacks.resample import NativeView, resize
from cloaklab.ops.attacks.setlevel import ProtectedSet
from cloaklab.ops.commands.poison import poison_folder
from cloaklab.ops.io import collect_inputs, read_back
from cloaklab.ops.manifest import Manifest
from cloaklab.tests.conftest import photo

PIL_FILTERS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "lanczos": Image.LANCZOS, "area": Image.BOX}


@pytest.mark.parametrize("name", sorted(PIL_FILTERS))
@pytest.mark.parametrize("size, box", [((24, 30), None), ((24, 30), (3.5, 1.25, 57.0, 44.75)), ((11, 7), None)])
def test_resize_matches_pillow(name, size, box):
    array = np.random.default_rng(1).random((48, 60)).astype(np.float32)
    expected = np.asarray(Image.fromarray(array, mode="F").resize((size[1], size[0]), PIL_FILTERS[name], box=box))
    got = resize(torch.from_numpy(array)[None, None], size, name, box)[0, 0].numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_resize_gradient_is_the_adjoint():
    x = torch.rand(1, 2, 20, 26, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: resize(t, (7, 9), "lanczos", (1.5, 0.5, 25.0, 19.0)), (x,))


def test_view_draws_from_the_given_generators_and_keeps_working_size_images():
    view = NativeView((8, 8), crop_probability=0.5)
    photos = torch.rand(2, 3, 20, 20)
    first = view(photos, [torch.Generator().manual_seed(s) for s in (1, 2)])
    again = view(photos, [torch.Generator().manual_seed(s) for s in (1, 2)])
    assert first.shape == (2, 3, 8, 8) and torch.equal(first, again)
    assert not view.applies(torch.rand(1, 3, 8, 8)) and view.applies(photos)


def test_set_level_pgd_batches_the_whole_set_by_default():
    images = [torch.rand(3, 16, 16) for _ in range(5)] + [torch.rand(3, 8, 16)]
    pset = ProtectedSet(images, None, torch.device("cpu"))
    assert pset.groups(None) == [[0, 1, 2, 3, 4], [5]]
    assert pset.groups(2) == [[0, 1], [2, 3], [4], [5]]


def _loss(pipe, images: torch.Tensor, draws: int = 24) -> float:
    """Mean ε-MSE of the tiny model on fixed (t, ε) draws — plain diffusers calls, no cloaklab code."""
    generator = torch.Generator().manual_seed(1234)
    vae, unet, scheduler = pipe.vae, pipe.unet, pipe.scheduler
    ids = pipe.tokenizer(["a photo"], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        text = pipe.text_encoder(ids)[0].expand(images.shape[0], -1, -1)
        latents = vae.encode(images * 2 - 1).latent_dist.mean * vae.config.scaling_factor
        total = 0.0
        for _ in range(draws):
            t = torch.randint(0, scheduler.config.num_train_timesteps, (images.shape[0],), generator=generator)
            noise = torch.randn(latents.shape, generator=generator)
            noisy = scheduler.add_noise(latents, noise, t)
            total += float(((unet(noisy, t, encoder_hidden_states=text).sample - noise) ** 2).mean()) / draws
    return total


def _as_tensor(arrays) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.asarray(a, dtype=np.float32) / 255).permute(2, 0, 1) for a in arrays])


def _poison(folder, out, pipe, resolution, **options):
    spec = get_attack("adm+")
    params = spec.resolve({"eps": 8.0, "step_size": 1.0, "steps": 12})
    items, _ = collect_inputs([str(folder)])
    poison_folder(items, out, "adm+", params, pipe=pipe, manifest=Manifest(out, "poison", params), seed=0,
                  resolution=resolution, eval_draws=0, **options)
    return {item.output_rel.name: read_back(out / item.output_rel) for item in items}


def test_native_size_protection_survives_the_mimics_bicubic_resize(tmp_path, tiny_pipe):
    names = ("astronaut", "coffee")
    native_dir, work_dir = tmp_path / "native", tmp_path / "work"
    native_dir.mkdir()
    work_dir.mkdir()
    natives = {}
    for name in names:
        big = photo(name).resize((160, 160), Image.LANCZOS)
        big.save(native_dir / f"{name}.png")
        big.resize((64, 64), Image.BICUBIC).save(work_dir / f"{name}.png")
        natives[f"{name}.png"] = np.asarray(big)
    at_work = _poison(work_dir, tmp_path / "out_work", tiny_pipe, 64)
    at_native = _poison(native_dir, tmp_path / "out_native", tiny_pipe, 64)
    keys = sorted(natives)
    for key in keys:  # the budget holds exactly on the saved bytes
        assert np.abs(at_native[key].astype(int) - natives[key].astype(int)).max() <= 8
        assert at_native[key].shape == natives[key].shape
    clean_work = _as_tensor([np.asarray(Image.open(work_dir / k).convert("RGB")) for k in keys])
    rise_work = _loss(tiny_pipe, _as_tensor([at_work[k] for k in keys])) - _loss(tiny_pipe, clean_work)
    shrink = lambda a: np.asarray(Image.fromarray(a).resize((64, 64), Image.BICUBIC))  # the mimic's resize
    clean_seen = _as_tensor([shrink(natives[k]) for k in keys])
    rise_native = _loss(tiny_pipe, _as_tensor([shrink(at_native[k]) for k in keys])) - _loss(tiny_pipe, clean_seen)
    assert rise_work > 0.01
    # measured: 0.99 optimized at native size; 0.79 with --working-size (the old upsampled path), which this fails
    assert rise_native >= 0.9 * rise_work, (rise_native, rise_work)
