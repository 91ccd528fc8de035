# craft-runner: `make run` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEFAULT_DIR ?= outputs/default

.PHONY: help install run test test-full test-slow test-cuda lint bench clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,slurm]'
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install the project into it

run: $(STAMP)  ## the default job: ResNet-20 on digits, Adam vs SAM, PTQ and pruning, prints the table
	$(BIN)/craft-run -m experiment=digits_default optimizer=adam,sam compress=ptq compress.bits=W8A8,W6A6,W4A16
	$(BIN)/craft-run -m experiment=digits_default optimizer=adam,sam compress=prune compress.sparsity=0.5
	$(BIN)/craft-table $(DEFAULT_DIR)

test: $(STAMP)  ## the fast test suite
	$(BIN)/python -m pytest -q -m "not slow"

test-full: $(STAMP)  ## every test, including the slow ones
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)  ## only the slow tests (CI runs them after make test)
	$(BIN)/python -m pytest -q -m slow

test-cuda: $(STAMP)  ## the CUDA-only tests (skipped without a GPU)
	$(BIN)/python -m pytest -q -m cuda

lint: $(STAMP)  ## ruff
	$(BIN)/ruff check craft_runner tests scripts

bench: $(STAMP)  ## speed ratios measured side by side
	$(BIN)/python scripts/bench.py

clean:  ## remove outputs (keeps .venv)
	rm -rf outputs
