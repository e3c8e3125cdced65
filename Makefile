# dd_assets — `make demo` runs the default graph, `make test` runs the tests.
# Both install what they need first (a virtual environment in .venv).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DVC_VENV ?= .venv-dvc
SHARED ?= ../shared

.PHONY: install demo demo-all test test-fast ui dvc-env dvc-remote cifar10-data cifar10 bench

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/dd-assets materialize --stale
	$(VENV)/bin/dd-assets report

# The demo's data, ruler and budgets with every registered method (profile default_all).
demo-all: install
	$(VENV)/bin/dd-assets --profile default_all materialize --stale
	$(VENV)/bin/dd-assets --profile default_all report

# Two workers, each test file on one worker (module fixtures stay shared): 20 min instead of 34 on
# the 2-core machine (2026-11-28, same 633 tests); TEST_WORKERS=0 runs them in one process.
TEST_WORKERS ?= 2
test: install
	$(PY) -m pytest -q $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile)

test-fast: install
	$(PY) -m pytest -q -m "not slow"

ui: install
	$(VENV)/bin/dd-assets ui

# DVC lives in its own environment (its antlr4 pin breaks Dagster's string selections).
$(DVC_VENV)/.installed:
	$(PYTHON) -m venv $(DVC_VENV)
	$(DVC_VENV)/bin/pip install -q "dvc>=3.50"
	touch $@

dvc-env: $(DVC_VENV)/.installed

# The development benchmark: CIFAR-10 as JPEGs from ../shared/datasets (not in a user's clone).
cifar10-data:
	mkdir -p data/raw/cifar10
	test -d data/raw/cifar10/train || tar xzf $(SHARED)/datasets/cifar10-jpeg-train.tar.gz -C data/raw/cifar10
	test -d data/raw/cifar10/test || tar xzf $(SHARED)/datasets/cifar10-jpeg-test.tar.gz -C data/raw/cifar10

cifar10: install cifar10-data
	DD_ASSETS_PROFILE=cifar10 $(VENV)/bin/dd-assets materialize --stale
	DD_ASSETS_PROFILE=cifar10 $(VENV)/bin/dd-assets report

bench: install
	$(PY) benchmarks/scoring_throughput.py

# A local DVC remote (a folder; any DVC remote URL works the same way).
DVC_REMOTE ?= $(CURDIR)/../dd_assets-dvc-remote
dvc-remote: dvc-env
	mkdir -p $(DVC_REMOTE)
	$(DVC_VENV)/bin/dvc remote add --local --force -d local $(DVC_REMOTE)
	@echo "DVC remote 'local' -> $(DVC_REMOTE); push with: $(DVC_VENV)/bin/dvc push"
