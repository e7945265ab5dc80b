# Quick start: `make run` (set up .venv, run the tiny profile) and `make test` (set up, run all tests).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export PATH := $(CURDIR)/$(BIN):$(PATH)
export MLFLOW_DISABLE_TELEMETRY := true
export DVC_NO_ANALYTICS := 1
MLFLOW_PORT ?= 5000

.PHONY: run test ui lint format setup setup-dev browser params clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Re-install when the project's dependencies change; the stamp files record the last install.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@ $(VENV)/.installed

setup: $(VENV)/.installed
setup-dev: $(VENV)/.installed-dev

# Headless Chromium for the UI test (tests/test_ui.py renders the page `make ui` opens): Debian's package where
# apt-get can install it; elsewhere install `chromium` yourself, or that one test skips and says why.
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
	  || echo "make browser: no chromium, and apt-get cannot install it here; the UI test will skip"; }

run: setup
	$(BIN)/dvc repro

# The e2e module on one worker, every other test on any (tests/test_pipeline_e2e.py holds one project for its tests).
test: setup-dev browser
	$(BIN)/python -m pytest -n auto --dist loadgroup

# Rewrite params.yaml from conf/ (what `dvc exp run` does); e.g. `make params OVERRIDES="profile=paper"`.
params: setup
	$(BIN)/budget-align compose-params $(OVERRIDES)

# The MLflow UI over mlflow.db; prints (and opens, where a browser is at hand) the experiment's runs table.
ui: setup
	$(BIN)/budget-align ui --port $(MLFLOW_PORT)

lint: setup-dev
	$(BIN)/ruff check src tests benchmarks hydra_plugins
	$(BIN)/ruff format --check src tests benchmarks hydra_plugins
	$(BIN)/lint-imports

format: setup-dev
	$(BIN)/ruff format src tests benchmarks hydra_plugins
	$(BIN)/ruff check --fix src tests benchmarks hydra_plugins

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
