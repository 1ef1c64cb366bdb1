"""``cloak generate``: seeding per (seed, prompt, image), resume, single-image regeneration, TI/LoRA loading, the
prompt sets and the DiffShortcut quality negative prompt (paper 001 Eq. 6)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cloaklab.ops.generate import GenerationJob, image_seed, plan_jobs, sample
from cloaklab.ops.prompts import (
    DEFAULT_NUM_PER_PROMPT,
    FACE_PROMPTS,
    OBJECT_PROMPTS_24,
    QUALITY_NEGATIVE,
    decoupled_prompts,
    load_prompt_templates,
    quality_negative_prompt,
)

FAST = ["--model", "tiny", "--steps", "2", "--device", "cpu", "--dtype", "fp32"]


def _png(path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(np.int16)


@pytest.fixture(scope="module")
def own_pipe():
    from cloaklab.ops.models import load_pipeline

    return load_pipeline("tiny", "cpu")


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# two prompts\na {token} on the beach\n\na {token} in the snow\n")
    return path


def test_prompt_sets_have_documented_sizes(prompt_file):
    assert len(OBJECT_PROMPTS_24) == 24 and len(set(OBJECT_PROMPTS_24)) == 24
    assert all(template.count("{token}") == 1 for template in OBJECT_PROMPTS_24 + FACE_PROMPTS)
    assert [t.replace("{token}", "sks") for t in FACE_PROMPTS] == ["a photo of sks person",
                                                                    "a DSLR portrait of sks person"]
    assert DEFAULT_NUM_PER_PROMPT["objects24"] == 5
    assert len(plan_jobs(load_prompt_templates("objects24"), "R*", 5, 0)) == 120
    assert load_prompt_templates(str(prompt_file)) == ["a {token} on the beach", "a {token} in the snow"]


def test_diffshortcut_prompt_strings():
    assert decoupled_prompts("a photo of sks person", "a photo of person", "UNKNOWN artifact masked") == (
        "a photo of sks person, UNKNOWN artifact masked", "a photo of person, without UNKNOWN artifact masked")
    assert decoupled_prompts("a", "b", None) == ("a", "b")
    assert QUALITY_NEGATIVE == "noisy, abstract, pattern, low quality"
    assert quality_negative_prompt("bhj noisy pattern") == "bhj noisy pattern, noisy, abstract, pattern, low quality"


def test_seeds_depend_only_on_seed_prompt_and_image():
    jobs = plan_jobs(["a {token} x", "a {token} y"], "sks", 3, seed=7)
    assert [job.name for job in jobs[:4]] == ["p00_i000.png", "p00_i001.png", "p00_i002.png", "p01_i000.png"]
    assert jobs[4].seed == image_seed(7, 1, 1) and jobs[4].prompt == "a sks y"
    assert len({job.seed for job in jobs}) == 6
    assert plan_jobs(["a {token} x", "a {token} y"], "sks", 5, seed=7)[6].seed == jobs[4].seed


def test_same_seed_same_image_and_batching_does_not_matter(own_pipe):
    job = lambda j, k, seed: GenerationJob(j, k, "t", "sks", "a photo of sks", None, image_seed(seed, j, k))
    first = sample(own_pipe, [job(0, 0, 1)], steps=2)
    again = sample(own_pipe, [job(0, 0, 1)], steps=2)
    assert torch.equal(first, again)
    batched = sample(own_pipe, [job(0, 1, 1), job(0, 0, 1)], steps=2)
    assert (batched[1] - first[0]).abs().max() < 2e-3  # same image inside a batch (float noise only)
    assert (batched[0] - first[0]).abs().mean() > 1e-2  # another image index → another image


def test_cli_manifest_resume_and_single_image_regeneration(cli, tmp_path, prompt_file):
    out = tmp_path / "gen"
    code, stdout, _ = cli(["generate", "-o", out, "--prompts", prompt_file, "-n", "2", "--batch-size", "3",
                           "--token", "R*", "--seed", "3", *FAST])
    assert code == 0 and stdout.strip() == str(out)
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == ["p00_i000.png", "p00_i001.png", "p01_i000.png", "p01_i001.png"]
    record = json.loads((out / "cloak.json").read_text())["files"]["p01_i001.png"]
    assert record["prompt"] == "a R* in the snow" and record["prompt_template"] == "a {token} in the snow"
    assert record["token"] == "R*" and record["seed"] == image_seed(3, 1, 1)
    assert (record["prompt_index"], record["image_index"], record["status"]) == (1, 1, "done")
    assert record["settings"]["steps"] == 2 and record["settings"]["guidance"] == 7.5

    original = _png(out / "p01_i001.png")
    (out / "p01_i001.png").unlink()
    code, stdout, _ = cli(["generate", "-o", out, "--prompts", prompt_file, "-n", "2", "--token", "R*",
                           "--seed", "3", "--json", *FAST])
    summary = json.loads(stdout)
    assert code == 0 and summary["done"] == ["p01_i001.png"] and len(summary["skipped"]) == 3
    assert np.abs(_png(out / "p01_i001.png") - original).max() <= 1

    alone = tmp_path / "alone"
    code, _, _ = cli(["generate", "-o", alone, "--prompts", prompt_file, "-n", "2", "--token", "R*", "--seed", "3",
                      "--only", "p00_i001", *FAST])
    assert code == 0 and [p.name for p in alone.glob("*.png")] == ["p00_i001.png"]
    assert np.abs(_png(alone / "p00_i001.png") - _png(out / "p00_i001.png")).max() <= 1


def test_quality_negative_prompt_is_used_and_recorded(cli, tmp_path, prompt_file):
    base, neg = tmp_path / "base", tmp_path / "neg"
    args = ["--prompts", prompt_file, "-n", "1", "--only", "p00_i000", *FAST]
    assert cli(["generate", "-o", base, *args])[0] == 0
    assert cli(["generate", "-o", neg, "--quality-negative", "--neg-token", "UNKNOWN artifact masked", *args])[0] == 0
    record = json.loads((neg / "cloak.json").read_text())["files"]["p00_i000.png"]
    assert record["negative_prompt"] == "UNKNOWN artifact masked, noisy, abstract, pattern, low quality"
    assert np.abs(_png(neg / "p00_i000.png") - _png(base / "p00_i000.png")).mean() > 0.5


def test_diffshortcut_sampling_feeds_without_neg_to_the_text_encoder(cli, tmp_path, prompt_file, monkeypatch):
    """Paper 001 §4.2 / DiffShortcut ``infer``: the generation prompt gets ", without {neg}" (the negative prompt is
    separate). The token ids that reach the text encoder must be those of the typed string."""
    from transformers import CLIPTextModel

    from cloaklab.ops.models.tokenizer import clip_tokenizer

    seen: list[list[int]] = []
    original = CLIPTextModel.forward

    def spy(self, input_ids=None, *args, **kwargs):
        seen.extend(input_ids.tolist())
        return original(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(CLIPTextModel, "forward", spy)
    args = ["--prompts", prompt_file, "-n", "1", "--only", "p00_i000", "--token", "sks", *FAST]
    code, _, err = cli(["generate", "-o", tmp_path / "g", "--quality-negative", "--neg-token", "bhj noisy pattern",
                        *args])
    assert code == 0, err
    tokenizer = clip_tokenizer()

    def ids(text):
        return tokenizer(text, padding="max_length", max_length=77, truncation=True).input_ids

    assert ids("a sks on the beach, without bhj noisy pattern") in seen
    assert ids("bhj noisy pattern, noisy, abstract, pattern, low quality") in seen
    assert ids("a sks on the beach") not in seen
    record = json.loads((tmp_path / "g" / "cloak.json").read_text())["files"]["p00_i000.png"]
    assert record["prompt"] == "a sks on the beach, without bhj noisy pattern"
    seen.clear()
    assert cli(["generate", "-o", tmp_path / "plain", *args])[0] == 0
    assert ids("a sks on the beach") in seen  # no suffix without --quality-negative


def test_embedding_changes_outputs_and_names_the_token(cli, tmp_path, prompt_file):
    from safetensors.torch import save_file

    embeds = tmp_path / "learned_embeds.safetensors"
    save_file({"<cat-toy>": torch.randn(1, 32, generator=torch.Generator().manual_seed(0)) * 3}, str(embeds))
    base, ti = tmp_path / "base", tmp_path / "ti"
    args = ["--prompts", prompt_file, "-n", "1", "--only", "p00_i000", *FAST]
    assert cli(["generate", "-o", base, "--token", "<cat-toy>", *args])[0] == 0
    assert cli(["generate", "-o", ti, "--embedding", embeds, *args])[0] == 0
    record = json.loads((ti / "cloak.json").read_text())["files"]["p00_i000.png"]
    assert record["token"] == "<cat-toy>" and record["prompt"] == "a <cat-toy> on the beach"
    assert np.abs(_png(ti / "p00_i000.png") - _png(base / "p00_i000.png")).mean() > 0.5


def _save_random_lora(pipe, folder):
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(0)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
    StableDiffusionPipeline.save_lora_weights(str(folder), unet_lora_layers=layers, safe_serialization=True)


def test_lora_changes_outputs_and_scale_zero_is_the_base(cli, tmp_path, prompt_file, fresh_tiny_pipe):
    lora = tmp_path / "lora"
    _save_random_lora(fresh_tiny_pipe, lora)
    assert (lora / "pytorch_lora_weights.safetensors").is_file()
    args = ["--prompts", prompt_file, "-n", "1", "--only", "p00_i000", *FAST]
    runs = {}
    for name, extra in {"base": [], "lora": ["--lora", lora], "zero": ["--lora", lora, "--lora-scale", "0"]}.items():
        code, _, err = cli(["generate", "-o", tmp_path / name, *extra, *args])
        assert code == 0, err
        runs[name] = _png(tmp_path / name / "p00_i000.png")
    assert np.abs(runs["lora"] - runs["base"]).mean() > 0.5
    assert np.abs(runs["zero"] - runs["base"]).max() <= 1


def test_bad_prompt_source_and_unknown_image_are_usage_errors(cli, tmp_path):
    assert cli(["generate", "-o", tmp_path / "a", "--prompts", tmp_path / "missing.txt", *FAST])[0] == 2
    code, _, err = cli(["generate", "-o", tmp_path / "b", "--prompts", "faces", "--only", "p09_i000", *FAST])
    assert code == 2 and "p09_i000" in err
    from safetensors.torch import save_file

    save_file({"<sd15>": torch.zeros(1, 768)}, str(tmp_path / "wide.safetensors"))
    code, _, err = cli(["generate", "-o", tmp_path / "c", "--embedding", tmp_path / "wide.safetensors", *FAST])
    assert code == 2 and "768-d" in err and not (tmp_path / "c" / "p00_i000.png").exists()


def test_multi_vector_embeddings_reach_the_pipeline_with_every_vector(tmp_path, fresh_tiny_pipe, monkeypatch):
    """With transformers 5, diffusers' own expansion misses multi-vector tokens; generation must expand them."""
    import safetensors.torch

    from cloaklab.ops.generate import GenerationJob, sample
    from cloaklab.ops.prompts import expand_multi_vector

    path = tmp_path / "learned_embeds.safetensors"
    safetensors.torch.save_file({"<R*>": torch.randn(3, 32)}, str(path))
    fresh_tiny_pipe.load_textual_inversion(str(path), token="<R*>")
    tokenizer = fresh_tiny_pipe.tokenizer
    assert expand_multi_vector(tokenizer, "a <R*>, on grass") == "a <R*> <R*>_1 <R*>_2, on grass"
    assert expand_multi_vector(tokenizer, "a <R*> <R*>_1 <R*>_2") == "a <R*> <R*>_1 <R*>_2"
    seen = []
    original = type(fresh_tiny_pipe).__call__

    def spy(self, *args, **kwargs):
        seen.extend(kwargs["prompt"])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(fresh_tiny_pipe), "__call__", spy)
    job = GenerationJob(prompt_index=0, image_index=0, template="a {} in the jungle", token="<R*>",
                        prompt="a <R*> in the jungle", negative_prompt=None, seed=1)
    sample(fresh_tiny_pipe, [job], steps=2, height=64, width=64)
    assert seen == ["a <R*> <R*>_1 <R*>_2 in the jungle"]


def test_dry_run_plans_what_the_run_skips_and_writes(cli, tmp_path, prompt_file):
    """``--dry-run`` decides resume as the run does (same parameter hash, same prompt and seed): after generating
    p00_i000 alone, the plan of the full run skips it and would write the other three, loading nothing."""
    out = tmp_path / "gen"
    args = ["--prompts", prompt_file, "-n", "2", "--token", "R*", "--seed", "3", *FAST]
    assert cli(["generate", "-o", out, *args, "--only", "p00_i000"])[0] == 0
    code, stdout, err = cli(["generate", "-o", out, *args, "--dry-run", "--json"])
    assert code == 0, err
    plan = json.loads(stdout)
    assert plan["skipped"] == ["p00_i000.png"]
    assert plan["would_write"] == ["p00_i001.png", "p01_i000.png", "p01_i001.png"]
    assert plan["inputs"][3] == f"p01_i001.png: a R* in the snow (seed {image_seed(3, 1, 1)})"
    code, stdout, _ = cli(["generate", "-o", out, *args, "--steps", "3", "--shard", "2/2", "--dry-run", "--json"])
    plan = json.loads(stdout)  # another sampler setting: nothing is done yet; shard 2 of 2 takes images 2 and 4
    assert code == 0 and plan["skipped"] == [] and plan["would_write"] == ["p00_i001.png", "p01_i001.png"]
    assert sorted(p.name for p in out.glob("*.png")) == ["p00_i000.png"]
