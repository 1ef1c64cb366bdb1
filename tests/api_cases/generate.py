from . import Case


def make(tmp_path, photos):
    """Two prompts × one image at 64 px, 2 DDIM steps of the tiny model, with a random 2-vector TI embedding (its
    token comes from the file), so the run exercises --prompts FILE and --embedding; generate takes no INPUT."""
    import torch
    from safetensors.torch import save_file

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a {token} on the beach\na {token} in the snow\n")
    embedding = tmp_path / "learned_embeds.safetensors"
    if not embedding.exists():
        save_file({"<toy>": torch.randn(2, 32, generator=torch.Generator().manual_seed(0))}, str(embedding))
    return Case("generate", [], ["--model", "tiny", "--steps", "2", "--prompts", str(prompts), "-n", "1",
                                 "--embedding", str(embedding), "--seed", "5", "--device", "cpu", "--dtype", "fp32"],
                {"model": "tiny", "steps": 2, "prompts": str(prompts), "num_per_prompt": 1, "embedding": str(embedding),
                 "seed": 5, "device": "cpu", "dtype": "fp32"}, bad=("eta", 2.0, "--eta"))
