"""Benchmark: ``--threads`` default (the CPUs this process may use) against 1 and 2 threads on a toy job.

Runs ``cloak poison PHOTOS -o OUT --model toy`` (the artist preset at the toy model's 64 px) on ``--photos`` small
synthetic photos, ``--repeats`` times per setting, interleaved so that a change in machine load hits every setting
alike, and prints median and range of the wall time with the load average before and after. Not a test.

    python bench/threads.py --photos 4 --repeats 3 [--steps 100] [--extra "--working-size"]
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def make_photos(folder: Path, count: int, size: tuple[int, int] = (300, 400)) -> None:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        smooth = rng.random((size[0] // 10, size[1] // 10, 3))
        image = Image.fromarray((smooth * 255).astype("uint8")).resize((size[1], size[0]), Image.BICUBIC)
        image.save(folder / f"photo{index}.png")


def run_once(photos: Path, out: Path, threads: str | None, steps: int, extra: list[str]) -> float:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("CLOAK_THREADS", None)
    args = [sys.executable, "-m", "cloaklab.cli.main", "poison", str(photos), "-o", str(out), "--model", "toy",
            "--steps", str(steps), "--quiet", *extra] + (["--threads", threads] if threads else [])
    start = time.perf_counter()
    subprocess.run(args, check=True, capture_output=True, env=env)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--extra", default="", help="more cloak poison flags, quoted")
    options = parser.parse_args()
    from cloaklab.ops.device import default_threads

    settings = {f"default ({default_threads()})": None, "1": "1", "2": "2"}
    times: dict[str, list[float]] = {name: [] for name in settings}
    print(f"load average before: {os.getloadavg()}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    with tempfile.TemporaryDirectory() as tmp:
        photos = Path(tmp) / "photos"
        make_photos(photos, options.photos)
        for repeat in range(options.repeats):
            for name, threads in settings.items():
                out = Path(tmp) / f"out-{repeat}-{threads}"
                times[name].append(run_once(photos, out, threads, options.steps, shlex.split(options.extra)))
                print(f"  run {repeat + 1}: threads {name}: {times[name][-1]:.1f} s (load {os.getloadavg()[0]:.1f})",
                      flush=True)
    print(f"load average after: {os.getloadavg()}")
    print(f"cloak poison {options.photos} photos --model toy --steps {options.steps} {options.extra}".rstrip())
    for name, values in times.items():
        print(f"  threads {name:12s} median {statistics.median(values):7.1f} s   range {min(values):.1f}-"
              f"{max(values):.1f} s   ({len(values)} runs)")


if __name__ == "__main__":
    main()
