# llamahost developer entry points. `make demo` and `make test` work on a fresh Debian/Ubuntu machine.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
# `binding` (llama-cpp-python, a 10-minute compile on 2 cores) is for benchmarks/served_vs_binding.py only: add it
# by hand (make venv EXTRAS=dev,binding); no test needs it.
EXTRAS ?= dev,ansible,infra,fleet
# One stamp per pyproject.toml and set of extras: `make demo` installs none, `make test` all of them.
STAMP := $(VENV)/.installed-$(shell (cat pyproject.toml; echo "$(EXTRAS)") | sha256sum | cut -c1-12)
PYTEST_ARGS ?= --durations=25
# A fresh hash seed per run unless one is given; pytest's header prints it, so any order-dependent failure can be
# replayed with `make test PYTHONHASHSEED=<seed>`.
PYTHONHASHSEED ?= $(shell od -An -N4 -tu4 /dev/urandom | tr -d ' ')
DEMO_BUDGET ?= 5m
# Built llama-server binaries: kept across runs (and across test sessions with a throw-away LLAMAHOST_HOME).
LLAMAHOST_SERVER_CACHE ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/llamahost/llama-server
export LLAMAHOST_SERVER_CACHE
# The QEMU lab's image and running labs: shared by `make lab-up` and the lab tests (tests/lab).
LLAMAHOST_LAB_CACHE ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/llamahost/lab
export LLAMAHOST_LAB_CACHE

.PHONY: help venv system-deps test lint typecheck unit demo clean llama-server lab-up lab-down python-server-lock

help:
	@echo "make demo   - install, build llama-server (once), tune this host (budget $(DEMO_BUDGET)), write the result"
	@echo "make test   - install everything (Debian packages, Python deps) and run the whole test suite"
	@echo "make lint   - ruff + mypy"
	@echo "make llama-server - build llama.cpp's llama-server from the pinned source (once; cached)"
	@echo "make lab-up / lab-down - boot / stop the QEMU test host for the Ansible roles (llamahost lab)"
	@echo "make python-server-lock - pin the role's python mode (roles/llama_server/files/python-server*.txt)"

$(STAMP): pyproject.toml
	@echo "== installing llamahost$(if $(EXTRAS), with $(EXTRAS),) into $(VENV)$(if $(findstring binding,$(EXTRAS)),:" \
	      "the first time on a machine the binding extra compiles llama-cpp-python (about 10 min on 2 cores))"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip wheel
	$(BIN)/python -m pip install --progress-bar off -e '.$(if $(EXTRAS),[$(EXTRAS)])' \
		| { grep --line-buffered -E '^(Collecting|Building wheel|Successfully)' || true; }; \
		test $${PIPESTATUS[0]} -eq 0
	$(BIN)/python -c 'import tuner.cli'
	rm -f $(VENV)/.installed-*
	touch $@

venv: $(STAMP)

system-deps:
	.ci/system-deps.sh

# plugins/: the collection's Python also runs on managed hosts (Python 3.8 and later): errors only, no 3.11 rewrites.
lint: venv
	$(BIN)/ruff check tuner tests benchmarks infra .ci
	$(BIN)/ruff check --select E,F,W plugins
	$(BIN)/mypy
	cd infra && MYPYPATH=..:policy $(abspath $(BIN))/mypy --strict llamahost_infra policy/llamahost_policies.py write_inventory.py stack_inventory.py
# tests/: one mypy run per directory, with it on MYPYPATH as pytest puts it on sys.path (one run would reject the several conftest.py).
	status=0; for dir in $$(find tests -name '*.py' -printf '%h\n' | sort -u); do \
		MYPYPATH=tests:$$dir:infra:infra/policy $(BIN)/mypy $$dir/*.py || status=1; \
	done; exit $$status

# The hash-pinned requirements of the llama_server role's python mode, for tuner.server.source's pinned release.
python-server-lock: venv
	$(BIN)/python .ci/lock_python_server.py

llama-server: system-deps venv
	$(BIN)/llamahost server build

test: system-deps venv lint llama-server
	PYTHONHASHSEED=$(PYTHONHASHSEED) $(BIN)/pytest $(PYTEST_ARGS)

unit: venv
	$(BIN)/pytest tests/unit $(PYTEST_ARGS)

# Only what the demo uses: the build tools (no QEMU, no PostgreSQL) and no extras (no Ansible, no Pulumi).
demo:
	.ci/system-deps.sh demo
	$(MAKE) --no-print-directory venv EXTRAS=
	$(BIN)/llamahost server build
	$(BIN)/llamahost tune --budget $(DEMO_BUDGET)

lab-up: system-deps venv
	$(BIN)/llamahost lab up

lab-down: venv
	$(BIN)/llamahost lab down

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
