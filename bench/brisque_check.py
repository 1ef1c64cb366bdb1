"""BRISQUE: cloaklab's wheel-only implementation (``ops/metrics/brisque_score.py``) against the ``brisque`` PyPI
package it replaces, on real photos from scikit-image; and the one-time conversion of that package's model.

The reference needs libsvm (``libsvm-official`` compiles with a C compiler), so it lives in a throwaway venv, never
in cloaklab's dependencies::

    python3 -m venv /tmp/bq && /tmp/bq/bin/pip install brisque==0.2.0 scikit-image opencv-python-headless
    python bench/brisque_check.py --reference-python /tmp/bq/bin/python

prints, per photo, both scores and their difference, then the max abs difference. Without ``--reference-python``
the reference is imported in this interpreter when it can be, else only cloaklab's scores are printed.

Re-creating the shipped model file (only if the upstream model changes)::

    pip download --no-deps brisque==0.2.0 -d /tmp/x && cd /tmp/x && unzip brisque-0.2.0-py3-none-any.whl
    python bench/brisque_check.py --convert /tmp/x/brisque/models
"""

from __future__ import annotations

import argparse
import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np

# name → how the photo is read: skimage.data function, converted to RGB (camera is grey: stacked to 3 channels)
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "brick", "grass", "gravel", "immunohistochemistry",
          "retina", "hubble_deep_field", "moon")

# runs in the reference interpreter: scores of the given .npy images with the brisque package (features flattened,
# since brisque 0.2 returns 1-element arrays that NumPy >= 2 refuses to convert)
REFERENCE_CODE = r"""
import json, sys
import numpy as np
from brisque import BRISQUE

class Flat(BRISQUE):
    def calculate_brisque_features(self, image, kernel_size=7, sigma=7 / 6):
        raw = super().calculate_brisque_features(image, kernel_size=kernel_size, sigma=sigma)
        return np.array([float(np.asarray(v, dtype=np.float64).reshape(-1)[0]) for v in raw])

scorer = Flat(url=False)
print(json.dumps([float(scorer.score(np.load(path))) for path in sys.argv[1:]]))
"""


def load_photo(name: str) -> np.ndarray:
    """A scikit-image sample photo as uint8 RGB ``(H, W, 3)``."""
    from skimage import data

    image = np.asarray(getattr(data, name)())
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.dtype != np.uint8:
        image = np.rint(255 * (image - image.min()) / max(float(image.max() - image.min()), 1e-12)).astype(np.uint8)
    return np.ascontiguousarray(image[..., :3])


def reference_scores(images: dict[str, np.ndarray], python: str | None, folder: Path) -> list[float] | None:
    """The brisque package's scores, from another interpreter (``python``) or this one; None if unavailable."""
    paths = []
    for name, image in images.items():
        path = folder / f"{name}.npy"
        np.save(path, image)
        paths.append(str(path))
    command = [python or sys.executable, "-c", REFERENCE_CODE, *paths]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["?"])[-1]
        print(f"reference brisque package not usable ({last}); printing cloaklab's scores only")
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])


def convert(models: Path, target: Path) -> None:
    """``svm.txt`` (libsvm epsilon-SVR, RBF) + ``normalize.pickle`` (feature min/max) → one safetensors file."""
    from safetensors.numpy import save_file

    lines = (models / "svm.txt").read_text().splitlines()
    header: dict[str, str] = {}
    start = lines.index("SV") + 1
    for line in lines[:start - 1]:
        key, _, value = line.partition(" ")
        header[key] = value
    if header["svm_type"] != "epsilon_svr" or header["kernel_type"] != "rbf":
        raise SystemExit(f"unexpected model: {header}")
    coefficients, vectors = [], []
    for line in lines[start:]:
        if not line.strip():
            continue
        fields = line.split()
        row = np.zeros(36)
        for pair in fields[1:]:  # libsvm's sparse "index:value" (1-based; absent = 0)
            index, value = pair.split(":")
            row[int(index) - 1] = float(value)
        coefficients.append(float(fields[0]))
        vectors.append(row)
    with open(models / "normalize.pickle", "rb") as handle:
        ranges = pickle.load(handle)
    tensors = {"support_vectors": np.array(vectors), "dual_coef": np.array(coefficients),
               "gamma": np.array([float(header["gamma"])]), "rho": np.array([float(header["rho"])]),
               "feature_min": np.array(ranges["min_"], dtype=np.float64),
               "feature_max": np.array(ranges["max_"], dtype=np.float64)}
    assert tensors["support_vectors"].shape == (int(header["total_sv"]), 36)
    save_file(tensors, str(target), metadata={
        "source": "brisque 0.2.0 (PyPI, github.com/rehanguha/brisque, Apache-2.0): brisque/models/svm.txt and "
                  "normalize.pickle",
        "model": "epsilon-SVR, RBF kernel; f(x) = sum_i dual_coef_i exp(-gamma |sv_i - x|^2) - rho, x scaled to "
                 "[-1, 1] by feature_min/feature_max"})
    print(f"wrote {target}: {len(coefficients)} support vectors, gamma {header['gamma']}, rho {header['rho']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference-python", help="interpreter with the brisque package installed")
    parser.add_argument("--photos", default=",".join(PHOTOS), help="comma-separated skimage.data names")
    parser.add_argument("--convert", type=Path, metavar="MODELS", help="brisque's models folder → the shipped file")
    args = parser.parse_args()
    repo = Path(__file__).resolve().parents[1]
    if args.convert:
        convert(args.convert, repo / "ops" / "metrics" / "brisque_svr.safetensors")
        return
    import tempfile

    from cloaklab.ops.metrics.brisque_score import brisque

    images = {name: load_photo(name) for name in args.photos.split(",")}
    ours = [brisque(image) for image in images.values()]
    with tempfile.TemporaryDirectory() as folder:
        reference = reference_scores(images, args.reference_python, Path(folder))
    print(f"{'photo':<22} {'size':>10} {'cloaklab':>12} {'brisque pkg':>12} {'|diff|':>10}")
    for index, (name, image) in enumerate(images.items()):
        size = f"{image.shape[1]}x{image.shape[0]}"
        if reference is None:
            print(f"{name:<22} {size:>10} {ours[index]:12.6f}")
        else:
            print(f"{name:<22} {size:>10} {ours[index]:12.6f} {reference[index]:12.6f} "
                  f"{abs(ours[index] - reference[index]):10.2e}")
    if reference is not None:
        print(f"max abs difference: {max(abs(a - b) for a, b in zip(ours, reference)):.3e}")


if __name__ == "__main__":
    main()
