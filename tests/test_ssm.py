"""``cloak ssm``: SSM (Eq. 6) zero/positive, R (Eq. 16), spectra, JPEG histograms, profiles, and the command."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cloaklab.tests.conftest import photo, photo_tensor


@pytest.fixture(scope="module")
def dog_prompt(tiny_pipe):
    from cloaklab.ops import diffusion, ssm

    ids = ssm.prompt_ids(tiny_pipe, "a dog on the grass")
    latents = diffusion.encode_images(tiny_pipe.vae, photo_tensor("chelsea")[None].to(tiny_pipe.device))
    return ids, latents


def test_ssm_is_exactly_zero_for_identical_replacement_and_positive_otherwise(tiny_pipe, dog_prompt):
    from cloaklab.ops import ssm

    ids, latents = dog_prompt
    dog, grass = ssm.token_positions(tiny_pipe, ids, "dog"), ssm.token_positions(tiny_pipe, ids, "grass")
    same = ids[0, dog]  # the "random" dictionary entry is the original embedding
    maps = ssm.semantic_sensitivity(tiny_pipe, latents, ids, [dog], [100, 700], samples=2, candidates=same)
    assert maps.shape == (2, 1, 8, 8)
    assert torch.count_nonzero(maps) == 0
    maps = ssm.semantic_sensitivity(tiny_pipe, latents, ids, [dog, grass], [100, 700], samples=1,
                                    generator=torch.Generator().manual_seed(1))
    assert maps.shape == (2, 2, 8, 8) and bool((maps > 0).all())
    again = ssm.semantic_sensitivity(tiny_pipe, latents, ids, [dog, grass], [100, 700], samples=1,
                                     generator=torch.Generator().manual_seed(1), batch_timesteps=2)
    assert torch.allclose(maps, again, rtol=1e-3, atol=1e-8)  # deterministic for a seed, whatever the batching
    single = ssm.semantic_sensitivity(tiny_pipe, latents, ids, [dog, grass], [100, 700], samples=1,
                                      generator=torch.Generator().manual_seed(1), batch_timesteps=1)
    assert torch.allclose(maps, single, rtol=1e-3, atol=1e-8)  # float32 batching noise only


def test_ssm_equals_the_hand_computed_map_of_a_linear_stand_in():
    """Eq. 6 on a stand-in whose answer is known: text encoder = embedding lookup E[ids]; denoiser output
    ε(z, c)[ch, y, x] = z[ch, y, x] + w[y, x] · mean_L(c)[ch]. Replacing token n (id a) by id k moves mean_L(c) by
    (E[k] − E[a]) / L, so SSM[y, x] = w[y, x]² · Σ_ch ((E[k, ch] − E[a, ch]) / L)² — for every timestep and noise
    draw, as long as c and c_Δn see the same z_t (a different ε per variant, a mean over channels or a missing square
    would all fail)."""
    from types import SimpleNamespace

    from cloaklab.ops import ssm
    from cloaklab.ops.models.shaped import sd15_scheduler

    channels, length, vocab = 4, 5, 12
    table = torch.randn(vocab, channels, generator=torch.Generator().manual_seed(0))
    weight = torch.arange(1.0, 10.0).reshape(3, 3) / 4

    class Encoder:
        device = torch.device("cpu")

        def __call__(self, ids):
            return (table[ids],)

    class Denoiser:
        dtype = torch.float32

        def __call__(self, z, t, encoder_hidden_states):
            return SimpleNamespace(sample=z + weight * encoder_hidden_states.mean(1)[:, :, None, None])

    pipe = SimpleNamespace(unet=Denoiser(), text_encoder=Encoder(), scheduler=sd15_scheduler())
    ids = torch.tensor([[0, 3, 7, 2, 1]])
    latents = torch.randn(1, channels, 3, 3, generator=torch.Generator().manual_seed(1))
    maps = ssm.semantic_sensitivity(pipe, latents, ids, [[2], [1, 3]], [100, 900], samples=3,
                                    candidates=torch.tensor([9]), generator=torch.Generator().manual_seed(2))
    single = ((table[9] - table[7]) / length).pow(2).sum()  # position 2: id 7 → 9
    double = ((2 * table[9] - table[3] - table[2]) / length).pow(2).sum()  # positions 1 and 3 together
    expected = torch.stack([weight**2 * single, weight**2 * double])
    torch.testing.assert_close(maps, expected.expand(2, -1, -1, -1), atol=1e-5, rtol=1e-4)


def test_ratio_by_hand():
    """R = Σ(SSM ⊙ M) / Σ SSM (Eq. 16) on a 2×2 map: (1·1 + 4·1)/10 and (0.5·1)/10 with a soft mask."""
    from cloaklab.ops.ssm import sensitivity_ratio

    ssm_map = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert sensitivity_ratio(ssm_map, torch.tensor([[1.0, 0.0], [0.0, 1.0]])).item() == pytest.approx(0.5)
    assert sensitivity_ratio(ssm_map, torch.tensor([[0.5, 0.0], [0.0, 0.0]])).item() == pytest.approx(0.05)
    assert sensitivity_ratio(ssm_map, torch.tensor([[0.0, 1.0], [1.0, 0.0]])).item() == pytest.approx(0.5)
    assert sensitivity_ratio(ssm_map, torch.tensor([[0.0, 0.0], [1.0, 1.0]])).item() == pytest.approx(0.7)


def test_ratio_is_a_share_and_one_for_full_mask():
    from cloaklab.ops.ssm import sensitivity_ratio

    maps = torch.rand(3, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(8, 8)
    mask[2:6, 1:5] = 1
    ratio = sensitivity_ratio(maps, mask)
    assert ratio.shape == (3, 2) and bool(((ratio >= 0) & (ratio <= 1)).all())
    assert torch.allclose(ratio + sensitivity_ratio(maps, 1 - mask), torch.ones(3, 2))
    assert torch.allclose(sensitivity_ratio(maps, torch.ones(8, 8)), torch.ones(3, 2))
    concentrated = torch.zeros(8, 8)
    concentrated[3, 3] = 5.0
    assert sensitivity_ratio(concentrated, mask).item() == 1.0


def test_white_noise_spectrum_is_flat():
    from cloaklab.ops.ssm import radial_power_spectrum

    noise = torch.randn(256, 32, 32, generator=torch.Generator().manual_seed(0)) * 2.0
    spectrum = radial_power_spectrum(noise)
    assert spectrum.shape == (17,)
    assert torch.allclose(spectrum[1:], torch.full_like(spectrum[1:], 4.0), rtol=0.1)
    smooth = torch.nn.functional.avg_pool2d(noise[:, None], 3, 1, 1)[:, 0]  # low-pass: high radii lose power
    assert radial_power_spectrum(smooth)[-1] < 0.2 * radial_power_spectrum(smooth)[1]


def test_jpeg_turns_bimodal_perturbation_unimodal():
    from cloaklab.ops.ssm import perturbation_histogram

    clean = photo_tensor("coffee", 64) * 0.8 + 0.1  # away from 0/1 so ±ε is never clipped
    signs = torch.randint(0, 2, clean.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    poisoned = (clean + signs * 8 / 255).round(decimals=6)
    histogram = perturbation_histogram([clean], [poisoned], quality=25, limit=20)
    assert histogram["poisoned"]["modes"] == 2
    assert histogram["jpeg"]["modes"] == 1
    counts = np.array(histogram["jpeg"]["counts"])
    assert len(counts) == 41 and abs(int(counts.argmax()) - 20) <= 3  # the single mode sits near zero


def test_mask_loss_profile_splits_the_loss(tiny_pipe, dog_prompt):
    from cloaklab.ops import diffusion, ssm

    _, latents = dog_prompt
    context = diffusion.encode_prompts(tiny_pipe, ["a dog on the grass"])
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :3, :] = 1
    out = ssm.loss_profile(tiny_pipe, latents, context, [50, 500], 2, torch.Generator().manual_seed(0), mask)
    inside_share = 3 / 8
    combined = inside_share * out["inside"] + (1 - inside_share) * out["outside"]
    assert np.allclose(combined, out["loss"], rtol=1e-4)
    assert ssm.profile_timesteps(1000) == list(range(0, 1000, 50)) + [999]


def test_gradient_profile_measures_the_new_token(fresh_tiny_pipe):
    from cloaklab.ops import diffusion, ssm

    pipe = fresh_tiny_pipe
    ssm.ensure_token(pipe, "<R*>", init_word="dog")
    table = pipe.text_encoder.get_input_embeddings().weight
    new_id = len(pipe.tokenizer) - 1
    dog_id = pipe.tokenizer("dog", add_special_tokens=False).input_ids[0]
    assert torch.equal(table[new_id], table[dog_id])  # an untrained token starts from its init word
    ids = ssm.prompt_ids(pipe, "a <R*> on the grass")
    positions = ssm.token_positions(pipe, ids, "<R*>")
    assert len(positions) == 1 and int(ids[0, positions[0]]) == new_id
    latents = diffusion.encode_images(pipe.vae, photo_tensor("astronaut")[None].to(pipe.device))
    grads = ssm.gradient_profile(pipe, latents, ids, positions, [300, 600], 1, torch.Generator().manual_seed(0))
    again = ssm.gradient_profile(pipe, latents, ids, positions, [300, 600], 1, torch.Generator().manual_seed(0))
    assert grads.shape == (1, 2, 1) and (grads > 0).all() and np.array_equal(grads, again)
    # the norm is that of the gradient w.r.t. the token's embedding row (it appears once in the prompt)
    table.requires_grad_(True)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0)).to(latents.device)
    loss = diffusion.diffusion_loss(pipe.unet, pipe.scheduler, latents, diffusion.encode_prompts(
        pipe, ["a <R*> on the grass"]), torch.tensor([300]), noise).sum()
    (row_grad,) = torch.autograd.grad(loss, table)
    assert float(row_grad[new_id].norm()) == pytest.approx(grads[0, 0, 0], rel=1e-4)


def test_ssm_cli_writes_maps_ratio_and_resumes(cli, tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    photo("astronaut", 64).save(images / "astronaut.png")
    (images / "broken.png").write_bytes(b"nope")
    from PIL import Image

    Image.fromarray(np.full((64, 64), 255, np.uint8)).save(masks / "astronaut.png")
    out = tmp_path / "maps"
    args = ["ssm", images, "-o", out, "--model", "tiny", "--prompt", "a <R*> on the grass", "--token", "<R*>",
            "--token", "grass", "--timesteps", "200,800", "--samples", "1", "--masks", masks]
    code, stdout, err = cli(args)
    assert code == 3, err  # the broken file is rejected, the photo is mapped
    maps = np.load(out / "astronaut.npy")
    assert maps.shape == (2, 2, 8, 8) and (maps >= 0).all() and maps.sum() > 0
    record = json.loads((out / "cloak.json").read_text())["files"]["astronaut.png"]
    assert record["stats"]["tokens"] == ["<R*>", "grass"]
    assert np.allclose(record["stats"]["R"], 1.0)  # an all-ones mask holds the whole map
    assert (out / "astronaut.png").stat().st_size > 0
    code, stdout, err = cli([*args, "--dry-run", "--json"])  # the plan's resume decision is the run's
    plan = json.loads(stdout)
    assert code == 0 and plan["skipped"] == ["astronaut.png"] and plan["would_write"] == []
    assert [entry["file"] for entry in plan["rejected"]] == [str(images / "broken.png")]
    code, _, err = cli(args)
    assert "1 skipped" in err


def test_ssm_cli_loss_profile_with_clean_series(cli, tmp_path):
    poisoned, clean = tmp_path / "poisoned", tmp_path / "clean"
    poisoned.mkdir()
    clean.mkdir()
    rng = np.random.default_rng(0)
    for name in ("astronaut", "rocket"):
        base = np.asarray(photo(name, 64))
        photo(name, 64).save(clean / f"{name}.jpg", quality=98)
        noisy = np.clip(base.astype(int) + rng.choice([-8, 8], base.shape), 0, 255).astype(np.uint8)
        from PIL import Image

        Image.fromarray(noisy).save(poisoned / f"{name}.png")
    out = tmp_path / "profile"
    code, _, err = cli(["ssm", poisoned, "-o", out, "--model", "tiny", "--profile", "loss", "--clean", clean,
                        "--samples", "1", "--prompt", "a photo", "--timesteps", "0,500,1000"])
    assert code == 0, err
    data = json.loads((out / "profile-loss.json").read_text())
    assert data["timesteps"] == [0, 500, 999] and set(data["series"]) == {"images", "clean"}
    series = data["series"]["images"]
    assert all(a <= b <= c for a, b, c in zip(series["q25"], series["median"], series["q75"]))
    assert (out / "profile-loss.png").stat().st_size > 0
    manifest = json.loads((out / "cloak.json").read_text())
    assert manifest["params"]["profile"] == "loss" and manifest["profile_loss"]["images"] == ["astronaut.png",
                                                                                              "rocket.png"]


def test_multi_vector_token_expands_to_all_its_rows():
    from cloaklab.ops.models.tokenizer import clip_tokenizer
    from cloaklab.ops.prompts import expand_multi_vector

    tokenizer = clip_tokenizer()
    tokenizer.add_tokens(["<R*>", "<R*>_1", "<R*>_2"])
    assert expand_multi_vector(tokenizer, "a <R*> on the grass") == "a <R*> <R*>_1 <R*>_2 on the grass"
    assert expand_multi_vector(tokenizer, "a dog") == "a dog"


def test_mask_loss_profile_from_training_logs(cli, tmp_path):
    for name, rate in (("clean", 0.5), ("adm", 0.9)):
        folder = tmp_path / name
        folder.mkdir()
        lines = [{"step": s, "loss": 1.0, "loss_inside": 2.0 * rate ** s, "loss_outside": 1.0} for s in (1, 2, 3)]
        (folder / "train_log.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    out = tmp_path / "prof"
    code, _, err = cli(["ssm", tmp_path / "clean" / "train_log.jsonl", tmp_path / "adm" / "train_log.jsonl",
                        "-o", out, "--profile", "mask-loss"])
    assert code == 0, err
    data = json.loads((out / "profile-mask-loss.json").read_text())
    assert data["series"]["clean"]["inside_relative"] == pytest.approx([1.0, 0.5, 0.25])
    assert data["series"]["adm"]["outside_relative"] == [1.0, 1.0, 1.0]
    assert (out / "profile-mask-loss.png").stat().st_size > 0
    code, _, err = cli(["ssm", tmp_path / "missing.jsonl", "-o", out, "--profile", "mask-loss"])
    assert code == 2 and "missing.jsonl" in err


def test_ssm_settings_parse_the_command_line_and_refuse_what_cannot_run(tmp_path):
    from cloaklab.ops.commands.ssm import SsmSettings, schedule_timesteps
    from cloaklab.ops.errors import UsageError

    given = SsmSettings(token="dog", timesteps="200, 1000")
    assert given == SsmSettings(token=["dog"], timesteps=[200, 1000])
    assert schedule_timesteps(given, 1000) == [200, 999]  # 1000 = the last index
    assert schedule_timesteps(SsmSettings(), 1000) == [100, 200, 300, 400, 500, 600, 700, 800, 999]  # Fig. 3
    assert schedule_timesteps(SsmSettings(profile="loss"), 1000) == list(range(0, 1000, 50)) + [999]  # Fig. 4
    with pytest.raises(UsageError, match="0..100"):
        schedule_timesteps(given, 100)
    embedding = tmp_path / "learned_embeds.safetensors"
    embedding.write_bytes(b"")
    for bad, flag in (({"timesteps": "2x"}, "--timesteps"), ({"timesteps": "-5"}, "--timesteps"),
                      ({"embedding": embedding}, "--embedding needs --token"), ({"profile": "grad"}, "--token"),
                      ({"profile": "jpeg-hist"}, "--clean"), ({"profile": "nope"}, "--profile"),
                      ({"quality": 0}, "--quality"), ({"samples": 0}, "--samples")):
        with pytest.raises(UsageError, match=flag):
            SsmSettings(**bad)
