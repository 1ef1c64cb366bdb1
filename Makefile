# Developer tasks for cloaklab. `make help` lists them.
PY ?= $(if $(wildcard .venv/bin/python),.venv/bin/python,python3)

.PHONY: help install test completions man docs-check bench toy-model
help:  ## list the developer tasks
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/'

install:  ## editable install with test extras (the README's install command)
	$(PY) -m pip install -e '.[dev]'

test:  ## run the test suite (the README's test command)
	$(PY) -m pytest

completions:  ## regenerate completions/ and man/ from the typer app
	$(PY) -m cloaklab.cli.docgen

man: completions  ## (same generator as completions)

bench:  ## run the benchmarks (prints ratios; not tests)
	@for b in bench/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

toy-model:  ## train the offline toy text-to-image model into ops/toy/weights (2-core CPU: <= 90 min)
	nice -n 19 $(PY) -m cloaklab.ops.toy.train --out ops/toy/weights $(TOY_ARGS)
