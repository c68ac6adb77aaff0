# minillm's two commands: `make test` and `make demo`. Both create (or reuse) a virtual environment
# in $(VENV) and install the project into it first, so a fresh clone needs nothing but Python.
#
#   make test                   install with the test extra, run the whole suite
#   make test TORCH=torch       on a GPU machine: take torch's default (CUDA) build instead of the pin
#   make test VENV=/some/venv   reuse a virtual environment that already exists
#
# torch is pinned to 2.13.0 by default because on a CPU-only machine an unpinned `torch` pulls several
# GB of CUDA packages; pip finds the local CPU wheel for the pinned version.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.minillm-installed

.PHONY: install test clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(if $(TORCH),$(PY) -m pip install --quiet "$(TORCH)")
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
