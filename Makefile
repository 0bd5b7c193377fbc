# mtt: every target creates or updates the virtual environment first if it is missing or stale.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Where the MLflow UI and runs look by default (see tracking.uri in conf/tracking/mlflow.yaml).
MLFLOW_URI ?= sqlite:///$(CURDIR)/mlflow.db
UI_PORT ?= 5000
# `make demo`: parallel jobs, one per core, each with one torch thread (the small head's steps
# run faster on one thread than on two that compete with the other job's).
DEMO_JOBS ?= $(shell nproc 2>/dev/null || echo 2)
# `make mlflow-server`: a tracking server for a team (mtt/tracking/server.py; docs/scaling-out.md).
# SERVER_DB: postgresql://user@host/db for a lab (SQLAlchemy's driver for it, psycopg, is in the lock).
SERVER_PORT ?= 5001
SERVER_HOST ?= 127.0.0.1
SERVER_STATE ?= $(CURDIR)/mlflow-server
SERVER_DB ?= sqlite:///$(SERVER_STATE)/mlflow.db
SERVER_ARTIFACTS ?= $(SERVER_STATE)/artifacts
# basic = MLflow's login (first start: MLFLOW_AUTH_ADMIN_PASSWORD=... creates user admin);
# none warns when SERVER_HOST is not a loopback address. SERVER_ALLOWED_HOSTS: the Host names
# clients use beyond localhost and private IPs (e.g. mlflow.lab:5001).
SERVER_AUTH ?= none
SERVER_ALLOWED_HOSTS ?=

.DEFAULT_GOAL := help
.PHONY: help venv demo lint test test-slow bench bench-gpu ui mlflow-server clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(VENV)/.stamp: requirements.lock pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --quiet --disable-pip-version-check -r requirements.lock
	$(PY) -m pip install --quiet --quiet --disable-pip-version-check --no-deps -e .
	@touch $@

venv: $(VENV)/.stamp  ## create/update the virtual environment from requirements.lock

demo: venv  ## 3 seeds of each head and of the linear probe on the embedded dataset, compared with intervals
	OMP_NUM_THREADS=1 $(PY) -m mtt.run -m hydra/launcher=joblib hydra.launcher.n_jobs=$(DEMO_JOBS) \
		+head=gap2,gap3,autopool trainer.seed=0,1,2 trainer.progress=false tracking.experiment=demo
	$(PY) -m mtt.probe -m trainer.seed=0,1,2 trainer.progress=false tracking.experiment=demo
	$(PY) -m mtt.compare demo
	@echo
	@echo "Compare the runs:  make ui   (it prints the address of experiment 'demo')"

lint: venv  ## ruff (lint rules, import order, format check) and mypy on mtt/ (config: pyproject.toml)
	$(VENV)/bin/ruff check mtt tests
	$(VENV)/bin/ruff format --check mtt tests
	$(VENV)/bin/mypy

test: venv  ## run the fast test suite (a few minutes)
	$(PY) -m pytest -m "not slow" -q

test-slow: venv  ## run the slow end-to-end tests (CI runs them too)
	$(PY) -m pytest -m slow -q

bench: venv  ## print speed and memory figures (tests/benchmarks)
	@for b in tests/benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

# `make bench-gpu`: OUT=dir writes the record there instead of docs/ (a device machine's $OUT);
# COMMIT=sha names the code where the tree has no .git (a copy).
bench-gpu: venv  ## CUDA figures, full-MTAT hours per preset, `pytest -m cuda` -> docs/gpu.md + gpu.json (no GPU: says so)
	$(PY) tests/benchmarks/bench_gpu.py --out $(or $(OUT),docs) $(if $(COMMIT),--commit $(COMMIT))

ui: venv  ## print each experiment's runs-table address, then start the MLflow UI on 127.0.0.1 against the default store
	@$(PY) -m mtt.ui --uri '$(MLFLOW_URI)' --base http://127.0.0.1:$(UI_PORT)
	$(VENV)/bin/mlflow ui --backend-store-uri $(MLFLOW_URI) --host 127.0.0.1 --port $(UI_PORT)

mlflow-server: venv  ## start a shared tracking server (database + artifact store) on $(SERVER_HOST):$(SERVER_PORT)
	@mkdir -p $(SERVER_STATE)
	$(PY) -m mtt.server --db '$(SERVER_DB)' --artifacts '$(SERVER_ARTIFACTS)' --host $(SERVER_HOST) \
		--port $(SERVER_PORT) --auth $(SERVER_AUTH) --state $(SERVER_STATE) \
		$(if $(SERVER_ALLOWED_HOSTS),--allowed-hosts '$(SERVER_ALLOWED_HOSTS)')

# Hydra writes its run folders under paths.cache (conf/config.yaml): $MTT_CACHE, else ~/.cache/mtt.
HYDRA_OUT := $(or $(MTT_CACHE),$(HOME)/.cache/mtt)
clean:  ## remove Hydra's run folders and pytest's cache (keeps the venv, the MLflow store and the data cache)
	rm -rf $(HYDRA_OUT)/outputs $(HYDRA_OUT)/multirun .pytest_cache
