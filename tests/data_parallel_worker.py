"""Run by tests/test_distributed.py under ``python -m torch.distributed.run --nproc-per-node 2``: each process runs
``python -m cloaklab``'s entry point (``cloaklab.__main__.main``) once per command line of the JSON file given as
the first argument, in one interpreter (imports once), and the exit codes go to ``codes-RANK.json`` beside it."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def run() -> None:
    spec = Path(sys.argv[1])
    from cloaklab.__main__ import main

    codes = []
    for args in json.loads(spec.read_text()):
        sys.argv = ["cloak", *args]
        try:
            main()
            codes.append(0)
        except SystemExit as exc:
            codes.append(exc.code if isinstance(exc.code, int) else 1)
    (spec.parent / f"codes-{os.environ.get('RANK', '0')}.json").write_text(json.dumps(codes))


if __name__ == "__main__":
    run()
