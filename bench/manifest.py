"""Benchmark the manifest's scaling: per-file time of `purify -m jpeg` on 200 and on 2000 tiny images in one run,
and their ratio (issue 17 §4: ≤ 1.2; before the append-only record log it was ≈ 3.5 at 500 → 2000 files, every
record rewriting the whole cloak.json under a lock).

    .venv/bin/python bench/manifest.py                 # 200 and 2000 files
    .venv/bin/python bench/manifest.py --counts 200 2000 5000 --size 8

Each count runs in a fresh output folder through the same code path as the CLI (collect_inputs → Manifest →
purify_folder, which calls the runner); the time includes decoding, the method, the PNG write and the records.
Both CPU time and wall time are printed (wall time includes the fsync of every record line).

Measured on the 2-core CI box (ext4, 8 px images), same session, before → after the record log:
    before (82c33f0):  200 files 4.23 ms CPU/file · 2000 files 34.8 ms CPU/file · ratio 8.2 (wall 7.8)
    after:             200 files 3.49 ms CPU/file · 2000 files 3.54 ms CPU/file · ratio 1.02 (wall 1.04)
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def make_images(folder: Path, count: int, size: int) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"img{index:06d}.png")


def run_once(root: Path, count: int, size: int) -> tuple[float, float]:
    from cloaklab.ops.commands.purify import purify_folder
    from cloaklab.ops.io import collect_inputs
    from cloaklab.ops.manifest import Manifest
    from cloaklab.ops.purify import get_purifier

    source, output = root / f"in{count}", root / f"out{count}"
    make_images(source, count, size)
    spec = get_purifier("jpeg")
    params = spec.resolve({})
    cpu, wall = time.process_time(), time.perf_counter()
    items, _ = collect_inputs([str(source)])
    manifest = Manifest(output, "purify", {"method": "jpeg", **params}, seed=0)
    summary = purify_folder(items, output, "jpeg", params, manifest=manifest, seed=0, device="cpu")
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    assert len(summary.done) == count, summary.as_dict()
    return cpu / count, wall / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", type=int, nargs="+", default=[200, 2000])
    parser.add_argument("--size", type=int, default=8, help="image side in pixels (tiny: the manifest dominates)")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    results = {}
    with tempfile.TemporaryDirectory(prefix="cloak-bench-manifest-") as temp:
        for count in args.counts:
            results[count] = run_once(Path(temp), count, args.size)
            print(f"{count:6d} files: {1000 * results[count][0]:7.3f} ms CPU/file  "
                  f"{1000 * results[count][1]:7.3f} ms wall/file", flush=True)
    first = args.counts[0]
    for count in args.counts[1:]:
        print(f"ratio {count}/{first}: CPU {results[count][0] / results[first][0]:.2f}  "
              f"wall {results[count][1] / results[first][1]:.2f}  (target <= 1.2)")


if __name__ == "__main__":
    main()
