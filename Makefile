# vitzoo: `make demo` runs the main job, `make test` runs the tests. Both set up .venv first (idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo test clean-venv

setup:
	@bash scripts/setup_env.sh

demo: setup
	$(PY) tools/demo.py --output output/demo

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

clean-venv:
	rm -rf $(VENV)
