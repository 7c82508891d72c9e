# LSGS: every target creates the virtual environment first when it is missing.
#   make test                 run the test suite (what CI runs)
#   make train-mvtec          full pipeline on MVTec AD (demo data unless DATA_ROOT is given)
#   make train-brats          full pipeline on BraTS2018 (demo data unless DATA_ROOT is given)
#   make ablate-codebook      paper Table 3 (learned vs aggregated codebook)
#   make ablate-attention     paper Table 4 (no transformer / causal / global)
#   make methods              only the other methods (baselines and contenders) of the MVTec experiment
#   make study-scoring        re-score a finished run (RUN_DIR) over a grid of scoring options (GRID)
# Variables:
#   DATA_ROOT=/data/mvtec_anomaly_detection   use real data with the paper's configuration
#   ARGS="--vqvae.model.codebook_size=512 --trainer.max_epochs=50"   overrides passed to `lsgs pipeline`
#   TORCH=torch==2.5.1+cu121  the torch requirement installed first (default: the small CPU build)
#   RUN_DIR=runs/my-run       where the run goes (default: runs/<experiment name>)
#   GRID='{"nll_quantile": [0.9, 0.99]}'   make study-scoring: the grid of scoring options (JSON)

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PIP_EXTRA ?=
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lsgs-installed
DEMO_DIR ?= data/demo
DATA_ROOT ?=
ARGS ?=
RUN_DIR ?=

# W&B stays offline unless the user says otherwise.
export WANDB_MODE ?= offline

LSGS := $(PY) -m lsgs
RUN_DIR_ARG := $(if $(RUN_DIR),--run_dir=$(RUN_DIR),)
MVTEC_CONFIG := $(if $(DATA_ROOT),experiments/mvtec.yaml --data.root=$(DATA_ROOT),experiments/demo_mvtec.yaml)
BRATS_CONFIG := $(if $(DATA_ROOT),experiments/brats.yaml --data.root=$(DATA_ROOT),experiments/demo_brats.yaml)
DEMO_DEP := $(if $(DATA_ROOT),,demo-data)

.PHONY: setup test lint demo-data train-mvtec train-brats ablate-codebook ablate-attention methods report study-scoring \
        benchmark clean

$(STAMP): pyproject.toml requirements/constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q $(TORCH)
	$(PY) -m pip install --disable-pip-version-check -q -c requirements/constraints.txt -e ".[dev]" $(PIP_EXTRA)
	@touch $@

setup: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check src data_modules tests benchmarks

demo-data: $(STAMP)
	$(PY) -m data_modules.synthetic --out $(DEMO_DIR)

train-mvtec: $(STAMP) $(DEMO_DEP)
	$(LSGS) pipeline --config $(MVTEC_CONFIG) $(RUN_DIR_ARG) $(ARGS)

train-brats: $(STAMP) $(DEMO_DEP)
	$(LSGS) pipeline --config $(BRATS_CONFIG) $(RUN_DIR_ARG) $(ARGS)

ablate-codebook: $(STAMP) $(DEMO_DEP)
	$(LSGS) ablate codebook --config $(MVTEC_CONFIG) $(RUN_DIR_ARG) $(ARGS)

ablate-attention: $(STAMP) $(DEMO_DEP)
	$(LSGS) ablate attention --config $(BRATS_CONFIG) $(RUN_DIR_ARG) $(ARGS)

methods: $(STAMP) $(DEMO_DEP)
	$(LSGS) pipeline --config $(MVTEC_CONFIG) $(RUN_DIR_ARG) --stages=[methods] $(ARGS)

report: $(STAMP)
	$(LSGS) report --run_dir $(if $(RUN_DIR),$(RUN_DIR),runs/$(if $(DATA_ROOT),mvtec,demo-mvtec))

# Re-score a finished run over a grid of scoring options (no retraining): RUN_DIR/studies/scoring.{md,csv}.
GRID ?= {"map_reference": ["reconstruction", "input"], "reconstruction_weight": [0, 0.5, 1], "nll_quantile": [0.9, 0.99]}
study-scoring: $(STAMP)
	$(LSGS) study scoring --run_dir $(if $(RUN_DIR),$(RUN_DIR),runs/$(if $(DATA_ROOT),mvtec,demo-mvtec)) --grid '$(GRID)'

benchmark: $(STAMP)
	$(PY) benchmarks/data_loading.py
	$(PY) benchmarks/metrics.py
	$(PY) benchmarks/vqvae_throughput.py
	$(PY) benchmarks/kmeans.py
	$(PY) benchmarks/scoring_throughput.py
	$(PY) benchmarks/feature_methods.py
	$(PY) benchmarks/inference.py

clean:
	rm -rf runs .pytest_cache
