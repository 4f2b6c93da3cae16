# The two commands: `make demo` (set-up + the main job on the embedded default) and
# `make test` (set-up + the whole test suite). Everything else is a helper target.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast lint bench results clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt scripts/install_system_deps.sh
	./scripts/install_system_deps.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: setup
	$(PY) jobs/sweep.py --preset demo
	$(PY) jobs/report.py

# Two pytest-xdist workers, a module at a time each, the longest modules first (tests/conftest.py).
XDIST := -n 2 --dist loadfile --no-loadscope-reorder

test: setup
	$(PY) -m pytest $(XDIST)

test-fast: setup
	$(PY) -m pytest $(XDIST) -m "not slow"

lint: setup
	$(VENV)/bin/ruff check .

# docs/results.md and the README's headline table, from the records in docs/results/*.json.
results: setup
	$(PY) jobs/results.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
