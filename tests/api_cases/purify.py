from . import Case


def make(tmp_path, photos):
    return Case("purify", [str(photos)], ["-m", "jpeg", "--quality", "30", "--seed", "3"],
                {"method": "jpeg", "quality": 30, "seed": 3}, bad=("quality", 0, "--quality"))
