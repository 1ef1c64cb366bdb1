from . import Case


def make(tmp_path, photos):
    return Case("train-db", [str(photos)],
                ["--model", "tiny", "--device", "cpu", "--lora", "2", "--steps", "2", "--seed", "3",
                 "--checkpoint-every", "1"],
                {"model": "tiny", "device": "cpu", "lora": 2, "steps": 2, "seed": 3, "checkpoint_every": 1},
                bad=("lora", 0, "--lora"))
