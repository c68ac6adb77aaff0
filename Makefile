# minillm's two commands: `make test` and `make demo`. Both create (or reuse) a virtual environment
# in $(VENV) and install the project into it first, so a fresh clone needs nothing but Python.
#
#   make test                   install with the test extra, run the whole suite
#   make demo                   install, then the whole main job on the embedded default corpus (CPU,
#                               under 10 minutes): prepare -> tokenizer -> pretrain -> perplexity -> samples
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

# the demo's training length; a quick look: make demo DEMO_STEPS=50
DEMO_STEPS ?= 600
DEMO_DIR ?= runs/demo

.PHONY: install test demo clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(if $(TORCH),$(PY) -m pip install --quiet "$(TORCH)")
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

demo: $(STAMP)
	$(PY) prepare.py --out data/demo
	$(PY) train.py --data=data/demo --out_dir=$(DEMO_DIR) --overwrite --model=mini --max_steps=$(DEMO_STEPS) \
		--batch_size=16 --learning_rate=2e-3 --warmup_steps=50 --eval_every=100 --checkpoint_every=200 --log_every=20
	$(PY) eval.py report $(DEMO_DIR)
	$(PY) sample.py --ckpt $(DEMO_DIR) --prompt "The module" --max_new_tokens 60 --temperature 0.7 --seed 1
	@echo "demo done: corpus report data/demo/report.json | checkpoint $(DEMO_DIR) | report card $(DEMO_DIR)/report.md | loss curve $(DEMO_DIR)/loss.svg"

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
