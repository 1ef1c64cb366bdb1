"""``python -m cloaklab …`` = ``cloak …``: the form launchers take (``torchrun -m cloaklab``, ``accelerate launch -m
cloaklab``) to run train-ti, train-db and immunize data-parallel (docs/grid.md, :mod:`cloaklab.ops.train.distributed`).

In a data-parallel run (``WORLD_SIZE`` > 1) rank 0 speaks for the run: the other processes print nothing on stdout
and run with ``--quiet`` (no header or progress; their warnings and errors still reach stderr). Commands that do not
train refuse to run under a launcher (each process would do all the work): shard them with ``--shard`` instead.
"""

from __future__ import annotations

import os
import sys

DATA_PARALLEL_COMMANDS = ("train-ti", "train-db", "immunize")


def main() -> None:
    from cloaklab.ops.train import distributed

    if distributed.world() > 1:
        command = next((arg for arg in sys.argv[1:] if not arg.startswith("-")), None)
        if command is not None and command not in DATA_PARALLEL_COMMANDS:
            sys.stderr.write(f"cloak: error: {command} does not train data-parallel (WORLD_SIZE={distributed.world()}"
                             f" is set by a launcher): only {', '.join(DATA_PARALLEL_COMMANDS)} do; run {command} "
                             "once, or split a folder with --shard I/N\n")
            raise SystemExit(2)
        if command is not None and not distributed.is_main():
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
            sys.argv.append("--quiet")
    from cloaklab.cli.main import main as cloak

    cloak()


if __name__ == "__main__":
    main()
