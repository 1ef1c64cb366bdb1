"""Set-level poisons (aspl, fsmg, e-aspl, metacloak, caat, ace, inmark) and the DreamBooth surrogate trainer.

Tiny model, 32-px photos, a handful of steps: each test checks a behaviour that would break if the method were
implemented wrongly (budget, determinism, the alternation schedule, which weights train, the DCT subspace, the
class-image cache, the DreamBooth loss algebra, the inverse-HVP solver)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from cloaklab.tests.conftest import photo_tensor

SIZE = 32


@pytest.fixture(scope="module")
def pipe(tiny_pipe):
    """The shared tiny pipeline: set-level attacks train copies, never the caller's model (checked below)."""
    return tiny_pipe


@pytest.fixture(scope="module")
def class_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("class-images")


def photos(size: int = SIZE) -> list[torch.Tensor]:
    """Two real photos: one square, one non-square (size × 1.25 size), in [0, 1]."""
    wide = size * 5 // 4
    coffee = F.interpolate(photo_tensor("coffee", wide)[None], size=(size, wide), mode="bilinear")[0].clamp(0, 1)
    return [photo_tensor("astronaut", size), coffee]


def generators(seed: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(2)]


FAST = {
    "aspl": {"rounds": 2, "surrogate_steps": 1, "pgd_steps": 2},
    "fsmg": {"surrogate_steps": 2, "steps": 3},
    "e-aspl": {"rounds": 1, "surrogate_steps": 1, "pgd_steps": 2, "ensemble": "tiny"},
    "metacloak": {"trials": 1, "inner_iterations": 1, "pool_steps": 2, "pool_interval": 2, "pgd_steps": 2,
                  "unroll_steps": 1},
    "caat": {"steps": 3},
    "ace": {"epochs": 2, "pgd_steps": 2, "lora_steps": 1},
    "inmark": {"epochs": 2, "iterations": 2, "surrogate_steps": 1, "hvp_steps": 2},
}


def run_attack(name, pipe, class_dir, seed=0, size=SIZE, **overrides):
    from cloaklab.ops.attacks import get_attack
    from cloaklab.ops.attacks.engine import AttackModels

    spec = get_attack(name)
    fast = FAST.get(name) or FAST[name.removeprefix("lf-")]
    params = spec.resolve({**fast, "eps": 8.0, "step_size": 2.0, **overrides})
    if "num_class_images" in params:
        params.update(num_class_images=2, class_steps=2, class_dir=str(class_dir))
    return spec.load().attack_set(photos(size), models=AttackModels(pipe), generators=generators(seed),
                                  **spec.fixed, **params)


# ------------------------------------------------------------------------------------------- every attack
@pytest.mark.parametrize("name", list(FAST))
def test_budget_holds_and_shapes_kept(name, pipe, class_dir):
    results = run_attack(name, pipe, class_dir)
    assert len(results) == 2
    for result, clean in zip(results, photos()):
        assert result.images.shape == (1, *clean.shape)
        delta = (result.images[0].cpu() - clean).abs().max().item()
        assert 0 < delta <= 8 / 255 + 1e-6
        assert result.images.min() >= 0 and result.images.max() <= 1
        assert result.loss_start.shape == result.loss_end.shape == (1,)


@pytest.mark.parametrize("name, overrides", [("aspl", {"rounds": 1}),
                                             ("inmark", {"iterations": 1, "influence": "identity"})])
def test_deterministic_for_a_seed(name, overrides, pipe, class_dir):
    first = run_attack(name, pipe, class_dir, seed=3, **overrides)
    second = run_attack(name, pipe, class_dir, seed=3, **overrides)
    other = run_attack(name, pipe, class_dir, seed=4, **overrides)
    for a, b, c in zip(first, second, other):
        assert torch.equal(a.images, b.images)
        assert not torch.equal(a.images, c.images)


def test_registry_defaults_match_modules():
    import importlib

    from cloaklab.ops.attacks import get_attack

    for name in FAST:
        spec = get_attack(name)
        assert spec.set_level
        module_defaults = importlib.import_module(f"cloaklab.ops.attacks.{spec.module}").DEFAULTS
        for key, value in module_defaults.items():
            assert spec.defaults[key] == value, (name, key)
    # Anti-DreamBooth's 0.05 / 0.005 in [-1, 1] units, converted to pixel units /255
    assert get_attack("aspl").defaults["eps"] == pytest.approx(0.05 / 2 * 255)
    assert get_attack("aspl").defaults["step_size"] == pytest.approx(0.005 / 2 * 255)


def test_ace_pulls_toward_target_and_fsmg_raises_surrogate_loss(pipe, class_dir):
    ace = run_attack("ace", pipe, class_dir, epochs=2, pgd_steps=4)
    assert all(r.loss_end.item() < r.loss_start.item() for r in ace)  # target loss goes down
    # 64 px: the calibrated tiny model's native size (at 4×4 latents the loss barely moves)
    fsmg = run_attack("fsmg", pipe, class_dir, size=64, surrogate_steps=1, steps=4)
    assert all(r.loss_end.item() > r.loss_start.item() for r in fsmg)  # denoising loss of θ_clean goes up


# ---------------------------------------------------------------------------------------- the schedules
@pytest.fixture
def spy(monkeypatch):
    """Record every DreamBooth step (with the images it trained on) and every PGD step, in order."""
    from cloaklab.ops.attacks import inmark, setlevel
    from cloaklab.ops.train.dreambooth import DreamBoothTrainer

    events: list[tuple[str, object]] = []
    original_step, original_pgd = DreamBoothTrainer.step, setlevel.pgd_step

    def step(self, instance_images):
        events.append(("train", instance_images.detach().cpu().clone()))  # compared with CPU photos
        return original_step(self, instance_images)

    def pgd_step(images, grad, clean, **kw):
        events.append(("pgd", (grad.detach().clone(), kw)))
        return original_pgd(images, grad, clean, **kw)

    monkeypatch.setattr(DreamBoothTrainer, "step", step)
    monkeypatch.setattr(setlevel, "pgd_step", pgd_step)
    monkeypatch.setattr(inmark, "pgd_step", pgd_step)  # its self-influence steps
    return events


def test_aspl_alternates_as_specified(spy, pipe, class_dir):
    from cloaklab.ops.attacks.setlevel import square_crops

    run_attack("aspl", pipe, class_dir, rounds=2, surrogate_steps=2, pgd_steps=3)
    kinds = [kind for kind, _ in spy]
    one_round = ["train"] * 2 + ["pgd"] * 3 * 2 + ["train"] * 2  # 2 shapes → 2 minibatches per PGD step
    assert kinds == one_round * 2
    clean = square_crops(photos(), SIZE)
    trained_on = [data for kind, data in spy if kind == "train"]
    # f′ learns from clean set A; f learns from the perturbed set
    assert all(torch.equal(t, clean) for t in trained_on[0:2] + trained_on[4:6])
    assert not any(torch.equal(t, clean) for t in trained_on[2:4] + trained_on[6:8])


def test_fsmg_trains_first_then_attacks_a_fixed_model(spy, pipe, class_dir):
    from cloaklab.ops.attacks.setlevel import square_crops

    run_attack("fsmg", pipe, class_dir, surrogate_steps=3, steps=4)
    kinds = [kind for kind, _ in spy]
    assert kinds == ["train"] * 3 + ["pgd"] * 4 * 2
    clean = square_crops(photos(), SIZE)
    assert all(torch.equal(data, clean) for kind, data in spy if kind == "train")


def test_inmark_lowfreq_steps_use_the_dct_block(spy, pipe, class_dir):
    from cloaklab.ops.attacks.lowfreq import highfreq_energy

    run_attack("inmark", pipe, class_dir, epochs=1, iterations=2, lf_ratio=0.25)
    steps = [data for kind, data in spy if kind == "pgd"]
    assert len(steps) == 2 * 2
    for grad, kw in steps:
        projected = kw["grad_transform"](grad)
        assert highfreq_energy(projected, 0.25).max() < 1e-6  # the step direction lies in the kept block
        assert highfreq_energy(grad, 0.25).min() > 0.05  # … while the raw gradient did not


def test_inmark_alternates_lowfreq_and_influence_epochs(spy, pipe, class_dir):
    run_attack("inmark", pipe, class_dir, epochs=2, iterations=1, surrogate_steps=1, influence="identity")
    kinds = [kind for kind, _ in spy]
    # epoch 0: DreamBooth step, LF-PGD (2 minibatches); epoch 1: DreamBooth step, influence step per image
    assert kinds == ["train", "pgd", "pgd", "train", "pgd", "pgd"]
    influence_steps = [data[1] for kind, data in spy if kind == "pgd"][2:]
    assert all(kw.get("grad_transform") is None for kw in influence_steps)


def test_caat_updates_only_cross_attention_kv(monkeypatch, pipe, class_dir):
    from cloaklab.ops.attacks import caat

    captured = {}
    original = caat.base_surrogate

    def capture(p):
        captured["surrogate"] = original(p)
        return captured["surrogate"]

    monkeypatch.setattr(caat, "base_surrogate", capture)
    before_unet = copy.deepcopy(pipe.unet.state_dict())
    before_text = copy.deepcopy(pipe.text_encoder.state_dict())
    run_attack("caat", pipe, class_dir, steps=3, lr=1e-3)
    trained = captured["surrogate"]
    changed = {k for k, v in trained.unet.state_dict().items() if not torch.equal(v, before_unet[k])}
    kv = set(caat.kv_parameters(trained.unet))
    assert changed and changed <= kv
    assert any(".attn2.to_k." in k for k in changed) and any(".attn2.to_v." in k for k in changed)
    assert all(torch.equal(v, before_text[k]) for k, v in trained.text_encoder.state_dict().items())
    assert all(torch.equal(v, before_unet[k]) for k, v in pipe.unet.state_dict().items())  # caller's model kept


# ------------------------------------------------------------------------------------------ class images
def test_class_image_cache_is_reused(monkeypatch, pipe, tmp_path):
    from cloaklab.ops.attacks.setlevel import class_images, model_fingerprint

    calls = []
    original = type(pipe).__call__

    def counting(self, *args, **kwargs):
        prompts = kwargs.get("prompt", args[0] if args else None)
        calls.extend(prompts if isinstance(prompts, list) else [prompts])  # one entry per generated image
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(pipe), "__call__", counting)
    key = model_fingerprint(pipe)
    first = class_images(pipe, "a photo of person", 2, cache_dir=tmp_path, model_id=key, resolution=SIZE, steps=2)
    assert len(calls) == 2 and first.shape == (2, 3, SIZE, SIZE)
    again = class_images(pipe, "a photo of person", 2, cache_dir=tmp_path, model_id=key, resolution=SIZE, steps=2)
    assert len(calls) == 2 and torch.equal(first, again)  # rerun: nothing generated
    more = class_images(pipe, "a photo of person", 3, cache_dir=tmp_path, model_id=key, resolution=SIZE, steps=2)
    assert len(calls) == 3 and torch.equal(more[:2], first)  # only the missing one
    other = class_images(pipe, "a photo of dog", 1, cache_dir=tmp_path, model_id=key, resolution=SIZE, steps=2)
    assert len(calls) == 4 and other.shape[0] == 1  # another prompt is another cache entry


# ------------------------------------------------------------------------------------ DreamBooth + HVP
def test_dreambooth_loss_is_instance_plus_weighted_prior(pipe):
    from cloaklab.ops.diffusion import encode_images, encode_prompts
    from cloaklab.ops.train.dreambooth import dreambooth_loss

    with torch.no_grad():
        latents = encode_images(pipe.vae, torch.stack(photos()[:1] * 2))
        text = encode_prompts(pipe, ["a photo of sks person", "a photo of person"])

        def loss(weight):
            return dreambooth_loss(pipe.unet, pipe.scheduler, latents, text[:1], latents.flip(0), text[1:],
                                   prior_weight=weight, generator=torch.Generator().manual_seed(0)).item()

        instance, one, two = loss(0.0), loss(1.0), loss(2.0)
    assert one > instance
    assert two - instance == pytest.approx(2 * (one - instance), rel=1e-4)


def test_dreambooth_trainer_learns_and_respects_parameter_subset(pipe):
    from cloaklab.ops.diffusion import encode_images
    from cloaklab.ops.train.dreambooth import DreamBoothConfig, DreamBoothTrainer, Surrogate, dreambooth_loss

    surrogate = Surrogate.from_pipe(pipe).clone()
    images = torch.stack([photos()[0]] * 2)

    def fixed_loss():
        with torch.no_grad():
            z = encode_images(pipe.vae, images)
            text = surrogate.encode_prompts(["a photo of sks person"])
            return sum(dreambooth_loss(surrogate.unet, pipe.scheduler, z, text,
                                       generator=torch.Generator().manual_seed(s)).item() for s in range(4))

    config = DreamBoothConfig(learning_rate=3e-3, prior_weight=0.0, train_text_encoder=False)
    before = fixed_loss()
    DreamBoothTrainer(surrogate, config, generator=torch.Generator().manual_seed(0)).train(images, 12)
    assert fixed_loss() < before
    subset = [p for n, p in surrogate.unet.named_parameters() if n.startswith("conv_out")]
    snapshot = copy.deepcopy(surrogate.unet.state_dict())
    DreamBoothTrainer(surrogate, config, parameters=subset, generator=torch.Generator().manual_seed(1)).train(images, 2)
    changed = {k for k, v in surrogate.unet.state_dict().items() if not torch.equal(v, snapshot[k])}
    assert changed == {"conv_out.weight", "conv_out.bias"}


def test_inverse_hvp_solves_damped_system():
    from cloaklab.ops.attacks.inmark import inverse_hvp

    generator = torch.Generator().manual_seed(0)
    basis = torch.randn(6, 6, generator=generator, dtype=torch.float64)
    hessian = basis @ basis.T + 0.5 * torch.eye(6, dtype=torch.float64)
    g = torch.randn(6, generator=generator, dtype=torch.float64)

    def hvp(v):
        return [hessian @ v[0]]

    (cg,) = inverse_hvp(hvp, [g], solver="cg", steps=12, damping=0.1)
    expected = torch.linalg.solve(hessian + 0.1 * torch.eye(6, dtype=torch.float64), g)
    assert torch.allclose(cg, expected, atol=1e-6)
    scale = float(torch.linalg.eigvalsh(hessian).max()) * 1.1
    (lissa,) = inverse_hvp(hvp, [g], solver="lissa", steps=600, damping=0.0, scale=scale)
    assert torch.allclose(lissa, torch.linalg.solve(hessian, g), atol=1e-4)
    (identity,) = inverse_hvp(hvp, [g], solver="identity", steps=5, damping=0.1)
    assert torch.equal(identity, g)


def test_self_influence_identity_is_gradient_norm_descent(pipe):
    """With H = I, I(x) = −∇_x ½‖∇_θ SE(x)‖²: check it against autograd of that expression."""
    from cloaklab.ops.attacks.engine import AttackModels
    from cloaklab.ops.attacks.inmark import influence_parameters, self_influence, twice_differentiable
    from cloaklab.ops.train.dreambooth import Surrogate

    surrogate = Surrogate.from_pipe(pipe).clone()
    models = AttackModels(surrogate, prompt="a photo of sks person")
    params = influence_parameters(surrogate.unet, "attn2.to_k,attn2.to_v")
    for p in params:
        p.requires_grad_(True)
    image = photos()[0][None]
    got = self_influence(models, image, torch.Generator().manual_seed(5), params, None, solver="identity", steps=0,
                         damping=0.0, scale=1.0)
    x = image.clone().requires_grad_(True)
    with twice_differentiable():
        se = models.denoise_loss(x, [torch.Generator().manual_seed(5)]).sum()
    grads = torch.autograd.grad(se, params, create_graph=True)
    (expected,) = torch.autograd.grad(-0.5 * sum(g.pow(2).sum() for g in grads), x)
    assert got.abs().max() > 0
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-10)


# ------------------------------------------------------------------------------------------------- CLI
def test_cli_set_level_run_keeps_budget_on_disk_and_resumes(cli, tmp_path, class_dir):
    import json

    import numpy as np
    from PIL import Image

    from cloaklab.tests.conftest import photo

    photos_dir, clean_dir = tmp_path / "b", tmp_path / "a"
    photos_dir.mkdir()
    clean_dir.mkdir()
    photo("astronaut", 40).save(photos_dir / "astronaut.png")
    photo("chelsea").resize((48, 32)).save(photos_dir / "chelsea.jpg", quality=95)
    photo("rocket", 32).save(clean_dir / "rocket.png")
    args = ["poison", photos_dir, "-o", tmp_path / "out", "-a", "aspl", "--model", "tiny", "--resolution", "32",
            "--clean-dir", clean_dir, "--eps", "4", "--step-size", "1", "--param", "rounds=1", "--param", "pgd_steps=3",
            "--param", "surrogate_steps=1", "--param", "num_class_images=2", "--param", "class_steps=2", "--param",
            f"class_dir={class_dir}"]
    code, out, err = cli(args)
    assert code == 0, err
    assert "aspl: round 1/1" in err
    for name, source in (("astronaut.png", "astronaut.png"), ("chelsea.png", "chelsea.jpg")):
        with Image.open(photos_dir / source) as original, Image.open(tmp_path / "out" / name) as written:
            a = np.asarray(original.convert("RGB"), dtype=np.int64)
            b = np.asarray(written, dtype=np.int64)
        assert a.shape == b.shape
        assert 0 < np.abs(a - b).max() <= 4
    manifest = json.loads((tmp_path / "out" / "cloak.json").read_text())
    assert manifest["files"]["chelsea.png"]["stats"]["linf"] <= 4
    code, out, err = cli(args)
    assert code == 0 and "2 skipped" in err


def test_lf_aspl_perturbation_stays_low_frequency(pipe, class_dir):
    """lf-aspl (LF-ASPL of paper 004): the set-level hook honours the engine's DCT gradient/δ projections."""
    from cloaklab.ops.attacks.lowfreq import highfreq_energy

    low = run_attack("lf-aspl", pipe, class_dir, rounds=1, lf_project=True)
    plain = run_attack("aspl", pipe, class_dir, rounds=1)
    for a, b, clean in zip(low, plain, photos()):
        assert highfreq_energy(a.images.cpu() - clean[None], 0.25).item() < 0.05  # only the ε clip adds any
        assert highfreq_energy(b.images.cpu() - clean[None], 0.25).item() > 0.3


def test_metacloak_transform_is_seeded_differentiable_and_blurs():
    from cloaklab.ops.attacks.lowfreq import highfreq_energy
    from cloaklab.ops.attacks.metacloak import metacloak_transform

    x = torch.stack(photos(32)[:1] * 2).requires_grad_(True)
    a = metacloak_transform(x, [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)])
    b = metacloak_transform(x, [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)])
    assert torch.equal(a, b) and a.shape == x.shape
    assert not torch.equal(a[0], a[1])  # each image its own draw
    (grad,) = torch.autograd.grad(a.sum(), x)
    assert grad.abs().sum() > 0
    noise = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    blurred = metacloak_transform(noise, [torch.Generator().manual_seed(3)], sigma=(2.0, 2.0))
    assert highfreq_energy(blurred - 0.5, 0.25) < highfreq_energy(noise - 0.5, 0.25) / 2



def test_metacloak_transform_flips_with_probability_half_and_keeps_a_ramp():
    """MetaCloak's RandomHorizontalFlip(p=0.5) after a normalized Gaussian blur: a horizontal ramp is linear, so a
    symmetric unit-sum kernel leaves its interior unchanged; the image is mirrored exactly when the generator's
    second draw is < 0.5 (the draws, typed from a fresh generator of the same seed)."""
    from cloaklab.ops.attacks.metacloak import metacloak_transform

    ramp = torch.arange(32, dtype=torch.float32).div(31).expand(1, 3, 32, 32).contiguous()
    flips = []
    for seed in range(12):
        out = metacloak_transform(ramp, [torch.Generator().manual_seed(seed)])[0]
        flipped = bool(torch.rand(3, generator=torch.Generator().manual_seed(seed))[1] < 0.5)
        expected = ramp[0].flip(-1) if flipped else ramp[0]
        assert torch.allclose(out[:, 4:-4, 4:-4], expected[:, 4:-4, 4:-4], atol=1e-5)
        flips.append(flipped)
    assert any(flips) and not all(flips)

def test_dreambooth_trainer_trains_the_text_encoder_only_when_asked(pipe):
    from cloaklab.ops.train.dreambooth import DreamBoothConfig, DreamBoothTrainer, Surrogate

    images = torch.stack(photos()[:1])
    for train_text in (False, True):
        surrogate = Surrogate.from_pipe(pipe).clone()
        before = copy.deepcopy(surrogate.text_encoder.state_dict())
        config = DreamBoothConfig(learning_rate=1e-3, prior_weight=0.0, train_text_encoder=train_text)
        DreamBoothTrainer(surrogate, config, generator=torch.Generator().manual_seed(0)).train(images, 1)
        changed = any(not torch.equal(v, before[k]) for k, v in surrogate.text_encoder.state_dict().items())
        assert changed == train_text


def test_aspl_surrogate_learns_from_clean_dir_set_a(spy, pipe, class_dir):
    from cloaklab.ops.attacks import get_attack
    from cloaklab.ops.attacks.engine import AttackModels
    from cloaklab.ops.attacks.setlevel import square_crops

    set_a = [photo_tensor("rocket", SIZE)]
    params = get_attack("aspl").resolve({"rounds": 1, "surrogate_steps": 1, "pgd_steps": 1})
    params.update(num_class_images=2, class_steps=2, class_dir=str(class_dir))
    get_attack("aspl").load().attack_set(photos(), models=AttackModels(pipe), generators=generators(),
                                         clean_images=set_a, **params)
    trained_on = [data for kind, data in spy if kind == "train"]
    assert torch.equal(trained_on[0], square_crops(set_a, SIZE))  # f′ ← set A, not the protected set



def test_fsmg_surrogate_learns_from_clean_dir_set_a(spy, pipe, class_dir):
    """Anti-DreamBooth FSMG: θ_clean is DreamBooth-trained on the clean set A (``--clean-dir``), not on the set
    being protected (the two are equal before the first PGD step only when set A is not given)."""
    from cloaklab.ops.attacks import get_attack
    from cloaklab.ops.attacks.engine import AttackModels
    from cloaklab.ops.attacks.setlevel import square_crops

    set_a = [photo_tensor("rocket", SIZE)]
    params = get_attack("fsmg").resolve({"surrogate_steps": 2, "steps": 1})
    params.update(num_class_images=2, class_steps=2, class_dir=str(class_dir))
    get_attack("fsmg").load().attack_set(photos(), models=AttackModels(pipe), generators=generators(),
                                         clean_images=set_a, **params)
    trained_on = [data for kind, data in spy if kind == "train"]
    assert len(trained_on) == 2 and all(torch.equal(t, square_crops(set_a, SIZE)) for t in trained_on)

def test_e_aspl_averages_the_members_rounds(monkeypatch, pipe, class_dir):
    from cloaklab.ops.attacks import e_aspl

    starts, ends = [], []
    original = e_aspl.aspl_round

    def spy_round(run, f, **kw):
        starts.append([x.clone() for x in run.pset.adv])
        loss = original(run, f, **kw)
        ends.append([x.clone() for x in run.pset.adv])
        return loss

    monkeypatch.setattr(e_aspl, "aspl_round", spy_round)
    results = run_attack("e-aspl", pipe, class_dir, rounds=1, ensemble="tiny,tiny")
    assert len(starts) == 3  # --model + two ensemble members, one round each
    for member in starts[1:]:  # every member starts from the same images
        assert all(torch.equal(a, b) for a, b in zip(member, starts[0]))
    for index, result in enumerate(results):
        mean = torch.stack([end[index] for end in ends]).mean(0)
        assert torch.allclose(result.images[0], mean, atol=1e-6)


def test_set_level_refuses_sdxl_with_one_line(pipe):
    from types import SimpleNamespace

    from cloaklab.ops.attacks.setlevel import start_run
    from cloaklab.ops.errors import UsageError

    sdxl_like = SimpleNamespace(**{k: getattr(pipe, k) for k in ("vae", "unet", "text_encoder", "tokenizer",
                                                                 "scheduler")}, text_encoder_2=pipe.text_encoder)
    with pytest.raises(UsageError, match="SDXL"):
        start_run(photos(), pipe=sdxl_like, generators=generators())


# ------------------------------------------------------------------------- issue 18: what the references train
@pytest.fixture
def db_batches(monkeypatch):
    """Every DreamBooth loss call: (instance count, class count, prior weight, instance latents)."""
    from cloaklab.ops.train import dreambooth

    calls = []
    original = dreambooth.dreambooth_loss

    def spy(unet, scheduler, instance_latents, instance_text, class_latents=None, class_text=None, **kw):
        calls.append((instance_latents.shape[0], None if class_latents is None else class_latents.shape[0],
                      kw.get("prior_weight"), instance_latents.detach().cpu().clone()))
        return original(unet, scheduler, instance_latents, instance_text, class_latents, class_text, **kw)

    monkeypatch.setattr(dreambooth, "dreambooth_loss", spy)
    return calls


def test_fsmg_surrogate_trains_on_two_instance_and_two_class_images(db_batches, pipe, class_dir):
    """Anti-DreamBooth attack_with_fsmg.sh: train_dreambooth.py --train_batch_size=2 with prior preservation."""
    run_attack("fsmg", pipe, class_dir, surrogate_steps=2, steps=1)
    assert len(db_batches) == 2 and all(call[:3] == (2, 2, 1.0) for call in db_batches)


def test_metacloak_pool_trains_on_the_protected_images_and_every_snapshot_is_attacked(monkeypatch, spy, pipe,
                                                                                       class_dir):
    from cloaklab.ops.attacks import metacloak
    from cloaklab.ops.attacks.setlevel import square_crops

    other = [torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(9)) for _ in range(2)]
    attacked = []
    original = metacloak.attack_models

    def record(surrogate, run):
        attacked.append(surrogate.unet.conv_in.weight.detach().cpu().clone())
        return original(surrogate, run)

    monkeypatch.setattr(metacloak, "attack_models", record)
    from cloaklab.ops.attacks import get_attack
    from cloaklab.ops.attacks.engine import AttackModels

    spec = get_attack("metacloak")
    params = spec.resolve({**FAST["metacloak"], "eps": 8.0, "step_size": 2.0, "pool_steps": 2, "pool_interval": 1,
                           "unroll_steps": 1, "num_class_images": 2, "class_steps": 2, "class_dir": str(class_dir),
                           "db_lr": 1e-3})
    spec.load().attack_set(photos(), models=AttackModels(pipe), generators=generators(), clean_images=other,
                           **params)
    trained = [data for kind, data in spy if kind == "train"]
    protected = square_crops(photos(), SIZE)
    pool_batches = trained[:2]  # the pool's 2 DreamBooth steps come first
    for batch in pool_batches:
        assert any(torch.allclose(batch[0], p, atol=1e-6) for p in protected)
        assert not any(torch.allclose(batch[0], o, atol=1e-3) for o in square_crops(other, SIZE))
    # 3 snapshots (steps 0, 1, 2), each attacked once (trials 1 × inner 1): three different weights, in order
    assert len(attacked) == 3 + 1  # + the final evaluation
    assert not torch.equal(attacked[0], attacked[1]) and not torch.equal(attacked[1], attacked[2])
    assert torch.equal(attacked[0], pipe.unet.conv_in.weight.detach().cpu())  # snapshot 0 is the base model


def test_metacloak_rotation_is_one_sided(monkeypatch):
    """The release rotates by an angle in [0, θ] (not ±θ): the angle drawn is u·θ with u ~ U[0, 1)."""
    from cloaklab.ops.attacks import metacloak

    angles = []
    original = metacloak.F.affine_grid

    def grid(theta, size, align_corners=False):
        angles.append(float(torch.atan2(theta[0, 1, 0], theta[0, 0, 0])))
        return original(theta, size, align_corners=align_corners)

    monkeypatch.setattr(metacloak.F, "affine_grid", grid)
    x = torch.rand(8, 3, 16, 16)
    metacloak.metacloak_transform(x, [torch.Generator().manual_seed(i) for i in range(8)], rotation=30.0)
    assert len(angles) == 8 and all(0 <= a <= 30 * 3.14159 / 180 + 1e-6 for a in angles)
    assert max(angles) > 0.1


def test_caat_clips_kv_gradients_and_steps_once_per_iteration(monkeypatch, pipe, class_dir):
    """CAAT: clip_grad_norm_(K/V, 1.0) and one optimizer step per iteration, though the set has two shapes."""
    from cloaklab.ops.attacks import caat

    clips, steps = [], []
    original_clip = torch.nn.utils.clip_grad_norm_

    def clip(parameters, max_norm, *a, **kw):
        parameters = list(parameters)
        clips.append((len(parameters), max_norm))
        return original_clip(parameters, max_norm, *a, **kw)

    original_step = torch.optim.AdamW.step

    def step(self, *a, **kw):
        steps.append(1)
        return original_step(self, *a, **kw)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    run_attack("caat", pipe, class_dir, steps=3)
    kv_count = len(caat.kv_parameters(pipe.unet))
    assert clips == [(kv_count, 1.0)] * 3
    assert len(steps) == 3  # photos() holds a square and a non-square image: two groups, still one step


def test_ace_same_seed_same_bytes_and_only_lora_trains_with_prior(db_batches, monkeypatch, pipe, class_dir):
    """mist-v2 lunet: LoRA steps with the 0.1-weighted prior term; peft's init seeded from the run (two runs with
    one seed are byte-identical, whatever the global RNG did in between)."""
    from cloaklab.ops.attacks import ace

    captured = []
    original = ace.base_surrogate
    monkeypatch.setattr(ace, "base_surrogate", lambda p: captured.append(original(p)) or captured[-1])
    torch.manual_seed(1)
    first = run_attack("ace", pipe, class_dir, seed=5)
    torch.manual_seed(2)
    second = run_attack("ace", pipe, class_dir, seed=5)
    for a, b in zip(first, second):
        assert a.images.numpy().tobytes() == b.images.numpy().tobytes()
    assert db_batches and all(call[1] == 1 and call[2] == pytest.approx(0.1) for call in db_batches)
    base = pipe.unet.state_dict()
    for name, value in captured[0].unet.state_dict().items():
        if "lora_" not in name:
            assert torch.equal(value, base[name.replace(".base_layer", "")]), name
    assert any(not torch.equal(p, torch.zeros_like(p)) for n, p in captured[0].unet.named_parameters()
               if "lora_B" in n)  # the up-projections left their zero init: the LoRA trained


@pytest.mark.parametrize("name, overrides, ascent", [
    ("aspl", {"rounds": 1}, True), ("fsmg", {"surrogate_steps": 1, "steps": 2}, True),
    ("inmark", {"epochs": 1, "iterations": 1}, True), ("ace", {"epochs": 1, "pgd_steps": 1, "lora_steps": 1}, False)])
def test_set_level_pgd_steps_go_the_papers_way(name, overrides, ascent, spy, pipe, class_dir):
    """ASPL/FSMG/InMark ascend the surrogate's denoising loss (Anti-DreamBooth aspl.py/fsmg.py: ``+ alpha *
    grad.sign()``); ACE descends the distance to the target latent (mist-v2 lunet ascends ``−mse``)."""
    run_attack(name, pipe, class_dir, **overrides)
    steps = [data for kind, data in spy if kind == "pgd"]
    assert steps and all(kw["ascent"] is ascent for _, kw in steps)


def test_metacloak_blur_equals_torchvisions_gaussian_blur_k7_with_the_drawn_sigma():
    """MetaCloak's EoT blur is torchvision's GaussianBlur(kernel_size=7, sigma=(0.1, 2.0)): σ = 0.1 + 1.9·u₀ with
    u₀ the generator's first draw (typed here from a fresh generator of the same seed), reflect padding; the flip
    follows the second draw. The expected image comes from torchvision, not from our kernel."""
    from torchvision.transforms.functional import gaussian_blur

    from cloaklab.ops.attacks.metacloak import metacloak_transform

    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    for seed in range(4):
        out = metacloak_transform(x, [torch.Generator().manual_seed(seed)])
        u = torch.rand(3, generator=torch.Generator().manual_seed(seed)).tolist()
        expected = gaussian_blur(x, kernel_size=[7, 7], sigma=[0.1 + 1.9 * u[0]] * 2)
        expected = expected.flip(-1) if u[1] < 0.5 else expected
        assert torch.allclose(out, expected, atol=1e-5), seed
