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

.PHONY: setup run test bench ui lint lock clean

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
	@dvc status --quiet || { dvc status; echo "dvc.lock: stages still out of date" >&2; exit 1; }

# Each test file runs whole on one worker (module fixtures are shared within a file).
test: setup
	@# one worker more than cores: about a quarter of the suite waits on processes it starts
	@# (servers, torchrun, dvc), so a third worker fills the cores; files stay whole per worker
	pytest -n $$(( $$(nproc) + 1 )) --dist loadfile

# Measured ratios (never part of `make test`): tables on stdout and in reports/bench/.
bench: setup
	python benchmarks/run.py

# MLflow 3's UI starts in its GenAI view (traces): say how to reach the runs.
ui: setup
	@echo "MLflow UI: http://127.0.0.1:5000 (click 'Model training' at the top left once:" \
	      "experiments then open on their runs)"
	MLFLOW_DISABLE_TELEMETRY=$${MLFLOW_DISABLE_TELEMETRY:-true} \
	    mlflow ui --host 127.0.0.1 --port 5000 --backend-store-uri "sqlite:///$(CURDIR)/mlflow.db"

lint: setup
	ruff check src tests benchmarks nets sources metrics

# reports/: only what git ignores; the committed metrics and plot data stay (the baseline)
clean:
	rm -rf data/raw data/processed models
	git clean -q -fdX -- reports
