# One set of commands for people and CI. Only python3 (>= 3.11) is needed: the targets create
# .venv and install the project into it, once per change of pyproject.toml.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python

# Stamps record what was installed into the venv; they are older than pyproject.toml after an
# edit of it, so the next target reinstalls.
CORE_STAMP := $(VENV)/.arrowflow-core
DEV_STAMP := $(VENV)/.arrowflow-dev

# `make test-min`: the suite against the lowest declared version of every dependency
# (constraints/minimum.txt), in a venv of its own.
MIN_VENV ?= .venv-min
MIN_PY := $(MIN_VENV)/bin/python
MIN_STAMP := $(MIN_VENV)/.arrowflow-min

BENCH_OPTS ?= --benchmark-group-by=group --benchmark-sort=name \
	--benchmark-columns=min,median,mean,stddev,rounds

.DEFAULT_GOAL := help
.PHONY: help demo test test-min lint bench format clean

help:
	@echo "make demo    run the prospect pipeline over data/ and write out/prospects.parquet"
	@echo "make test    install the dev extras into $(VENV) and run the test suite"
	@echo "make test-min  the suite with the lowest declared dependencies, in $(MIN_VENV)"
	@echo "make lint    ruff check, ruff format --check and mypy"
	@echo "make bench   overhead benchmarks (ARROWFLOW_BENCH_ROWS=1000000 for a quick run)"
	@echo "make format  ruff format and ruff check --fix"
	@echo "make clean   remove caches, build files and out/ (keeps $(VENV))"

$(PY):
	$(PYTHON) -m venv $(VENV)

$(CORE_STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e .
	touch $@

$(DEV_STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(CORE_STAMP) $@

demo: $(CORE_STAMP)
	$(PY) -m arrowflow demo

test: $(DEV_STAMP)
	$(PY) -m pytest

$(MIN_PY):
	$(PYTHON) -m venv $(MIN_VENV)

$(MIN_STAMP): pyproject.toml constraints/minimum.txt | $(MIN_PY)
	$(MIN_PY) -m pip install --quiet -e '.[dev]' -c constraints/minimum.txt
	touch $@

test-min: $(MIN_STAMP)
	$(MIN_PY) -m pip list --format=freeze | grep -iE '^(pyarrow|duckdb|pydantic|numpy|polars|tqdm|pandas|matplotlib|ray)=='
	$(MIN_PY) -m pytest

lint: $(DEV_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: $(DEV_STAMP)
	$(PY) -m pytest benchmarks --benchmark-only $(BENCH_OPTS)

format: $(DEV_STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf out build dist .pytest_cache .mypy_cache .ruff_cache .benchmarks .hypothesis
	rm -rf src/*.egg-info
	find . \( -path ./$(VENV) -o -path ./$(MIN_VENV) \) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
