from . import Case


def make(tmp_path, photos):
    """Maps of the two photos with the tiny model: one token, one timestep, one draw (each file: .npy + .png)."""
    return Case("ssm", [str(photos)], ["--model", "tiny", "--prompt", "a photo of a dog", "--token", "dog",
                                       "--timesteps", "200,1000", "--samples", "1", "--seed", "3", "--device", "cpu"],
                {"model": "tiny", "prompt": "a photo of a dog", "token": ["dog"], "timesteps": [200, 1000],
                 "samples": 1, "seed": 3, "device": "cpu"},
                bad=("samples", 0, "--samples"))
