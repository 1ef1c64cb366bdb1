"""Peak memory of the classical purifiers per input pixel (issue 17 §4: target ≤ 40 bytes per pixel).

For each method, a fresh subprocess imports cloak (torch, the purifier), records its resident-set peak as the
baseline, runs ``cloak purify`` on one large synthetic photo (a smooth pattern plus noise, JPEG q95), and reports
``(peak RSS − baseline) / input pixels`` from ``resource.getrusage(RUSAGE_SELF).ru_maxrss``.

    python bench/memory.py                       # 12 MP, every classical purifier
    python bench/memory.py --megapixels 16 --methods jpeg webp

Prints one line per method: bytes per pixel, peak over baseline in MB, wall seconds. Linux/macOS only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CLASSICAL = ["jpeg", "webp", "gaussian", "tvm", "adverse-cleaner"]
TARGET = 40.0

CHILD = r"""
import json, resource, sys, time
import torch  # noqa: F401 - part of the baseline, as in any cloak run
from cloaklab.cli.main import app
from cloaklab.ops.purify import get_purifier
from cloaklab.ops.commands import purify as purify_command  # noqa: F401 - the folder runner, in the baseline
get_purifier(sys.argv[1]).load()
# Lazy one-time imports (torch.optim pulls in ~170 MB of modules on first use) belong to the baseline, not the image.
torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=0.01)
torch.nn.functional.interpolate(torch.zeros(1, 3, 16, 16), size=(8, 8), mode="bicubic", antialias=True)
scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
started = time.perf_counter()
try:
    app(["purify", sys.argv[2], "-o", sys.argv[3], "-m", sys.argv[1], "--device", "cpu"], prog_name="cloak")
except SystemExit as exit:
    code = exit.code
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
print(json.dumps({"baseline": baseline, "peak": peak, "seconds": time.perf_counter() - started, "code": code}))
"""


def synthetic_photo(path: Path, megapixels: float) -> int:
    """A 4:3 photo-like JPEG of about ``megapixels`` MP; returns its pixel count."""
    import numpy as np
    from PIL import Image

    width = int((megapixels * 1e6 * 4 / 3) ** 0.5)
    height = int(width * 3 / 4)
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([np.sin(x / 97 + c) * np.cos(y / 61 - c) for c in (0.0, 1.0, 2.0)], axis=2)
    image = np.clip((base * 0.35 + 0.5) * 255 + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)
    Image.fromarray(image).save(path, quality=95)
    return width * height


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megapixels", type=float, default=12.0)
    parser.add_argument("--methods", nargs="+", default=CLASSICAL)
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with tempfile.TemporaryDirectory() as folder:
        photo = Path(folder) / "photo.jpg"
        pixels = synthetic_photo(photo, args.megapixels)
        print(f"input: {pixels / 1e6:.1f} MP JPEG; target ≤ {TARGET:.0f} bytes per input pixel over the import "
              "baseline")
        for method in args.methods:
            out = Path(folder) / f"out-{method}"
            result = subprocess.run([sys.executable, "-c", CHILD, method, str(photo), str(out)], env=env,
                                    capture_output=True, text=True)
            lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
            if not lines:
                print(f"{method:16s} failed: {result.stderr.strip().splitlines()[-1:]}")
                continue
            record = json.loads(lines[-1])
            over = record["peak"] - record["baseline"]
            print(f"{method:16s} {over / pixels:7.1f} B/px   peak over baseline {over / 2**20:8.0f} MiB   "
                  f"{record['seconds']:6.1f} s   exit {record['code']}"
                  f"{'' if over / pixels <= TARGET else '   (over target)'}")


if __name__ == "__main__":
    main()
