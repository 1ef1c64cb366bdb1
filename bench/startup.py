"""Benchmark: `cloak --help` wall time and the CLI module's import time (goal ≤ 0.3 s on the project machines).

Prints each figure and its ratio to a bare `python -c pass` measured in the same run, so noisy machines still give
comparable numbers. Not a test.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import time


def best_of(command: list[str], runs: int = 7) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)


def main() -> None:
    python = [sys.executable, "-c", "pass"]
    import_cli = [sys.executable, "-c", "import cloaklab.cli.main"]
    cloak = shutil.which("cloak")
    help_cmd = [cloak, "--help"] if cloak else [sys.executable, "-m", "cloaklab.cli.main", "--help"]
    base, _ = best_of(python)
    rows = [("python -c pass", *best_of(python)), ("import cloaklab.cli.main", *best_of(import_cli)),
            ("cloak --help", *best_of(help_cmd)),
            ("cloak purify --help", *best_of(help_cmd[:-1] + ["purify", "--help"]))]
    print(f"{'what':28} {'best s':>8} {'median s':>9} {'× python':>9}  goal")
    for name, best, median in rows:
        goal = "≤ 0.30 s" if name != "python -c pass" else ""
        print(f"{name:28} {best:8.3f} {median:9.3f} {best / base:9.1f}  {goal}")


if __name__ == "__main__":
    main()
