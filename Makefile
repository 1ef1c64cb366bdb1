# Developer tasks for cloaklab. `make help` lists them.
PY ?= $(if $(wildcard .venv/bin/python),.venv/bin/python,python3)

.PHONY: help install lock test lint completions man docs-check bench bench-gpu toy-model toy-model-continue
help:  ## list the developer tasks
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/'

install:  ## editable install with test extras (the README's install command)
	$(PY) -m pip install -e '.[dev]' -c constraints.txt

lock:  ## re-resolve '.[dev]' afresh and rewrite constraints.txt (then: make install && make test before committing)
	bash tools/lock.sh

test:  ## run the test suite (the README's test command)
	$(PY) -m pytest

lint:  ## ruff: lint + import order (pyproject [tool.ruff]; .ci/run enforces it)
	$(PY) -m ruff check .

completions:  ## regenerate completions/ and man/ from the typer app
	$(PY) -m cloaklab.cli.docgen

man: completions  ## (same generator as completions)

docs-check:  ## fail (exit 1) when completions/ or man/ are stale, i.e. differ from what `make completions` writes
	$(PY) -m cloaklab.cli.docgen --check

bench:  ## run the benchmarks (prints ratios; not tests)
	@for b in bench/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

bench-gpu:  ## the GPU figures of bench/gpu-h100.md on a CUDA machine (sd15-shaped random weights; ~10 min on an H100)
	$(PY) bench/poison.py --device cuda --sd15
	$(PY) bench/purify.py --device cuda --dtype fp16 --sd-shaped --methods gridpure impress --set impress.iters=500
	$(PY) bench/train_ti.py --device cuda --model sd15-shaped --resolution 512 --steps 40 --rounds 2 --dtype bf16
	$(PY) bench/train_db.py --device cuda --model sd15-shaped --resolution 512 --train-steps 60 --train-text-encoder \
		--use-8bit-adam --gradient-checkpointing --mixed-precision bf16 --skip-generation

TOY_OUT ?= ops/toy/weights
toy-model:  ## train the offline toy text-to-image model from scratch into $(TOY_OUT) (2 idle CPU cores, --threads 2: 82 min)
	nice -n 19 $(PY) -m cloaklab.ops.toy.train --out $(TOY_OUT) $(TOY_ARGS)

toy-model-continue:  ## optional: continue $(TOY_OUT) for 50 more minutes (replaces it when done)
	rm -rf $(TOY_OUT).next
	nice -n 19 $(PY) -m cloaklab.ops.toy.train --init-from $(TOY_OUT) --out $(TOY_OUT).next --unet-minutes 50 \
		--novel-fraction 0.5 $(TOY_ARGS)
	rm -rf $(TOY_OUT) && mv $(TOY_OUT).next $(TOY_OUT)
