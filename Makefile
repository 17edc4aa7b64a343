# llamahost developer entry points. `make demo` and `make test` work on a fresh Debian/Ubuntu machine.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
EXTRAS ?= dev,ansible,infra,fleet
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)
PYTEST_ARGS ?=
DEMO_BUDGET ?= 5m

.PHONY: help venv system-deps test lint typecheck unit demo clean

help:
	@echo "make demo   - install, fetch the default model, tune this host (budget $(DEMO_BUDGET)), write the result"
	@echo "make test   - install everything (Debian packages, Python deps) and run the whole test suite"
	@echo "make lint   - ruff + mypy"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip wheel
	$(BIN)/python -m pip install --quiet -e '.[$(EXTRAS)]'
	rm -f $(VENV)/.installed-*
	touch $@

venv: $(STAMP)

system-deps:
	.ci/system-deps.sh

lint: venv
	$(BIN)/ruff check tuner tests benchmarks
	$(BIN)/mypy

test: system-deps venv lint
	$(BIN)/pytest $(PYTEST_ARGS)

unit: venv
	$(BIN)/pytest tests/unit $(PYTEST_ARGS)

demo: venv
	$(BIN)/llamahost tune --budget $(DEMO_BUDGET)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
