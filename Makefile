# Two entry points for people (README): `make quickstart` and `make test`.
# Each creates or reuses .venv and installs crowdtrain with the pinned versions.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.crowdtrain-installed
# torch==2.13.0 from PyPI is a multi-GB CUDA build on Linux; use a local wheel
# folder when the machine has one, else PyTorch's CPU index.
WHEELS := $(wildcard /opt/wheels)
ifeq ($(WHEELS),)
TORCH_INDEX ?= --extra-index-url https://download.pytorch.org/whl/cpu
else
TORCH_INDEX ?= --find-links $(WHEELS)
endif

.PHONY: quickstart test check bench lint clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_INDEX) -c constraints.txt -e '.[dev]'
	touch $(STAMP)

quickstart: $(STAMP)
	$(VENV)/bin/coordinator quickstart

test: check
	$(PY) -m pytest -q --durations=15

# Lint, format, one-way layers (import-linter) and types: each fails the build.
check: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(PY) bench/run_all.py

lint: check

clean:
	rm -rf $(VENV) .crowdtrain *.egg-info
