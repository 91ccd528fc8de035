# craft-runner: `make run` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEFAULT_DIR ?= outputs/default
# Threads per craft-run (empty: torch's default, one per core). On a machine other jobs share, one thread avoids
# oversubscribing the cores: make tables THREADS=1.
THREADS ?=
RUN := $(if $(THREADS),OMP_NUM_THREADS=$(THREADS) MKL_NUM_THREADS=$(THREADS) )$(BIN)/craft-run

.PHONY: help install run tables claims pretrained test test-full test-slow test-cuda lint bench smoke-paper clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,slurm]'
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install the project into it

run: $(STAMP)  ## the default job: ResNet-20 on digits, Adam vs SAM, PTQ and pruning, 3 seeds, prints the table
	$(RUN) -m experiment=digits_default hydra.sweep.dir=$(DEFAULT_DIR)
	$(BIN)/craft-report $(DEFAULT_DIR)

# The _small variant of every paper table and figure: scripts/make_tables.py finds conf/experiment/*_small.yaml
# itself, and orders them by their '# make tables: lane ..., after ...' header lines (an experiment runs after the
# ones whose cached trainings it reuses; scripts/make_tables.py --list shows the order). SMALL="a b" runs only
# those. TINY: the tiny backbones the CrAFT ones fine-tune (pretrained once on digits 0-4, craft_pretrain_small).
SMALL ?=
TINY := test_vit resnet20 test_efficientnet
PRETRAINED ?= outputs/pretrained
TABLES ?= outputs/tables
# Lanes side by side in make tables (2: the from-scratch SNT lane beside the rest, one thread per craft-run).
JOBS ?= 2

$(PRETRAINED)/%.pt: | $(STAMP)
	$(RUN) experiment=craft_pretrain_small +shared/tiny=$* hydra.run.dir=outputs/pretrain/$*
	$(BIN)/python scripts/export_checkpoint.py outputs/pretrain/$* $@

pretrained: $(TINY:%=$(PRETRAINED)/%.pt)  ## pretrain the tiny backbones of the _small CrAFT experiments

tables: $(STAMP) pretrained  ## every _small table and figure (5 seeds each) and the claims list into outputs/tables/
	CRAFT_PRETRAINED_DIR=$(PRETRAINED) $(BIN)/python scripts/make_tables.py $(SMALL) --jobs $(JOBS) \
		--out $(TABLES) $(if $(THREADS),--threads $(THREADS))

# The confirmatory run of the claims (craft_runner/confirm.py): each claim's primary comparison only, on seeds
# 100 on, with the seeds per arm the 5-seed tables' power analysis asks for (10-20) within CLAIMS_HOURS (the first
# 10 seeds of every claim always run), two workers; a rerun resumes.
CLAIMS ?= outputs/claims
CLAIMS_HOURS ?= 3
claims: $(STAMP) pretrained  ## the claims' primary comparisons on new seeds, then the claims list (outputs/claims/)
	CRAFT_PRETRAINED_DIR=$(PRETRAINED) $(BIN)/python -m craft_runner.confirm --out $(CLAIMS) --jobs $(JOBS) \
		--hours $(CLAIMS_HOURS)

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
	@mkdir -p outputs
	$(BIN)/python -m craft_runner.bench --json outputs/bench.json

SMOKE ?= outputs/smoke
smoke-paper: $(STAMP)  ## paper-scale dry run on CPU (ViT-B/16 224, SNT models), writes outputs/smoke/projection.json
	$(if $(THREADS),OMP_NUM_THREADS=$(THREADS) MKL_NUM_THREADS=$(THREADS) )$(BIN)/python -m craft_runner.bench.smoke_paper --out $(SMOKE)

clean:  ## remove outputs (keeps .venv)
	rm -rf outputs
