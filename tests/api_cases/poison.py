from . import Case


def make(tmp_path, photos):
    return Case("poison", [str(photos)], ["--model", "tiny", "-a", "adm+", "--steps", "1", "--eps", "4",
                                          "--t-range", "0,500", "--eval-draws", "0", "--seed", "3"],
                {"model": "tiny", "attack": "adm+", "steps": 1, "eps": 4, "t_range": (0, 500), "eval_draws": 0,
                 "seed": 3}, bad=("eps", 300, "--eps"))
