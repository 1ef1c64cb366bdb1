from . import Case


def make(tmp_path, photos):
    return Case("mask", [str(photos)], ["--sam-type", "tiny", "--device", "cpu", "--center", "--dilate", "16",
                                        "--preview", "--seed", "3"],
                {"sam_type": "tiny", "device": "cpu", "center": True, "dilate": 16, "preview": True, "seed": 3},
                bad=("dilate", -1, "--dilate"))
