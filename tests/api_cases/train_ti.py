from . import Case


def make(tmp_path, photos):
    return Case("train-ti", [str(photos)],
                ["--model", "tiny", "--device", "cpu", "--steps", "2", "--seed", "3", "--snapshot-every", "1",
                 "--lr", "0.01"],
                {"model": "tiny", "device": "cpu", "steps": 2, "seed": 3, "snapshot_every": 1, "lr": 0.01},
                bad=("flip_p", 1.5, "--flip-p"))
