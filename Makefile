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

.PHONY: help install run tables pretrained test test-full test-slow test-cuda lint bench smoke-paper clean

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

# The _small variant of every paper table and figure (conf/experiment/*_small.yaml), and the tiny backbones the
# CrAFT ones fine-tune (pretrained once on digits 0-4, experiment craft_pretrain_small). The order matters:
# an experiment reuses the trainings an earlier one in its lane cached (scripts/make_tables.py).
SMALL := craft_table2 craft_table4 craft_fig1 craft_fig2 craft_fig4 craft_table5 craft_table3 craft_table1 \
	snt_table3_ptq snt_table3_qat snt_fig5 snt_fig6 snt_table4 snt_fig7 cheap_sam
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
	$(BIN)/python scripts/bench.py --json outputs/bench.json

SMOKE ?= outputs/smoke
smoke-paper: $(STAMP)  ## paper-scale dry run on CPU (ViT-B/16 224, SNT models), writes outputs/smoke/projection.json
	$(if $(THREADS),OMP_NUM_THREADS=$(THREADS) MKL_NUM_THREADS=$(THREADS) )$(BIN)/python scripts/smoke_paper.py --out $(SMOKE)

clean:  ## remove outputs (keeps .venv)
	rm -rf outputs
