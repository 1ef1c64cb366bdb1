#!/usr/bin/env bash
# Refresh constraints.txt (the lock): resolve '.[dev]' afresh in a throwaway venv, then freeze it.
# Run the suite with the new lock before committing it (`make lock && make install && make test`).
# torch stays a range (a CPU build for laptops, a CUDA build for GPUs); its CUDA libraries follow torch's own pins.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(mktemp -d)/venv
python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q -e '.[dev]'
{
  echo "# The lock: exact versions the test suite passed with. Used by README's install and .ci/run (-c constraints.txt)."
  echo "# Refresh with 'make lock' (tools/lock.sh), then run the suite before committing. Generated $(date -u +%F)."
  echo "# torch is the one range: the CPU build (laptops; 2.13.0 on the project machines) or the CUDA build (CI: 2.14.1)."
  echo "torch>=2.13.0,<=2.14.1"
  "$venv/bin/python" -m pip freeze --exclude-editable | grep -viE '^(cloaklab|torch|nvidia-|cuda-|triton)([=<> ]|$)' \
    | grep -viE '^(nvidia|cuda)[-_]' | sort -f
} > constraints.txt
rm -rf "$(dirname "$venv")"
echo "wrote constraints.txt ($(grep -c '==' constraints.txt) pins)"
