from . import Case


def make(tmp_path, photos):
    """Score two "generated" images (noisy copies of the photos, in a concept subfolder) against the photos as the
    flat reference folder with the offline pixel metrics; ``-o`` names a file (its cloak.json is its folder's)."""
    import numpy as np
    from PIL import Image

    gen = tmp_path / "gen" / "concept"
    if not gen.exists():
        gen.mkdir(parents=True)
        rng = np.random.default_rng(0)
        for path in sorted(photos.iterdir()):
            clean = np.asarray(Image.open(path).convert("RGB")).astype(int)
            noisy = np.clip(clean + rng.integers(-8, 9, clean.shape), 0, 255).astype(np.uint8)
            Image.fromarray(noisy).save(gen / f"{path.stem}.png")
    return Case("score", [str(tmp_path / "gen")], ["-r", "--ref", str(photos), "--metrics", "psnr,ssim,rmse",
                                                    "--label", "poison=noise", "--batch-size", "1"],
                {"recursive": True, "ref": str(photos), "metrics": "psnr,ssim,rmse", "label": ["poison=noise"],
                 "batch_size": 1}, bad=("batch_size", 0, "--batch-size"), output="scores.json")
