# vitzoo: `make demo` runs the main job, `make test` runs the tests. Both set up .venv first (idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
JOBS ?= $(shell nproc)

.PHONY: setup demo test clean-venv

setup:
	@bash scripts/setup_env.sh

demo: setup
	$(PY) tools/demo.py --output output/demo

test: setup
	$(PY) -m pytest -q -n $(JOBS) --durations=25 $(PYTEST_ARGS) tests

clean-venv:
	rm -rf $(VENV)
