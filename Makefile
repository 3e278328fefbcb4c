# Two commands do all setup on a fresh machine: `make demo` and `make test`.
# Both create .venv, install the locked dependencies (torch 2.13.0 CPU) and fetch offline assets.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck unit assets bench clean lock browser

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

assets: $(STAMP)
	$(BIN)/splitfed assets fetch

demo: assets
	$(BIN)/splitfed demo

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/python -m pytest -q -m "not integration"

# The report's browser test needs Chromium; installed when missing (the test skips without it).
browser:
	-bash scripts/ensure_chromium.sh

test: assets lint typecheck browser
	$(BIN)/python -m pytest -q --durations=15

bench: assets
	$(BIN)/python benchmarks/split_overhead.py --quick

# Regenerate the lock from pyproject.toml in a scratch venv (needs network to PyPI).
lock:
	rm -rf .lockvenv && $(PYTHON) -m venv .lockvenv
	.lockvenv/bin/python -m pip install --quiet --upgrade pip
	.lockvenv/bin/python -m pip install --quiet -e '.[dev]'
	.lockvenv/bin/python -m pip freeze --exclude-editable | grep -v '^splitfed' > requirements.lock
	rm -rf .lockvenv

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
