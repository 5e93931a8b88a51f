# Two commands do all set-up on a fresh machine:  `make demo`  and  `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
# Rules call `iicrepro <step>`: the venv's bin comes first on PATH for everything make runs.
export PATH := $(CURDIR)/$(BIN):$(PATH)
CORES ?= 2
PRESET ?= demo

.PHONY: demo rehearsal test test-fast venv sysdeps lint format ui clean-results

# Virtual environment with the project (editable) and its pinned stack; rebuilt when pyproject changes.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

# Debian packages: archive tools (RAR via unar + bsdtar). Installs only what is missing.
sysdeps:
	scripts/install-system-deps.sh

demo: venv sysdeps
	$(BIN)/snakemake --cores $(CORES) --config preset=$(PRESET)
	@$(PY) -c 'import sys; from iicrepro import config, layout; \
	print(layout.summary_md(config.load(preset=sys.argv[1])).read_text())' $(PRESET)

# The paper's whole grid at toy size on stand-ins of the official UCF101/HMDB51 archives
# (docs/rehearsal.md): builds them, serves them on a loopback mirror, runs the workflow to the end
# and stops the mirror, also on failure. Two one-thread jobs at a time suit its tiny models.
REHEARSAL_THREADS := --set-threads pretrain=1 retrieve=1 retrieve_bnrecal=1 finetune=1
rehearsal: venv sysdeps
	OMP_NUM_THREADS=1 $(BIN)/iicrepro rehearsal run --preset rehearsal --cores $(CORES) \
		--snakemake "$(REHEARSAL_THREADS)"
	@cat results/rehearsal/summary.md

test: venv sysdeps
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest

# The tests not marked slow (no workflow, Slurm, DVC or server round trips), CORES at a time
# (pytest-xdist): a quick check while editing; `make test` (CI) runs everything, one at a time.
test-fast: venv
	$(BIN)/pytest -m "not slow" -n $(CORES)

lint: venv
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/snakemake --lint

format: venv
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

# MLflow UI on the embedded SQLite store.
ui: venv
	@echo "MLflow UI at http://127.0.0.1:5000: each experiment's page links its comparison view (docs/mlflow.md)"
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000
