from . import Case

# Two tiny-model steps (one inner, one outer) on the two photos; checkpoints are byte-stable on the CPU too.
ARGS = ["--against", "ti", "--model", "tiny", "--steps", "2", "--defence-lr", "0.001", "--class-word", "photo",
        "--device", "cpu", "--seed", "5"]


def make(tmp_path, photos):
    return Case("immunize", [str(photos)], ARGS,
                {"against": "ti", "model": "tiny", "steps": 2, "defence_lr": 1e-3, "class_word": "photo",
                 "device": "cpu", "seed": 5}, bad=("steps", 0, "--steps"))
