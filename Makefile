# Two commands do all the set-up on a fresh machine: `make run` and `make test`.
# Both create .venv (Python 3.11) when it is missing and install the pinned dependencies from
# pyproject.toml; the stamp is keyed on that file's content, so an unchanged setup is skipped.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
DEPS_HASH := $(shell sha256sum pyproject.toml | cut -c1-16)
STAMP := $(VENV)/.installed-$(DEPS_HASH)
export PATH := $(BIN):$(PATH)

.PHONY: setup run test test-fast docs docs-serve serve bench ui lint lock clean

setup: $(STAMP)

$(STAMP):
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q -e '.[test]'
	@rm -f $(VENV)/.installed-*
	@touch $@

run: setup
	dvc repro

# After changing a stage's code or params: refresh dvc.lock, and commit it with the change and
# with the metrics and plot data that git keeps (`git add dvc.lock reports/`).
lock: setup
	dvc repro
	@# fetch is always changed (it snapshots a source DVC cannot see); any other stage must not be
	@dvc status --json | python -c 'import json, sys; s = json.load(sys.stdin); \
	    stale = [k for k, v in s.items() if k != "fetch" and v]; \
	    sys.exit(f"dvc.lock: stages still out of date: {stale}" if stale else 0)'

# Each test file runs whole on one worker (module fixtures are shared within a file). The docs
# build strictly first: a broken link or a page missing from the nav fails the run.
test: setup docs
	@# one worker more than cores: about a quarter of the suite waits on processes it starts
	@# (servers, torchrun, dvc), so a third worker fills the cores; files stay whole per worker,
	@# handed out longest first (tests/conftest.py)
	pytest -n $$(( $$(nproc) + 1 )) --dist loadfile --no-loadscope-reorder

# For local work: every test but the slowest (the end-to-end runs and long fault injections).
# CI runs `make test`, all of them.
test-fast: setup
	pytest -n $$(( $$(nproc) + 1 )) --dist loadfile --no-loadscope-reorder -m "not slow and not e2e"

# The docs site (MkDocs Material) into site/; the reference tables are generated (docs/hooks.py)
docs: setup
	NO_MKDOCS_2_WARNING=1 mkdocs build --strict --quiet

docs-serve: setup
	NO_MKDOCS_2_WARNING=1 mkdocs serve

# Measured ratios (never part of `make test`): tables on stdout and in reports/bench/.
bench: setup
	python benchmarks/run.py

# MLflow 3's UI starts in its GenAI view (traces): say how to reach the runs.
ui: setup
	@echo "MLflow UI: http://127.0.0.1:5000 (click 'Model training' at the top left once:" \
	      "experiments then open on their runs)"
	@# MLflow's job runner serves GenAI features (judges, prompt optimisation), not this project:
	@# without it the UI starts one process instead of eight
	MLFLOW_DISABLE_TELEMETRY=$${MLFLOW_DISABLE_TELEMETRY:-true} \
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=$${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false} \
	    mlflow ui --host 127.0.0.1 --port 5000 --backend-store-uri "sqlite:///$(CURDIR)/mlflow.db"

# The champion of this project's registered model over HTTP (MLflow's scoring server), with or
# without an activated venv: MLflow starts uvicorn from PATH, which this Makefile sets.
SERVE_PORT ?= 5001
serve: setup
	MLFLOW_TRACKING_URI=$${MLFLOW_TRACKING_URI:-sqlite:///$(CURDIR)/mlflow.db} \
	MLFLOW_DISABLE_TELEMETRY=$${MLFLOW_DISABLE_TELEMETRY:-true} \
	    mlflow models serve --env-manager local -h 127.0.0.1 -p $(SERVE_PORT) -m \
	    "models:/$$(python -c 'from reprolab.config import load_config as c; \
	                           print(c().registered_model_name)')@champion"

lint: setup
	ruff check src tests benchmarks nets sources metrics docs

# reports/: only what git ignores; the committed metrics and plot data stay (the baseline)
clean:
	rm -rf data/raw data/processed models
	git clean -q -fdX -- reports
